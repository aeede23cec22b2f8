"""CounterFact in the ROME format, read into ``EditCase``s.

One record: ``case_id, requested_rewrite{prompt ("{}" = subject slot), subject, target_new{str},
target_true{str}}, paraphrase_prompts, neighborhood_prompts, ...`` plus, in the portability and
locality releases of the reference toolkit, ``portability{New Question, New Answer}``,
``distracting_neighborhood_prompts`` or ``alternative_subject``. The mapping:

* prompt = ``requested_rewrite.prompt`` with the subject filled in; target = ``target_new.str``;
  ground truth = ``target_true.str``; rephrases = ``paraphrase_prompts``;
* locality ``neighborhood`` (the kind name of the MEND-format loaders): the neighbourhood prompts
  (other subjects that share the true attribute), teacher-forced on ``target_true`` and scored as
  pre/post agreement; where present, the same for ``Distracting_Neighborhood`` (the edited fact
  stated before a neighbourhood prompt);
* portability ``One_Hop`` (``New Question``, answered with ``New Answer``, as in the MEND-format
  portability files) and ``Subject_Replace`` (the edit prompt with the alternative subject, answered
  with the new target).

MQuAKE's rewrites use the same ``requested_rewrite`` object, so ``read_rewrite`` serves both loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.knowedit import RecordReader, read_json_records
from overtone.benchmarks.mend import LOCALITY_KIND

DISTRACTING_KIND = "Distracting_Neighborhood"


def is_counterfact_rome(record: dict[str, Any]) -> bool:
    return isinstance(record.get("requested_rewrite"), dict)


def read_rewrite(r: RecordReader, case_id: str) -> EditCase:
    """A ``requested_rewrite`` object as a bare case: ``prompt.format(subject)`` -> ``target_new.str``."""
    template, subject = r.text("prompt"), r.text("subject")
    if "{}" not in template:
        raise r.error("prompt", f"has no '{{}}' slot for the subject: {template!r}")
    return EditCase(
        case_id=case_id, prompt=template.replace("{}", subject), target=r.nested("target_new").text("str"),
        subject=subject, ground_truth=r.nested("target_true").text("str", required=False),
    )


def _prompts(r: RecordReader, name: str, required: bool) -> list[str]:
    value = r.record.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise r.error(name, "expected a list of strings")
    return [v for v in value if v.strip()]


def load_counterfact_rome(path: Path | str, prefix: str) -> list[EditCase]:
    """Every record of a ROME-format CounterFact file as an ``EditCase`` with id ``<prefix>/<index>``."""
    cases = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        rewrite = r.nested("requested_rewrite")
        fact = read_rewrite(rewrite, f"{prefix}/{i}")
        true = rewrite.nested("target_true").text("str")  # the neighbourhood prompts' answer
        locality = {LOCALITY_KIND: tuple(Probe(p, true) for p in _prompts(r, "neighborhood_prompts", True))}
        distracting = _prompts(r, "distracting_neighborhood_prompts", False)
        if distracting:
            locality[DISTRACTING_KIND] = tuple(Probe(p, true) for p in distracting)
        portability: dict[str, tuple[Probe, ...]] = {}
        if "portability" in record:
            hop = r.nested("portability")
            portability["One_Hop"] = (Probe(hop.text("New Question"), hop.text("New Answer")),)
        alternative = r.text("alternative_subject", required=False)
        if alternative and alternative.strip():
            template = rewrite.text("prompt")
            portability["Subject_Replace"] = (Probe(template.replace("{}", alternative), fact.target),)
        cases.append(EditCase(
            case_id=fact.case_id, prompt=fact.prompt, target=fact.target, subject=fact.subject,
            ground_truth=true, rephrases=tuple(_prompts(r, "paraphrase_prompts", False)),
            portability=portability, locality=locality, raw=record,
        ))
    return cases
