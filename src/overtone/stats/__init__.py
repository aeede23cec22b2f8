"""Second-moment statistics of MLP keys (for ROME and MEMIT) on offline corpora."""

from overtone.stats.second_moment import (
    MomentSpec,
    SecondMoment,
    key_weights,
    log_progress,
    second_moments,
    weight_hashes,
)

__all__ = [
    "MomentSpec",
    "SecondMoment",
    "key_weights",
    "log_progress",
    "second_moments",
    "weight_hashes",
]
