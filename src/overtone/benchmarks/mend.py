"""MEND-format records (ZsRE and CounterFact as released with MEND, ROME and EasyEdit) read into ``EditCase``s.

ZsRE: ``subject, src`` (the question), ``alt`` (the new answer), ``answers`` (the true answers),
``rephrase``, ``loc`` ("nq question: ..."), ``loc_ans``, ``pred``, ``cond``. EasyEdit's portability
files add one probe each, read as a portability kind:

* ``portability{New Question, New Answer}`` -> ``One_Hop``;
* ``alter_subject_question`` -> ``Subject_Replace``, answered by the new target ``alt``;
* ``"inverse question"`` -> ``Inverse_Relation``, answered by the subject.

These files have no ``loc``. The locality probe keeps its "nq question: " prefix, as the reference
toolkit passes it, under the kind ``neighborhood`` (its name there). Records with an empty ``alt``
are skipped with a warning, as the reference toolkit's loaders do (2 of the 1000 shipped records).

CounterFact: ``case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
locality_ground_truth``, all strings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.knowedit import RecordReader, read_json_records

log = logging.getLogger(__name__)

LOCALITY_KIND = "neighborhood"


def is_zsre_mend(record: dict[str, Any]) -> bool:
    return "src" in record and "alt" in record


def is_counterfact_mend(record: dict[str, Any]) -> bool:
    return "prompt" in record and "target_new" in record and "locality_prompt" in record


def _portability(r: RecordReader, target: str, subject: str | None) -> dict[str, tuple[Probe, ...]]:
    probes: dict[str, tuple[Probe, ...]] = {}
    if "portability" in r.record:
        hop = r.nested("portability")
        probes["One_Hop"] = (Probe(hop.text("New Question"), hop.text("New Answer")),)
    if "alter_subject_question" in r.record:
        probes["Subject_Replace"] = (Probe(r.text("alter_subject_question"), target),)
    if "inverse question" in r.record:
        if subject is None or not subject.strip():
            raise r.error("subject", "is needed as the answer of the 'inverse question'")
        probes["Inverse_Relation"] = (Probe(r.text("inverse question"), subject),)
    return probes


def load_zsre_mend(path: Path | str, prefix: str) -> list[EditCase]:
    """ZsRE records in the MEND format; ids ``<prefix>/<index>`` count every record, skipped ones too."""
    cases, skipped = [], []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        if isinstance(record.get("alt"), str) and not record["alt"].strip():
            skipped.append(i)
            continue
        prompt, target = r.text("src"), r.text("alt")
        subject = r.text("subject", required=False)
        truths = r.answers("answers", record.get("answers"))
        rephrase = r.text("rephrase", required=False)
        locality = {}
        if "loc" in record or "loc_ans" in record:
            locality[LOCALITY_KIND] = (Probe(r.text("loc"), r.text("loc_ans")),)
        cases.append(EditCase(
            case_id=f"{prefix}/{i}", prompt=prompt, target=target, subject=subject,
            ground_truth=truths[0] if truths else None,
            rephrases=(rephrase,) if rephrase and rephrase.strip() else (),
            portability=_portability(r, target, subject), locality=locality, raw=record,
        ))
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty 'alt' (new target), as the reference toolkit does: "
                    "record(s) %s (case ids %s)", path, len(skipped), ", ".join(str(i + 1) for i in skipped),
                    ", ".join(f"{prefix}/{i}" for i in skipped))
    return cases


def load_counterfact_mend(path: Path | str, prefix: str) -> list[EditCase]:
    """CounterFact records in the MEND/EasyEdit format; ids ``<prefix>/<index>``."""
    cases = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        prompt, target = r.text("prompt"), r.text("target_new")
        rephrase = r.text("rephrase_prompt", required=False)
        cases.append(EditCase(
            case_id=f"{prefix}/{i}", prompt=prompt, target=target, subject=r.text("subject", required=False),
            ground_truth=r.text("ground_truth", required=False),
            rephrases=(rephrase,) if rephrase and rephrase.strip() else (),
            locality={LOCALITY_KIND: (Probe(r.text("locality_prompt"), r.text("locality_ground_truth")),)},
            raw=record,
        ))
    return cases
