"""Second-moment statistics of MLP keys (for ROME and MEMIT) on offline corpora."""

from overtone.stats.corpus import CORPORA, Corpus, CorpusError, load_corpus
from overtone.stats.second_moment import (
    MomentSpec,
    SecondMoment,
    key_weights,
    log_progress,
    second_moments,
    weight_hashes,
)

__all__ = [
    "CORPORA",
    "Corpus",
    "CorpusError",
    "MomentSpec",
    "SecondMoment",
    "key_weights",
    "load_corpus",
    "log_progress",
    "second_moments",
    "weight_hashes",
]
