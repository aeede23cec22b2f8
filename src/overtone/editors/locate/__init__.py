"""Primitives of the locate-then-edit editors (ROME, MEMIT), written once.

* ``subject``: the subject's last token in a prompt, and token rows aligned on it;
* ``contexts``: short sampled context prefixes, made once per model;
* ``value``: keys/values read at the subject's last token, and the value optimisation (v*) with any
  ``Objective``;
* ``config``: the settings the two editors share.

The second-moment statistics of the keys live in ``overtone.stats``.
"""

from overtone.editors.locate.config import LocateConfig
from overtone.editors.locate.contexts import context_prefixes
from overtone.editors.locate.subject import (
    MISSING_SUBJECT,
    LookupRow,
    SubjectError,
    encode_rows,
    encode_subject_row,
    subject_span,
    token_at,
)
from overtone.editors.locate.value import ValueResult, lookup_activations, optimise_value

__all__ = [
    "MISSING_SUBJECT",
    "LocateConfig",
    "LookupRow",
    "SubjectError",
    "ValueResult",
    "context_prefixes",
    "encode_rows",
    "encode_subject_row",
    "lookup_activations",
    "optimise_value",
    "subject_span",
    "token_at",
]
