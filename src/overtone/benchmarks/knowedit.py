"""KnowEdit-format records (ZsRE, WikiData_recent, WikiData_counterfact, WikiBio) read into ``EditCase``s.

One loader serves the four KnowEdit datasets, as the reference toolkit's ``KnowEditDataset`` does:

* ZsRE: ``subject, prompt, target_new, ground_truth[list], rephrase_prompt, cond, locality{...},
  portability{...}``.
* WikiData_recent: ``subject, prompt, target_new, portability{...}, locality{...}``; no ground truth
  (the fact is new), no rephrase.
* WikiData_counterfact: as WikiData_recent plus ``ground_truth`` (a string).
* WikiBio: ``text`` (a passage prefix, the prompt), ``labels`` (the next sentence, the target),
  ``concept`` (the subject), ``locality{Relation_Specificity}``; no portability.

Portability kinds are ``Reasoning``, ``Subject_Aliasing``, ``Logical_Generalization``; locality kinds
``Relation_Specificity``, ``Forgetfulness``; any other kind is kept under its own name. Probe answers
come as a string, a list or a list of alias lists; the first non-empty string is the scored answer and
the rest are aliases. Probes with no answer at all are dropped, as the reference toolkit's runner does.
The helpers here (``RecordReader``, ``read_json_records``, ``DatasetError``) serve every loader.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, overload

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
    """Field access on one record that turns every problem into a ``DatasetError`` naming the place.

    ``index`` counts from 0 (as case ids do); messages count records from 1, as lines are counted: record 1
    is the first element of a JSON array, the first non-blank line of JSON Lines, the first row of a CSV file
    after its header."""

    def __init__(self, path: Path | str, index: int, record: Any, field_prefix: str = "") -> None:
        self.where = f"{path}: record {index + 1}"
        self.path, self.index, self.field_prefix = path, index, field_prefix
        if not isinstance(record, dict):
            what = f"field {field_prefix.rstrip('.')!r}: " if field_prefix else ""
            raise DatasetError(f"{self.where}: {what}expected a JSON object, got {type(record).__name__}")
        self.record = record

    def error(self, name: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.where}: field {self.field_prefix + name!r}: {problem}")

    def nested(self, name: str) -> RecordReader:
        """A reader of the object in field ``name``; its errors name the full field path."""
        return RecordReader(self.path, self.index, self.record.get(name), f"{self.field_prefix}{name}.")

    def items(self, name: str) -> list[RecordReader]:
        """Readers of the objects in the non-empty list in field ``name``."""
        value = self.record.get(name)
        if not isinstance(value, list) or not value:
            got = "an empty list" if isinstance(value, list) else type(value).__name__
            raise self.error(name, f"expected a non-empty list of objects, got {got}")
        return [RecordReader(self.path, self.index, item, f"{self.field_prefix}{name}[{j}].")
                for j, item in enumerate(value)]

    def text_of(self, *names: str) -> str:
        """The first of ``names`` present in the record (a format with alternative field names)."""
        for name in names:
            if name in self.record:
                return self.text(name)
        raise self.error(names[0], f"missing (expected one of {', '.join(map(repr, names))})")

    @overload
    def text(self, name: str, required: Literal[True] = True) -> str: ...

    @overload
    def text(self, name: str, required: bool) -> str | None: ...

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
    """The records of a dataset file: a JSON array, JSON Lines (``.jsonl``, one object per line) or CSV
    (``.csv``, a header row naming the fields, then one record per row; empty cells are left out)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path | str) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}: line {number}: not valid JSON: {exc}") from exc
    return records


def _read_csv(path: Path | str) -> list[dict[str, str]]:
    records = []
    with open(path, encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=2):
            if None in row:
                raise DatasetError(f"{path}: line {number}: more cells than the header has columns")
            records.append({k.strip(): v for k, v in row.items() if v is not None and v.strip()})
    return records


def is_knowedit(record: dict[str, Any]) -> bool:
    """KnowEdit records carry ``prompt``/``target_new`` (``text``/``labels`` for WikiBio) and no field of
    the MEND (``src``, ``locality_prompt``) or ROME/MQuAKE (``requested_rewrite``) formats."""
    edit_fields = ("prompt" in record and "target_new" in record) or ("text" in record and "labels" in record)
    return edit_fields and not {"src", "locality_prompt", "requested_rewrite"} & record.keys()


def load_knowedit(path: Path | str, prefix: str) -> list[EditCase]:
    """Every record of a KnowEdit file as an ``EditCase`` with id ``<prefix>/<index>``."""
    cases = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        prompt = r.text_of("prompt", "text")
        target = r.text_of("target_new", "labels")
        rephrase = r.text("rephrase_prompt", required=False)
        old = r.answers("ground_truth", record.get("ground_truth"))
        subject = r.text("subject", required=False) if "subject" in record else r.text("concept", required=False)
        cases.append(
            EditCase(
                case_id=f"{prefix}/{i}",
                prompt=prompt,
                target=target,
                subject=subject,
                ground_truth=old[0] if old else None,
                rephrases=(rephrase,) if rephrase and rephrase.strip() else (),
                portability=r.probes("portability"),
                locality=r.probes("locality"),
                raw=record,
            )
        )
    return cases
