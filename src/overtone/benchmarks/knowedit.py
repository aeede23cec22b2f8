"""KnowEdit-format records (ZsRE test of the KnowEdit release) read into ``EditCase``s.

Schema of one ZsRE record: ``subject, prompt, target_new, ground_truth[list], rephrase_prompt, cond,
locality{Relation_Specificity: [{prompt, ground_truth}]}, portability{Reasoning|Subject_Aliasing|
Logical_Generalization: [{prompt, ground_truth}]}``. Probe answers come as a string, a list or a list
of alias lists; the first non-empty string is the scored answer and the rest are aliases. Probes with
no answer at all are dropped, as the reference toolkit's runner does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe


class DatasetError(ValueError):
    """A dataset file or record is malformed; the message names the file, the record and the field."""


def _flatten(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    elif value is not None:
        raise TypeError(f"expected a string or a list of strings, got {type(value).__name__}")


class RecordReader:
    """Field access on one record that turns every problem into a ``DatasetError`` naming the place."""

    def __init__(self, path: Path | str, index: int, record: Any) -> None:
        self.where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DatasetError(f"{self.where}: expected a JSON object, got {type(record).__name__}")
        self.record = record

    def error(self, name: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.where}: field {name!r}: {problem}")

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.record.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__}")
        if required and not value.strip():
            raise self.error(name, "is empty")
        return value

    def answers(self, name: str, value: Any) -> list[str]:
        try:
            return list(_flatten(value))
        except TypeError as exc:
            raise self.error(name, str(exc)) from exc

    def probes(self, name: str) -> dict[str, tuple[Probe, ...]]:
        """``{kind: [{prompt, ground_truth}, ...]}`` groups, empty groups dropped."""
        groups = self.record.get(name) or {}
        if not isinstance(groups, dict):
            raise self.error(name, f"expected an object of probe lists, got {type(groups).__name__}")
        out: dict[str, tuple[Probe, ...]] = {}
        for kind, items in groups.items():
            items = [items] if isinstance(items, dict) else items
            if not isinstance(items, list):
                raise self.error(f"{name}.{kind}", f"expected a list of probes, got {type(items).__name__}")
            probes = []
            for j, item in enumerate(items):
                field_name = f"{name}.{kind}[{j}]"
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise self.error(field_name, "expected an object with a string 'prompt'")
                answers = self.answers(f"{field_name}.ground_truth", item.get("ground_truth"))
                if answers and item["prompt"].strip():
                    probes.append(Probe(item["prompt"], answers[0], tuple(answers[1:])))
            if probes:
                out[kind] = tuple(probes)
        return out


def read_json_records(path: Path | str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def load_knowedit(path: Path | str, prefix: str) -> list[EditCase]:
    """Every record of a KnowEdit file as an ``EditCase`` with id ``<prefix>/<index>``."""
    cases = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        prompt = r.text("prompt")
        target = r.text("target_new")
        rephrase = r.text("rephrase_prompt", required=False)
        old = r.answers("ground_truth", record.get("ground_truth"))
        assert prompt is not None and target is not None
        cases.append(
            EditCase(
                case_id=f"{prefix}/{i}",
                prompt=prompt,
                target=target,
                subject=r.text("subject", required=False),
                ground_truth=old[0] if old else None,
                rephrases=(rephrase,) if rephrase and rephrase.strip() else (),
                portability=r.probes("portability"),
                locality=r.probes("locality"),
                raw=record,
            )
        )
    return cases
