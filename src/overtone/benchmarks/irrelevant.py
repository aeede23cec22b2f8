"""Irrelevant sentences: text an edit must leave alone, for editors that train a router against it.

WISE's activation-margin loss pairs every edit with one sentence outside its scope. The WISE paper
and the reference toolkit take these from the ZsRE *train* split in MEND format, as
``loc + " " + loc_ans`` (a Natural Questions question and its answer): here the locality probes of
the ``zsre-mend`` benchmark (1000 train records, disjoint from the KnowEdit ZsRE test). Any dataset
name or file with locality probes works the same way.
"""

from __future__ import annotations

from functools import cache

from overtone.benchmarks import DatasetError, load_benchmark

DEFAULT_SOURCE = "zsre-mend"


@cache
def load_irrelevant(source: str = DEFAULT_SOURCE) -> tuple[str, ...]:
    """``prompt + " " + answer`` of every locality probe of a benchmark name or dataset file."""
    sentences = tuple(f"{p.prompt} {p.answer}" for case in load_benchmark(source)
                      for probes in case.locality.values() for p in probes)
    if not sentences:
        raise DatasetError(f"{source}: no locality probes to use as irrelevant sentences")
    return sentences
