"""CounterFact in the ROME format, read into ``EditCase``s.

One record: ``case_id, requested_rewrite{prompt ("{}" = subject slot), subject, target_new{str},
target_true{str}}, paraphrase_prompts, neighborhood_prompts, ...`` plus, in the portability and
locality releases of the reference toolkit, ``portability{New Question, New Answer}``,
``distracting_neighborhood_prompts`` or ``alternative_subject``. The mapping:

* prompt = ``requested_rewrite.prompt`` with the subject filled in; target = ``target_new.str``;
  ground truth = ``target_true.str``; rephrases = ``paraphrase_prompts``;
* locality ``Neighborhood``: the neighbourhood prompts (other subjects that share the true
  attribute), teacher-forced on ``target_true`` and scored as pre/post agreement; where present, the
  same for ``Distracting_Neighborhood`` (the edited fact stated before a neighbourhood prompt);
* portability ``New_Question`` (a question that needs the new fact, answered with ``New Answer``)
  and ``Subject_Replace`` (the edit prompt with the alternative subject, answered with the new target).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.knowedit import DatasetError, RecordReader, read_json_records


def _strings(r: RecordReader, name: str, required: bool) -> list[str]:
    value = r.record.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise r.error(name, "expected a list of strings")
    return [v for v in value if v.strip()]


def _rewrite(r: RecordReader) -> dict[str, Any]:
    rewrite = r.record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise r.error("requested_rewrite", "expected an object")
    out: dict[str, Any] = {}
    for key in ("prompt", "subject"):
        if not isinstance(rewrite.get(key), str) or not rewrite[key].strip():
            raise r.error(f"requested_rewrite.{key}", "expected a non-empty string")
        out[key] = rewrite[key]
    for key in ("target_new", "target_true"):
        value = rewrite.get(key)
        if not isinstance(value, dict) or not isinstance(value.get("str"), str) or not value["str"].strip():
            raise r.error(f"requested_rewrite.{key}.str", "expected a non-empty string")
        out[key] = value["str"]
    if out["prompt"].count("{}") != 1:
        raise r.error("requested_rewrite.prompt", f"expected one '{{}}' subject slot in {out['prompt']!r}")
    return out


def load_counterfact(path: Path | str, prefix: str) -> list[EditCase]:
    """Every record of a ROME-format CounterFact file as an ``EditCase`` with id ``<prefix>/<case_id>``."""
    cases = []
    seen: set[str] = set()
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        rewrite = _rewrite(r)
        template, subject = rewrite["prompt"], rewrite["subject"]
        new, true = rewrite["target_new"], rewrite["target_true"]
        locality = {"Neighborhood": tuple(Probe(p, true) for p in _strings(r, "neighborhood_prompts", True))}
        distracting = _strings(r, "distracting_neighborhood_prompts", False)
        if distracting:
            locality["Distracting_Neighborhood"] = tuple(Probe(p, true) for p in distracting)
        portability: dict[str, tuple[Probe, ...]] = {}
        extra = record.get("portability")
        if extra is not None:
            if not isinstance(extra, dict):
                raise r.error("portability", "expected an object")
            question, answer = extra.get("New Question"), extra.get("New Answer")
            if not isinstance(question, str) or not isinstance(answer, str):
                raise r.error("portability", "expected string fields 'New Question' and 'New Answer'")
            if question.strip() and answer.strip():
                portability["New_Question"] = (Probe(question, answer),)
        alternative = r.text("alternative_subject", required=False)
        if alternative and alternative.strip():
            portability["Subject_Replace"] = (Probe(template.format(alternative), new),)
        case_id = f"{prefix}/{record.get('case_id', i)}"
        if case_id in seen:
            raise DatasetError(f"{path}: record {i}: duplicate case_id {record.get('case_id')!r}")
        seen.add(case_id)
        cases.append(EditCase(
            case_id=case_id,
            prompt=template.format(subject),
            target=new,
            subject=subject,
            ground_truth=true,
            rephrases=tuple(_strings(r, "paraphrase_prompts", False)),
            portability=portability,
            locality=locality,
            raw=record,
        ))
    return cases
