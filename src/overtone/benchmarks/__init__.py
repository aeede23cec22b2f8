"""Benchmarks: named datasets shipped with the package, and files in a known format, read into ``EditCase``s.

Two registries:

* ``FORMATS``: a file format is a loader plus a detector that recognises one of its records by its
  fields. Adding a format is a loader module and one ``register_format`` call; ``--dataset`` then
  accepts any file in that format.
* ``BENCHMARKS``: a named benchmark is a shipped file in a registered format, one ``register`` call.

Origins and licences of the shipped files are in ``overtone/data/SOURCES.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from overtone.benchmarks.cases import EditCase, Probe
from overtone.benchmarks.counterfact import is_counterfact_rome, load_counterfact_rome
from overtone.benchmarks.facts import is_facts, load_facts
from overtone.benchmarks.knowedit import DatasetError, is_knowedit, load_knowedit, read_json_records
from overtone.benchmarks.mend import is_counterfact_mend, is_zsre_mend, load_counterfact_mend, load_zsre_mend
from overtone.benchmarks.mquake import is_mquake, load_mquake

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
log = logging.getLogger(__name__)

# How a benchmark's cases are scored (evaluation/): teacher-forced Rel./Gen./Por./Loc., or MQuAKE's
# teacher-forced Rel. plus generated answers to single- and multi-hop questions (paper App. B.2).
TEACHER_FORCED = "teacher-forced"
MQUAKE_GENERATION = "mquake-generation"


@dataclass(frozen=True)
class DatasetFormat:
    """A file format: ``detect`` recognises one record by its fields, ``load(path, prefix)`` reads a file."""

    name: str
    detect: Callable[[dict], bool]
    load: Callable[[Path, str], list[EditCase]]
    description: str
    evaluation: str = TEACHER_FORCED


@dataclass(frozen=True)
class Benchmark:
    """A dataset file with its loader (case ids ``<name>/<index>``) and how its cases are scored."""

    name: str
    file: Path
    loader: Callable[[Path], list[EditCase]]
    description: str
    evaluation: str = TEACHER_FORCED
    format: str | None = None


FORMATS: dict[str, DatasetFormat] = {}
BENCHMARKS: dict[str, Benchmark] = {}


def register_format(fmt: DatasetFormat) -> None:
    FORMATS[fmt.name] = fmt


def register(benchmark: Benchmark) -> None:
    BENCHMARKS[benchmark.name] = benchmark


def benchmark_from_format(name: str, file: Path, format_name: str, description: str) -> Benchmark:
    """A benchmark reading ``file`` with a registered format; case ids are ``<name>/<index>``."""
    fmt = FORMATS[format_name]
    return Benchmark(name=name, file=file, loader=partial(fmt.load, prefix=name), description=description,
                     evaluation=fmt.evaluation, format=fmt.name)


register_format(DatasetFormat(
    "knowedit", is_knowedit, load_knowedit,
    "KnowEdit (ZsRE, WikiData_recent, WikiData_counterfact, WikiBio): prompt/target_new or text/labels, "
    "portability{...}, locality{...}"))
register_format(DatasetFormat(
    "zsre-mend", is_zsre_mend, load_zsre_mend, "ZsRE in the MEND format: src, alt, rephrase, loc, loc_ans"))
register_format(DatasetFormat(
    "counterfact-mend", is_counterfact_mend, load_counterfact_mend,
    "CounterFact in the MEND/EasyEdit format: prompt, target_new, rephrase_prompt, locality_prompt"))
register_format(DatasetFormat(
    "counterfact-rome", is_counterfact_rome, load_counterfact_rome,
    "CounterFact in the ROME format: requested_rewrite{prompt, subject, target_new, target_true}, "
    "paraphrase_prompts, neighborhood_prompts"))
register_format(DatasetFormat(
    "mquake", is_mquake, load_mquake, "MQuAKE: requested_rewrite[...], questions, new_answer, new_single_hops",
    evaluation=MQUAKE_GENERATION))
register_format(DatasetFormat(
    "facts", is_facts, load_facts,
    "hand-written facts (JSON, JSON Lines or CSV): prompt, target, optional subject, paraphrases, locality, id"))

for _name, _file, _format, _description in (
    ("zsre", "knowedit/ZsRE/ZsRE-test-all.json", "knowedit",
     "KnowEdit ZsRE test (1301 records): rephrase, Reasoning/Subject_Aliasing/Logical_Generalization "
     "portability, Relation_Specificity locality"),
    ("wikidata-recent", "knowedit/wiki_recent/benchmark_wiki_recent_recent_train.json", "knowedit",
     "KnowEdit WikiData_recent train split (570 records): new facts, portability, Relation_Specificity/"
     "Forgetfulness locality; no rephrase"),
    ("wikidata-counterfact", "knowedit/wiki_counterfact/benchmark_wiki_counterfact_train_cf.json", "knowedit",
     "KnowEdit WikiData_counterfact train split (1428 records): portability, Relation_Specificity/Forgetfulness "
     "locality; no rephrase"),
    ("wikibio", "knowedit/WikiBio/benchmark_WikiBio_wikibio-test-all.json", "knowedit",
     "KnowEdit WikiBio test (306 records): a passage's next sentence as the target; Rel. and Loc. only"),
    ("zsre-mend", "zsre/zsre_mend_train-1k.json", "zsre-mend",
     "ZsRE, MEND format, 1000 records of the train split: rephrase, NQ locality"),
    ("zsre-subject-replace", "zsre/zsre_subject_replace.json", "zsre-mend",
     "ZsRE portability file (293 records): the question with the subject replaced by an alias"),
    ("zsre-inverse-relation", "zsre/zsre_inverse_relation.json", "zsre-mend",
     "ZsRE portability file (385 records): the inverse question, answered by the subject"),
    ("counterfact-mend", "counterfact/counterfact-edit.json", "counterfact-mend",
     "CounterFact, MEND/EasyEdit format, edit split (10000 records): rephrase, one locality prompt"),
    ("counterfact-mend-val", "counterfact/counterfact-val.json", "counterfact-mend",
     "CounterFact, MEND/EasyEdit format, val split (1919 records), for tuning"),
    ("counterfact", "counterfact/counterfact_distracting_neighbor.json", "counterfact-rome",
     "CounterFact, ROME format, the toolkit's distracting-neighbour release (804 records): paraphrases, "
     "New Question portability, neighbourhood and distracting-neighbourhood locality"),
    ("counterfact-subject-replace", "counterfact/counterfact_subject_replace.json", "counterfact-rome",
     "CounterFact, ROME format, the toolkit's subject-replace release (213 records): paraphrases, "
     "Subject_Replace portability, neighbourhood locality"),
    ("mquake", "mquake/MQuAKE-hard.json", "mquake",
     "MQuAKE-hard (429 records, 4 rewrites and 4 hops each): single- and multi-hop questions, generation-based"),
    ("example-facts", "facts/facts.jsonl", "facts",
     "3 hand-written counterfactual facts (JSON Lines): the example of overtone edit --facts"),
):
    register(benchmark_from_format(_name, DATA_DIR / _file, _format, _description))


def detect_format(path: Path | str) -> DatasetFormat:
    """The registered format whose detector accepts the first record of ``path``."""
    records = read_json_records(path)
    if not records:
        raise DatasetError(f"{path}: the file holds no records")
    first = records[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}: record 1: expected a JSON object, got {type(first).__name__}")
    matches = [fmt for fmt in FORMATS.values() if fmt.detect(first)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DatasetError(f"{path}: record 1 matches several formats ({', '.join(m.name for m in matches)})")
    known = "; ".join(f"{fmt.name} ({fmt.description})" for fmt in FORMATS.values())
    raise DatasetError(
        f"{path}: unknown dataset format; record 1 has the fields {', '.join(sorted(first))}. "
        f"Known formats: {known}"
    )


def resolve_dataset(dataset: str) -> Benchmark:
    """A registered benchmark name, or a path to a file in a registered format (detected from its fields)."""
    if dataset in BENCHMARKS:
        return BENCHMARKS[dataset]
    path = Path(dataset).expanduser()
    if path.is_file():
        fmt = detect_format(path)
        return benchmark_from_format(path.stem, path.resolve(), fmt.name, f"{path} ({fmt.name} format)")
    raise DatasetError(
        f"unknown dataset {dataset!r}: neither a benchmark name (available: {', '.join(sorted(BENCHMARKS))}) "
        "nor an existing file"
    )


def load_benchmark(name: str, limit: int | None = None, offset: int = 0) -> list[EditCase]:
    """Cases ``offset .. offset+limit-1`` of a benchmark name or dataset file (all from ``offset`` when no limit).

    A ``limit`` beyond the cases there are gives those cases, with a notice; an ``offset`` past the last case
    is an error (a run of no cases is never what was meant)."""
    if offset < 0 or (limit is not None and limit < 1):
        raise DatasetError(f"offset must be >= 0 and limit >= 1 (got offset={offset}, limit={limit})")
    bench = resolve_dataset(name)
    cases = bench.loader(bench.file)
    if offset >= len(cases):
        raise DatasetError(f"dataset {name!r} has {len(cases)} cases, so none from --offset {offset}")
    chosen = cases[offset:None if limit is None else offset + limit]
    if limit is not None and len(chosen) < limit:
        log.warning("--limit %d: dataset %r has %d cases from --offset %d; running those %d", limit, name,
                    len(chosen), offset, len(chosen))
    return chosen


__all__ = [
    "BENCHMARKS",
    "FORMATS",
    "MQUAKE_GENERATION",
    "TEACHER_FORCED",
    "Benchmark",
    "DatasetError",
    "DatasetFormat",
    "EditCase",
    "Probe",
    "benchmark_from_format",
    "detect_format",
    "load_benchmark",
    "register",
    "register_format",
    "resolve_dataset",
]
