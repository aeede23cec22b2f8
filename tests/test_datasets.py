"""Every benchmark of the paper: loaders on the shipped files, format detection, and malformed records."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from overtone.benchmarks import (
    BENCHMARKS,
    DATA_DIR,
    FORMATS,
    DatasetError,
    DatasetFormat,
    EditCase,
    detect_format,
    load_benchmark,
    register_format,
    resolve_dataset,
)
from overtone.benchmarks.knowedit import load_knowedit
from overtone.benchmarks.mend import load_counterfact_mend, load_zsre_mend
from overtone.benchmarks.mquake import MULTI_HOP, SINGLE_HOP, load_mquake

SHARED = Path("/work/shared/data")
WRITTEN_HERE = Path("facts/facts.jsonl")  # the one shipped file written for this project (SOURCES.md)

# name -> (records after loading, format)
EXPECTED = {
    "zsre": (1301, "knowedit"),
    "wikidata-recent": (570, "knowedit"),
    "wikidata-counterfact": (1428, "knowedit"),
    "wikibio": (306, "knowedit"),
    "zsre-mend": (998, "zsre-mend"),  # 1000 records, 2 with an empty new target
    "zsre-subject-replace": (293, "zsre-mend"),
    "zsre-inverse-relation": (385, "zsre-mend"),
    "counterfact-mend": (10000, "counterfact-mend"),
    "counterfact-mend-val": (1919, "counterfact-mend"),
    "mquake": (429, "mquake"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_benchmark_loads_and_is_detected_as_its_format(name):
    count, fmt = EXPECTED[name]
    bench = BENCHMARKS[name]
    cases = load_benchmark(name)
    assert len(cases) == count and bench.format == fmt
    assert detect_format(bench.file).name == fmt
    record = json.loads(bench.file.read_text())[0]
    assert [f.name for f in FORMATS.values() if f.detect(record)] == [fmt]  # detectors never overlap
    assert len({c.case_id for c in cases}) == len(cases) and cases[0].case_id.startswith(f"{name}/")
    sources = (DATA_DIR / "SOURCES.md").read_text()
    assert f"`{bench.file.relative_to(DATA_DIR)}`" in sources


def test_shipped_files_are_byte_identical_to_the_shared_copies():
    if not SHARED.is_dir():
        pytest.skip("the shared data directory is not on this machine")
    for bench in BENCHMARKS.values():
        if bench.file.relative_to(DATA_DIR) == WRITTEN_HERE:
            continue
        shared = SHARED / bench.file.relative_to(DATA_DIR)
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (bench.file, shared)]
        assert digest[0] == digest[1], bench.file


def test_wikidata_recent_has_no_ground_truth_and_keeps_aliases_and_forgetfulness():
    cases = load_benchmark("wikidata-recent")
    first = cases[0]
    assert (first.prompt, first.target, first.subject) == (
        "The gender of Ingrīda Amantova is", "female", "Ingrīda Amantova")
    assert first.ground_truth is None and first.rephrases == () and first.portability == {}
    citizenship = first.locality["Relation_Specificity"][1]
    assert citizenship.answer == "Soviet Union" and "USSR" in citizenship.aliases
    assert any("Forgetfulness" in c.locality for c in cases)
    assert {k for c in cases for k in c.portability} == {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}


def test_wikidata_counterfact_has_string_ground_truth_and_portability():
    first = load_benchmark("wikidata-counterfact", limit=1)[0]
    assert first.ground_truth == "France" and first.target == "Franche-Comté"
    assert first.portability["Subject_Aliasing"][0].prompt.startswith("The name of the country which Gorsedd")
    assert first.portability["Reasoning"][0].answer == "Besançon"


def test_wikibio_reads_text_labels_concept_and_has_only_rel_and_loc_probes():
    cases = load_benchmark("wikibio")
    first = cases[0]
    assert first.prompt.startswith("This is a Wikipedia passage about john russell reynolds.")
    assert first.target.startswith("He received general education from his father")
    assert first.subject == "john russell reynolds"
    assert all(not c.rephrases and not c.portability and c.locality for c in cases)
    assert first.locality["Relation_Specificity"][0].answer == "medicine"


def test_zsre_mend_format_and_its_portability_files(caplog):
    with caplog.at_level(logging.WARNING):
        cases = load_benchmark("zsre-mend")
    assert "skipped 2 record(s) with an empty 'alt'" in caplog.text
    assert "record(s) 535, 724 (case ids zsre-mend/534, zsre-mend/723)" in caplog.text
    assert "zsre-mend/534" not in {c.case_id for c in cases}  # ids keep the record index
    first = cases[0]
    assert (first.prompt, first.target, first.ground_truth) == (
        "What is the product made by UniFirst?", "unmanned aircraft", "uniform")
    assert first.rephrases == ("What will be the product of UniFirst?",)
    loc = first.locality["neighborhood"][0]
    assert loc.prompt == "nq question: john goodman's character in the big lebowski" and loc.answer == "Walter Sobchak"
    replaced = load_benchmark("zsre-subject-replace", limit=1)[0]
    assert replaced.portability["Subject_Replace"][0].prompt == "What is the constellation of UGC 6870?"
    assert replaced.portability["Subject_Replace"][0].answer == replaced.target == "Triangulum"
    assert replaced.locality == {}
    inverse = load_benchmark("zsre-inverse-relation", limit=1)[0]
    assert inverse.portability["Inverse_Relation"][0].prompt == "Who is Marian Clairmont's sister?"
    assert inverse.portability["Inverse_Relation"][0].answer == "Claire Clairmont"


def test_counterfact_mend_format():
    first = load_benchmark("counterfact-mend", limit=1)[0]
    assert (first.prompt, first.target, first.ground_truth, first.subject) == (
        "The mother tongue of Danielle Darrieux is", "English", "French", "Danielle Darrieux")
    assert first.rephrases == ("Where Danielle Darrieux is from, people speak the language of",)
    assert first.locality["neighborhood"][0].prompt == "Michel Rocard is a native speaker of"


def test_mquake_bundles_its_rewrites_in_order_with_hop_questions():
    case = load_benchmark("mquake", limit=1)[0]
    assert [e.prompt for e in case.requests] == [
        "Hey Jude was performed by", "The director of Madonna is", "Narendra Modi is a citizen of",
        "The official language of Australia is"]
    assert [e.target for e in case.requests] == ["Madonna", "Narendra Modi", "Australia", "Arabic"]
    assert case.requests[0].ground_truth == "The Beatles" and case.requests[0].case_id == "mquake/0/edit0"
    multi, single = case.portability[MULTI_HOP], case.portability[SINGLE_HOP]
    assert len(multi) == 3 and all(p.answer == "Arabic" and "Arabic language" in p.aliases for p in multi)
    assert single[0].prompt == "Who performed Hey Jude?"
    assert single[1].answer == "Narendra Modi" and "NaMo" in single[1].aliases
    assert (case.prompt, case.target, case.ground_truth) == (multi[0].prompt, "Arabic", "English")


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


MQUAKE = json.loads((DATA_DIR / "mquake" / "MQuAKE-hard.json").read_text())[0]


def test_mquake_tolerates_extra_keys_and_names_malformed_fields(tmp_path):
    extra = {**MQUAKE, "answer_extended": ["x"], "orig": {**MQUAKE["orig"], "anything": 1}}
    assert len(load_mquake(write(tmp_path, [extra]), "m")[0].requests) == 4
    broken = json.loads(json.dumps(MQUAKE))
    del broken["requested_rewrite"][1]["target_new"]["str"]
    path = write(tmp_path, [MQUAKE, broken])
    with pytest.raises(DatasetError, match=rf"{path}: record 2: field 'requested_rewrite\[1\].target_new.str'"):
        load_mquake(path, "m")
    no_slot = json.loads(json.dumps(MQUAKE))
    no_slot["requested_rewrite"][0]["prompt"] = "Who sang it?"
    with pytest.raises(DatasetError, match=r"record 1: field 'requested_rewrite\[0\].prompt': has no '\{\}' slot"):
        load_mquake(write(tmp_path, [no_slot]), "m")
    with pytest.raises(DatasetError, match=r"record 1: field 'new_single_hops': expected a non-empty list"):
        load_mquake(write(tmp_path, [{**MQUAKE, "new_single_hops": []}]), "m")


@pytest.mark.parametrize(("loader", "record", "field"), [
    (load_zsre_mend, {"src": "Q?", "alt": "A", "loc": "nq question: x"}, "loc_ans"),
    (load_zsre_mend, {"src": "", "alt": "A"}, "src"),
    (load_zsre_mend, {"src": "Q?", "alt": "A", "portability": {"New Question": "Q2?"}}, "portability.New Answer"),
    (load_zsre_mend, {"src": "Q?", "alt": "A", "inverse question": "Who?"}, "subject"),
    (load_counterfact_mend, {"prompt": "P", "target_new": "T", "locality_prompt": "L"}, "locality_ground_truth"),
    (load_knowedit, {"text": "passage", "concept": "c"}, "target_new"),
])
def test_malformed_records_name_file_index_and_field(tmp_path, loader, record, field):
    path = write(tmp_path, [record])
    with pytest.raises(DatasetError, match=rf"{path}: record 1: field '{field}'"):
        loader(path, "x")


def test_a_file_path_is_loaded_in_its_detected_format(tmp_path):
    bio = json.loads((DATA_DIR / "knowedit" / "WikiBio" / "benchmark_WikiBio_wikibio-test-all.json").read_text())
    path = write(tmp_path, bio[:3], name="my-bio.json")
    bench = resolve_dataset(str(path))
    assert (bench.name, bench.format, bench.file) == ("my-bio", "knowedit", path.resolve())
    cases = load_benchmark(str(path), limit=2, offset=1)
    assert [c.case_id for c in cases] == ["my-bio/1", "my-bio/2"] and cases[0].subject == bio[1]["concept"]


def test_unknown_format_lists_the_fields_and_the_known_formats(tmp_path):
    path = write(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"unknown dataset format; record 1 has the fields answer, "
                                           r"question\. Known formats: knowedit .*mquake"):
        load_benchmark(str(path))
    with pytest.raises(DatasetError, match="holds no records"):
        load_benchmark(str(write(tmp_path, [], name="empty.json")))


def test_a_new_format_is_one_register_call(tmp_path, monkeypatch):
    monkeypatch.setattr("overtone.benchmarks.FORMATS", dict(FORMATS))

    def load_qa(path, prefix):
        records = json.loads(path.read_text())
        return [EditCase(f"{prefix}/{i}", r["question"], r["answer"]) for i, r in enumerate(records)]

    register_format(DatasetFormat("qa", lambda r: {"question", "answer"} <= r.keys(), load_qa, "QA: question, answer"))
    cases = load_benchmark(str(write(tmp_path, [{"question": "Where is X?", "answer": "Paris"}], name="qa.json")))
    assert [(c.case_id, c.prompt, c.target) for c in cases] == [("qa/0", "Where is X?", "Paris")]
    path = write(tmp_path, [{"question": "q", "answer": "a", "prompt": "Where is X?", "target_new": "Paris"}])
    with pytest.raises(DatasetError, match=r"matches several formats \(knowedit, qa\)"):
        detect_format(path)  # overlapping detectors are refused, not silently ordered
