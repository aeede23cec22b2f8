"""The CounterFact loader (ROME format): typed cases from the two shipped releases, format detection, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overtone.benchmarks import BENCHMARKS, DatasetError, detect_format, load_benchmark
from overtone.benchmarks.counterfact import load_counterfact_rome

SHARED = Path("/work/shared/data/counterfact")


def test_distracting_neighbor_release():
    cases = load_benchmark("counterfact")
    assert len(cases) == 804
    first = cases[0]
    assert first.case_id == "counterfact/0" and first.raw["case_id"] == 4482
    assert first.prompt == "Spike Hughes originates from" and first.subject == "Spike Hughes"
    assert first.target == "Philadelphia" and first.ground_truth == "London"
    assert first.rephrases[1] == "Amateur Athletic Union (AAU). Spike Hughes was born in"
    (question,) = first.portability["One_Hop"]
    assert question.answer == "Cheesesteaks" and question.prompt.startswith("What famous food")
    neighbours = first.locality["neighborhood"]
    assert len(neighbours) == 10 and neighbours[0].prompt == "Max Mosley originates from"
    assert {p.answer for p in neighbours} == {"London"}  # the true attribute, teacher-forced
    distracting = first.locality["Distracting_Neighborhood"]
    assert distracting[0].prompt == "Spike Hughes originates from Philadelphia. Max Mosley originates from"
    assert all(c.subject in c.prompt and len(c.rephrases) == 2 for c in cases)


def test_subject_replace_release():
    cases = load_benchmark("counterfact-subject-replace")
    assert len(cases) == 213
    first = cases[0]
    assert first.case_id == "counterfact-subject-replace/0" and first.prompt == "May Wright Sewall passed away in"
    (replaced,) = first.portability["Subject_Replace"]
    assert replaced.prompt == "Mary Eliza Wright passed away in" and replaced.answer == "Birmingham"
    assert set(first.locality) == {"neighborhood"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's data folder is not on this machine")
@pytest.mark.parametrize("name", ["counterfact", "counterfact-subject-replace"])
def test_shipped_files_are_byte_copies(name):
    shipped = BENCHMARKS[name].file
    assert shipped.read_bytes() == (SHARED / shipped.name).read_bytes()
    sources = (shipped.parents[1] / "SOURCES.md").read_text()
    assert shipped.name in sources


RECORD = {"case_id": 7, "requested_rewrite": {"prompt": "{} plays", "subject": "X", "target_new": {"str": "jazz"},
                                              "target_true": {"str": "rock"}},
          "paraphrase_prompts": ["X is known for playing"], "neighborhood_prompts": ["Y plays"]}


@pytest.mark.parametrize(("change", "field"), [
    ({"requested_rewrite": "x"}, "requested_rewrite"),
    ({"requested_rewrite": {**RECORD["requested_rewrite"], "prompt": "plays"}}, "requested_rewrite.prompt"),
    ({"requested_rewrite": {**RECORD["requested_rewrite"], "target_new": {"str": " "}}},
     "requested_rewrite.target_new.str"),
    ({"neighborhood_prompts": "Y plays"}, "neighborhood_prompts"),
    ({"portability": {"New Question": 3, "New Answer": "a"}}, "portability.New Question"),
])
def test_malformed_records_name_file_index_and_field(tmp_path, change, field):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([RECORD, {**RECORD, "case_id": 8, **change}]))
    with pytest.raises(DatasetError, match=rf"{path}: record 2: field '{field}'"):
        load_counterfact_rome(path, prefix="cf")


def test_a_rome_format_file_is_detected_and_loaded_by_path(tmp_path):
    path = tmp_path / "my_cf.json"
    path.write_text(json.dumps([RECORD, {**RECORD, "case_id": 8}]))
    assert detect_format(path).name == "counterfact-rome"
    cases = load_benchmark(str(path), offset=1)
    assert [c.case_id for c in cases] == ["my_cf/1"] and cases[0].prompt == "X plays" and cases[0].target == "jazz"
    assert cases[0].locality["neighborhood"][0].answer == "rock"
