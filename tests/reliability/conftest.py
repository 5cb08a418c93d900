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
    """How many generated inputs the hostile-input properties tried (the closing-note figure)."""
    import sys

    for name, module in list(sys.modules.items()):
        tried = getattr(module, "TRIED", None) if name.endswith("test_hostile_inputs") else None
        if tried:
            terminalreporter.write_line(
                f"hostile-input properties tried {sum(tried.values())} inputs: "
                + ", ".join(f"{k}={v}" for k, v in sorted(tried.items())))
