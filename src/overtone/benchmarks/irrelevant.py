"""Irrelevant sentences: text an edit must leave alone, for editors that train a router against it.

WISE's activation-margin loss pairs every edit with one sentence outside its scope. The WISE paper
and the reference toolkit take these from the ZsRE *train* split in MEND format, as
``loc + " " + loc_ans`` (a Natural Questions question and its answer); the shipped file is 1000
records of that split, disjoint from the KnowEdit ZsRE test cases that are evaluated.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from overtone.benchmarks.knowedit import DatasetError, RecordReader, read_json_records

ZSRE_TRAIN = Path(__file__).resolve().parent.parent / "data" / "zsre" / "zsre_mend_train-1k.json"


@cache
def load_irrelevant(path: Path | str = ZSRE_TRAIN) -> tuple[str, ...]:
    """Every record's ``loc + " " + loc_ans`` from a MEND-format ZsRE file."""
    sentences = []
    for i, record in enumerate(read_json_records(path)):
        r = RecordReader(path, i, record)
        sentences.append(f"{r.text('loc')} {r.text('loc_ans')}")
    if not sentences:
        raise DatasetError(f"{path}: no records")
    return tuple(sentences)
