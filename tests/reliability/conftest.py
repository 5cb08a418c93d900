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
