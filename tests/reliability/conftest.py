"""Reliability suite setup: one reproducible Hypothesis profile for the property-based tests.

``derandomize=True`` makes every run try the same inputs (CI failures reproduce locally), and
``database=None`` keeps Hypothesis from writing ``.hypothesis/`` into the checkout or replaying
examples a previous run happened to save. Deadlines are off: this suite runs on 2 shared cores,
where timing varies several-fold. The profile is registered here and selected with
``settings(parent=settings.get_profile(PROFILE), ...)`` by the tests that use it, so loading this
conftest does not change the Hypothesis defaults of tests elsewhere in the session.
"""

from hypothesis import HealthCheck, settings

PROFILE = "pcc-reliability"

settings.register_profile(
    PROFILE,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    # Examples write real files; generating a few large byte strings is slow but intended.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_terminal_summary(terminalreporter) -> None:
    """How many generated inputs the hostile-input properties tried (the closing-note figures):
    one line for the data readers and the config loader, one for the other surfaces (DeepSpeed
    JSON, model files), each from the ``TRIED`` counts of the ``test_hostile_*`` modules."""
    import sys

    lines = {"hostile-input properties": {}, "hostile-surface properties": {}}
    for name, module in list(sys.modules.items()):
        tried = getattr(module, "TRIED", None)
        if not tried or not name.rsplit(".", 1)[-1].startswith("test_hostile_"):
            continue
        kind = "hostile-input properties" if name.endswith("test_hostile_inputs") \
            else "hostile-surface properties"
        lines[kind].update(tried)
    for kind, tried in lines.items():
        if tried:
            terminalreporter.write_line(
                f"{kind} tried {sum(tried.values())} inputs: "
                + ", ".join(f"{k}={v}" for k, v in sorted(tried.items())))
