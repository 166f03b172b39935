"""Hypothesis settings for the fuzz tests (tests/test_fuzz_*.py).

Two profiles: `ci` (the default: a fixed seed and few examples, each target a few
seconds) and `fuzz` (`make fuzz`: random seeds, 50 times the examples).  Choose with
HYPOTHESIS_PROFILE.  Each target states its CI example count through `fuzz_settings`."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SCALE = {"ci": 1, "fuzz": 50}
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in _SCALE:
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: expected one of {', '.join(_SCALE)}")
settings.load_profile(PROFILE)


def fuzz_settings(ci_examples: int) -> settings:
    """settings for one target: ci_examples under `ci`, 50x under `fuzz`."""
    return settings(max_examples=ci_examples * _SCALE[PROFILE])


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message
