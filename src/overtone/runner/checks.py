"""Checks of a run's cases that need only the tokenizer (and the model's ``config.json``), so that bad input
fails in seconds, before any model is loaded, statistics are computed or a case is evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from transformers import PreTrainedTokenizerBase

from overtone.benchmarks.cases import EditCase
from overtone.editors.base import Editor
from overtone.evaluation.teacher_forced import check_probes


def prepare_cases(cases: Sequence[EditCase], tokenizer: PreTrainedTokenizerBase, editor: type[Editor],
                  config: Any, truncate: bool = False) -> list[EditCase]:
    """The cases as they will be edited and scored, or a ``ValueError`` naming the first bad case.

    Each case must suit the editor (``Editor.check_cases``: its length limit, ROME's and MEMIT's
    subject) and every probe must have answer tokens. ``truncate`` cuts over-long inputs instead of
    refusing them.
    """
    fitted = editor.check_cases(config, tokenizer, cases, truncate)
    for case in fitted:
        check_probes(tokenizer, case)
    return fitted


def layer_settings(config: Any) -> dict[str, list[int]]:
    """The editor settings that name layers (``layer``, ``layers``, ``key_layer``, ...) and the layers given."""
    out = {}
    for key, value in asdict(config).items():
        if key in ("layer", "layers") or key.endswith(("_layer", "_layers")):
            values = value if isinstance(value, tuple | list) else (value,)
            given = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
            if given:
                out[key] = given
    return out


def check_layers(config: Any, model_config: Any, model: str) -> None:
    """Every layer an editor setting names exists in the model (``model_config``: its ``config.json``), or a
    ``ValueError`` naming the setting, the model and its layer count."""
    count = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(count, int):
        return
    for key, layers in layer_settings(config).items():
        bad = [layer for layer in layers if not 0 <= layer < count]
        if bad:
            raise ValueError(f"editor setting {key}={bad[0]}: model {model} has {count} layers, so a layer is "
                             f"0..{count - 1}")
