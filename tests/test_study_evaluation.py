"""Study cells with the evaluation options: what enters a cell's id, which cells edit side by side, the
precheck of every record before a model loads, and what the cells store."""

from __future__ import annotations

import pytest
import yaml
from helpers import said
from test_checks import dataset
from test_parallel import assert_same_records
from test_study import spec
from typer.testing import CliRunner

from overtone.cli import app
from overtone.runner import read_run
from overtone.study import StudyError, load_study
from overtone.study.driver import DONE, Scheduler, run_study
from overtone.study.executors import ExecutorOptions, LocalExecutor

runner = CliRunner()


def ids(**fixed):
    return [c.id for c in load_study(spec("m", fixed=fixed)).cells]


def test_ids_change_with_the_wild_evaluation_and_the_ability_check_but_not_with_parallel():
    plain = ids()
    assert plain == ids(evaluation="teacher-forced", eval_context="bare", ability=False)  # the defaults
    assert plain == ids(parallel=3) == ids(parallel="auto")  # the results of one case at a time
    changed = [ids(evaluation="wild"), ids(evaluation="both"), ids(evaluation="wild", eval_context="qa"),
               ids(ability=True)]
    for other in changed:
        assert not set(other) & set(plain)
    assert len({tuple(other) for other in changed}) == len(changed)


def test_ability_every_enters_the_id_only_when_set_and_stays_below_the_sequence_length():
    at_chunk_end = ids(sequence=4, ability=True)
    assert at_chunk_end == ids(sequence=4, ability=True, ability_every=0)
    curve = ids(sequence=4, ability_every=2)  # implies the ability check
    assert curve == ids(sequence=4, ability=True, ability_every=2) and not set(curve) & set(at_chunk_end)
    assert {c.ability_every for c in load_study(spec("m", fixed={"sequence": 4, "ability_every": 2})).cells} == {2}
    with pytest.raises(StudyError, match="ability_every 4 measures within a chunk of T = 4 edits"):
        ids(sequence=4, ability_every=4)
    with pytest.raises(StudyError, match="ability_every must be >= 0"):
        ids(sequence=4, ability_every=-1)


def test_a_study_measures_the_ability_curve_with_ability_every(tiny_llama_dir, tmp_path):
    file = tmp_path / "curve.yaml"
    file.write_text(yaml.safe_dump(spec(tiny_llama_dir, fixed={"limit": 2, "sequence": 2},
                                        axes={"editor": ["ft-m"], "variant": ["ce"], "seed": [0]},
                                        editors={"ft-m": {"settings": {"layer": 2, "steps": 2}}})))
    result = runner.invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "out"), "--ability-every", "1"])
    assert result.exit_code == 0, result.output
    (cell,) = load_study(file, overrides={"ability_every": 1}).cells
    config, records, _ = read_run(tmp_path / "out" / cell.name)
    assert config["ability"]["every"] == 1
    assert [p["edits"] for p in records[0]["ability_curve"]] == [1, 2]


def test_only_single_editing_cells_of_editors_that_can_edit_side_by_side_get_parallel():
    study = load_study(spec("m", fixed={"parallel": 3}, axes={"editor": ["ft-m", "wise", "melo"], "variant": ["ce"],
                                                               "seed": [0], "sequence": [1, 2]}))
    side_by_side = {(c.editor, c.sequence): c.parallel for c in study.cells}
    assert side_by_side == {("ft-m", 1): 3, ("ft-m", 2): 1, ("wise", 1): 1, ("wise", 2): 1, ("melo", 1): 1,
                            ("melo", 2): 1}


def test_a_parallel_study_stores_the_records_of_one_case_at_a_time(tiny_llama_dir, tmp_path):
    raw = spec(tiny_llama_dir, fixed={"limit": 5}, axes={"editor": ["ft-m"], "variant": ["ce", "overtone"],
                                                          "seed": [0]},
               editors={"ft-m": {"settings": {"layer": 2, "lr": 0.2, "steps": 4}}})
    one = load_study(raw)
    three = load_study({**raw, "fixed": {**raw["fixed"], "parallel": 3}})
    assert [c.id for c in three.cells] == [c.id for c in one.cells] and {c.parallel for c in three.cells} == {3}
    # a shard of a parallel cell holds PARALLEL_WINDOW groups of 3 (all 5 cases here), else shard_size cases
    assert [len(t.case_ids) for t in Scheduler(three, tmp_path / "plan3", 4).cells[three.cells[0].id].queue] == [5]
    assert [len(t.case_ids) for t in Scheduler(one, tmp_path / "plan1", 4).cells[one.cells[0].id].queue] == [4, 1]

    assert {s.status for s in run_study(one, tmp_path / "one", LocalExecutor(ExecutorOptions())).cells.values()} \
        == {DONE}
    file = tmp_path / "three.yaml"
    file.write_text(yaml.safe_dump({**raw, "fixed": {**raw["fixed"], "parallel": 3}}))
    result = runner.invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "three")])
    assert result.exit_code == 0, result.output
    for cell in one.cells:
        config, records, _ = read_run(tmp_path / "one" / cell.name)
        config3, records3, _ = read_run(tmp_path / "three" / cell.name)
        assert (config["parallel"], config3["parallel"]) == (1, 3)
        assert {**config, "parallel": 3} == config3
        assert_same_records(records, records3)
        assert len(records3) == 5 and all(r["steps"] == 4 for r in records3)


@pytest.mark.parametrize(("editor", "change", "message"), [
    ("rome", lambda r: r[2].update(subject="Nobody In Particular"),
     "case data/2: subject 'Nobody In Particular' does not occur in the prompt"),
    ("ft-m", lambda r: r[1].update(target_new="a very long answer " * 330), "case data/1: prompt + target has"),
])
def test_study_run_refuses_a_bad_record_before_any_model_loads(tmp_path, tokenizer_only, monkeypatch, editor,
                                                                change, message):
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({
        "name": "bad", "fixed": {"model": str(tokenizer_only), "device": "cpu", "dataset": dataset(tmp_path, change),
                                 "editor": editor, "variant": ["ce"]}}))
    result = runner.invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in said(result)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # no statistics, no run directory


def test_a_wild_study_stores_the_wild_metrics_of_every_case(tiny_llama_dir, tmp_path):
    study = load_study(spec(tiny_llama_dir, fixed={"limit": 2, "evaluation": "wild"},
                            axes={"editor": ["ft-m"], "variant": ["ce"], "seed": [0]},
                            editors={"ft-m": {"settings": {"layer": 2, "steps": 2}}}))
    scheduler = run_study(study, tmp_path / "out", LocalExecutor(ExecutorOptions()))
    assert {s.status for s in scheduler.cells.values()} == {DONE}
    _, records, summary = read_run(tmp_path / "out" / study.cells[0].name)
    assert len(records) == 2
    for record in records:
        assert set(record["wild"]) >= {"pre", "post"} and "rel" in record["wild"]["post"]
    assert "wild" in summary


def test_study_run_refuses_bundled_cases_in_a_parallel_cell_before_any_model_loads(tmp_path, tokenizer_only):
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({
        "name": "bundles", "fixed": {"model": str(tokenizer_only), "device": "cpu", "dataset": "mquake", "limit": 2,
                                     "editor": "ft-m", "variant": ["ce"], "parallel": 2}}))
    result = runner.invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "bundles 4 edits applied in order (MQuAKE)" in said(result)
    assert not (tmp_path / "out").exists()
