"""The ZsRE loader: typed cases from real records, and clear errors on malformed ones."""

from __future__ import annotations

import json

import pytest

from overtone.benchmarks import BENCHMARKS, DatasetError, load_benchmark
from overtone.benchmarks.knowedit import load_knowedit


def test_zsre_test_set_is_complete_and_typed():
    cases = load_benchmark("zsre")
    assert len(cases) == 1301
    first = cases[0]
    assert first.case_id == "zsre/0"
    assert first.prompt == "Which family does Epaspidoceras belong to?"
    assert first.target == "Noctuidae" and first.subject == "Epaspidoceras"
    assert first.ground_truth == "Aspidoceratidae"
    assert first.rephrases == ("What family are Epaspidoceras?",)
    assert first.portability["Reasoning"][0].answer == "Owlet moths"
    assert [p.answer for p in first.locality["Relation_Specificity"]] == ["genus", "genus"]
    assert all(c.locality and c.rephrases and c.portability for c in cases)


def test_offset_and_limit_select_a_slice():
    cases = load_benchmark("zsre", limit=3, offset=1000)
    assert [c.case_id for c in cases] == ["zsre/1000", "zsre/1001", "zsre/1002"]
    with pytest.raises(DatasetError, match=r"unknown dataset 'zsre2': neither a benchmark name \(available: .*zsre"):
        load_benchmark("zsre2")


def write(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


GOOD = {"subject": "X", "prompt": "Where is X?", "target_new": "Paris", "ground_truth": ["Rome"],
        "rephrase_prompt": "X is located where?",
        "portability": {"Reasoning": [{"prompt": "Q1", "ground_truth": [["Alias A", "Alias B"], ["C"]]},
                                      {"prompt": "Q2", "ground_truth": []}]},
        "locality": {"Relation_Specificity": [{"prompt": "L1", "ground_truth": "yes"}]}}


def test_nested_answers_are_flattened_and_empty_probes_dropped(tmp_path):
    (case,) = load_knowedit(write(tmp_path, [GOOD]), prefix="x")
    (probe,) = case.portability["Reasoning"]
    assert probe.answer == "Alias A" and probe.aliases == ("Alias B", "C")
    assert case.locality["Relation_Specificity"][0].answer == "yes"


@pytest.mark.parametrize(("change", "field"), [
    ({"target_new": ""}, "target_new"),
    ({"target_new": None}, "target_new"),
    ({"prompt": 3}, "prompt"),
    ({"portability": [1, 2]}, "portability"),
    ({"portability": {"Reasoning": "text"}}, "portability.Reasoning"),
    ({"locality": {"Relation_Specificity": [{"ground_truth": "a"}]}}, r"locality.Relation_Specificity\[0\]"),
    ({"locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": 5}]}},
     r"locality.Relation_Specificity\[0\].ground_truth"),
])
def test_malformed_record_names_file_index_and_field(tmp_path, change, field):
    path = write(tmp_path, [GOOD, {**GOOD, **change}])
    with pytest.raises(DatasetError, match=rf"{path}: record 2: field '{field}'"):
        load_knowedit(path, prefix="x")


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_knowedit(bad_json, prefix="x")
    with pytest.raises(DatasetError, match="expected a JSON array"):
        load_knowedit(write(tmp_path, {"a": 1}), prefix="x")
    with pytest.raises(DatasetError, match="record 1: expected a JSON object"):
        load_knowedit(write(tmp_path, ["text"]), prefix="x")


def test_shipped_files_have_their_origin_documented():
    sources = (BENCHMARKS["zsre"].file.parents[2] / "SOURCES.md").read_text()
    assert "ZsRE-test-all.json" in sources and "5d49c472bd4b8447a70d276fb577d28088588e62" in sources
