"""MQuAKE records: several rewrites edited in order, then questions that chain the edited facts.

Schema: ``case_id, requested_rewrite[{prompt ("{}" = subject), relation_id, subject, target_new{str,id},
target_true{str,id}, question}], questions[3], answer, answer_alias[], new_answer, new_answer_alias[],
single_hops[{question, cloze, answer, answer_alias}], new_single_hops[...], orig{...}``. Other keys
(MQuAKE-T's ``answer_extended``, MQuAKE-hard's ``orig.edit_triples_idx``) are ignored.

One record is one ``EditCase`` that bundles its rewrites (``edits``, applied in order):

* each rewrite is a fact in cloze form, ``prompt.format(subject)`` -> ``target_new.str``, which
  the teacher-forced Rel. scores;
* ``portability["Single_Hop"]``: the hops of the chain after editing (``new_single_hops``), each
  answered by its new answer with aliases;
* ``portability["Multi_Hop"]``: the (three) paraphrases of the chained question, answered by
  ``new_answer`` with ``new_answer_alias``;
* ``prompt``/``target`` of the case itself: the first chained question and the new answer.

The generation-based scoring of the hops (the paper's Appendix B.2) is in ``evaluation/generation.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.counterfact import read_rewrite
from overtone.benchmarks.knowedit import RecordReader, read_json_records

SINGLE_HOP = "Single_Hop"
MULTI_HOP = "Multi_Hop"


def is_mquake(record: dict[str, Any]) -> bool:
    return isinstance(record.get("requested_rewrite"), list) and "questions" in record


def _answers(r: RecordReader, answer: str, aliases: str) -> tuple[str, tuple[str, ...]]:
    main = r.text(answer)
    extra = r.answers(aliases, r.record.get(aliases))
    return main, tuple(a for a in extra if a != main)


def load_mquake(path: Path | str, prefix: str) -> list[EditCase]:
    """Every MQuAKE record as one ``EditCase`` with id ``<prefix>/<index>``; its rewrites are ``edits``."""
    cases = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        case_id = f"{prefix}/{i}"
        edits = tuple(read_rewrite(rw, f"{case_id}/edit{j}") for j, rw in enumerate(r.items("requested_rewrite")))
        new_answer, new_aliases = _answers(r, "new_answer", "new_answer_alias")
        multi = tuple(Probe(q, new_answer, new_aliases) for q in r.answers("questions", record.get("questions")))
        if not multi:
            raise r.error("questions", "expected a non-empty list of questions")
        single = []
        for hop in r.items("new_single_hops"):
            answer, aliases = _answers(hop, "answer", "answer_alias")
            single.append(Probe(hop.text("question"), answer, aliases))
        cases.append(EditCase(
            case_id=case_id, prompt=multi[0].prompt, target=new_answer,
            ground_truth=r.text("answer", required=False),
            portability={SINGLE_HOP: tuple(single), MULTI_HOP: multi}, raw=record, edits=edits,
        ))
    return cases
