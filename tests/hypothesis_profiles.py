"""Hypothesis profiles for the property tests.

"ci" (the default) is what the suite runs: derandomized, so every run draws
the same examples and a failure reproduces on any machine, and small enough
that tests/test_properties.py takes well under a minute on 2 cores. "long"
draws 25 times as many fresh random examples, for a run before a release:

    KERAS_BN_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py

Tests ask for `examples(n)`: n examples under "ci", 25 n under "long".
"""

import os

from hypothesis import HealthCheck
from hypothesis import settings

_COMMON = dict(
    # A TensorFlow call's first run in a process traces and compiles; a
    # per-example deadline would fail on that, not on the code under test.
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No .hypothesis/ directory: a failure prints the example and a blob
    # that `@reproduce_failure` replays.
    database=None,
    print_blob=True,
)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)

PROFILE = os.environ.get("KERAS_BN_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(
        "KERAS_BN_HYPOTHESIS_PROFILE must be 'ci' or 'long'; received "
        f"{PROFILE!r}."
    )
settings.load_profile(PROFILE)
_SCALE = 25 if PROFILE == "long" else 1


def examples(n):
    """The number of examples a test draws: `n` under "ci"."""
    return n * _SCALE
