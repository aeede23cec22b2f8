"""Facts written by hand: the format for a user's own edits (``overtone edit --facts FILE``).

One record per fact, in a JSON array, a JSON Lines file or a CSV file (``read_json_records``):

* ``prompt`` and ``target`` (the new answer), required;
* ``subject``: the entity the prompt is about (ROME and MEMIT edit at its last token);
* ``paraphrases``: other prompts that should give the new answer too (Gen.);
* ``locality``: prompts whose answers the edit should leave alone (Loc.). An entry is a prompt,
  scored against the unedited model's own greedy continuation, or ``{"prompt", "answer"}``;
* ``id``: the case id (default ``<file stem>/<index>``).

``paraphrases`` and ``locality`` take a list or one string, in which ``|`` separates entries, so
that one CSV cell can hold several. Any other field is an error, so that a misspelt field name is
not silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.knowedit import RecordReader, read_json_records

FIELDS = ("id", "prompt", "target", "subject", "paraphrases", "locality")
LOCALITY_KIND = "unrelated"
# fields of the other registered formats: a record with any of them is not a hand-written fact
_OTHER_FORMATS = {"target_new", "src", "alt", "requested_rewrite", "locality_prompt", "labels"}


def is_facts(record: dict[str, Any]) -> bool:
    return "prompt" in record and "target" in record and not _OTHER_FORMATS & record.keys()


def _entries(r: RecordReader, name: str) -> list[Any]:
    value = r.record.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split("|") if part.strip()]
    if not isinstance(value, list):
        raise r.error(name, f"expected a list or a string, got {type(value).__name__}")
    return value


def _locality(r: RecordReader) -> tuple[Probe, ...]:
    probes = []
    for j, entry in enumerate(_entries(r, "locality")):
        if isinstance(entry, str):
            if entry.strip():
                probes.append(Probe(entry, ""))  # "": the unedited model's own continuation (evaluation/)
            continue
        item = RecordReader(r.path, r.index, entry, f"locality[{j}].")
        answer = item.text("answer", required=False)
        probes.append(Probe(item.text("prompt"), answer.strip() if answer else ""))
    return tuple(probes)


def load_facts(path: Path | str, prefix: str) -> list[EditCase]:
    """Every fact of the file as an ``EditCase`` (module docstring); errors name the file, record and field."""
    cases, seen = [], set()
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise r.error(unknown[0], f"unknown field; a fact has {', '.join(FIELDS)}")
        paraphrases = _entries(r, "paraphrases")
        if not all(isinstance(p, str) for p in paraphrases):
            raise r.error("paraphrases", "expected strings")
        case_id = str(record["id"]) if record.get("id") not in (None, "") else f"{prefix}/{i}"
        if case_id in seen:
            raise r.error("id", f"duplicate id {case_id!r}")
        seen.add(case_id)
        locality = _locality(r)
        cases.append(EditCase(
            case_id=case_id, prompt=r.text("prompt"), target=r.text("target").strip(),
            subject=r.text("subject", required=False) or None,
            rephrases=tuple(p for p in paraphrases if p.strip()),
            locality={LOCALITY_KIND: locality} if locality else {}, raw=record,
        ))
    return cases
