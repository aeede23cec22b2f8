"""Parallel single editing: every case gets the steps, stop and metrics it gets when edited alone.

The contract is equivalence up to floating-point summation order (a batched product sums in another
order than a single one). The tolerances, stated once here:

* losses at every pass: relative 2e-5 (absolute 1e-6 near 0);
* probabilities of every probe's answer tokens after the edit: absolute 1e-5;
* step counts, stop reasons and every other field of the records: equal (floats, e.g. the general
  ability's perplexity, within the loss tolerance; a changed argmax prediction moves a metric by a whole
  token's share, far beyond it).

Every test runs on tiny random models of every supported architecture (tests/helpers.py ARCHS), with
stop thresholds under which the cases stop at different steps, and with B = 3 over 5 cases (odd, not
a divisor of the case count, so the last group is short).
"""

from __future__ import annotations

import pytest
import torch
from helpers import ARCHS, RUN_VARYING, assert_same_state, said, state, tiny_model
from typer.testing import CliRunner

from overtone.benchmarks import EditCase
from overtone.cli import app
from overtone.editors import FTM, MEMIT, ROME, EditError, FTMConfig, LoRA, LoRAConfig, MEMITConfig, ROMEConfig
from overtone.evaluation import Evaluator
from overtone.objectives import CrossEntropy, OverTone, OverToneConfig
from overtone.runner import ResultStore, read_run, run_continual

LOSS_TOL = dict(rel=2e-5, abs=1e-6)
PROB_TOL = 1e-5
B = 3


def answer_probs(evaluator: Evaluator, case) -> torch.Tensor:
    """Probability of each answer token of every probe of ``case`` under the model as it runs now."""
    probes = evaluator.probes(case)
    out = evaluator.answer_logits(probes)
    labels = probes.batch.labels[probes.batch.label_mask]
    return torch.softmax(out.logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def sequential(editor, evaluator, cases, budgets=None):
    """Per case: (stats, answer probabilities after the edit), each edited alone and reverted."""
    out = []
    for i, case in enumerate(cases):
        handle = editor.edit([case], steps=None if budgets is None else budgets[i])
        out.append((handle.stats, answer_probs(evaluator, case)))
        handle.revert()
    return out


def parallel(editor, evaluator, cases, budgets=None):
    """The same through ``edit_parallel`` in groups of B; probabilities read with each case's edit on its rows."""
    out = []
    for first in range(0, len(cases), B):
        group = cases[first: first + B]
        edits = editor.edit_parallel(group, steps=None if budgets is None else budgets[first: first + B])
        for i, case in enumerate(group):
            with edits.only(i):
                out.append((edits.stats[i], answer_probs(evaluator, case)))
    return out


def spread_threshold(editor, evaluator, cases, at: int = 4) -> float:
    """A loss threshold that the cases cross at different passes: the middle case's loss at pass ``at`` of
    an unstopped run, moved to the middle of the gap to the nearest other loss of any case and pass, so no
    loss lies within summation noise of it."""
    runs = [s.losses for s, _ in sequential(editor, evaluator, cases)]
    middle = sorted(r[min(at, len(r) - 1)] for r in runs)[len(runs) // 2]
    others = sorted({x for r in runs for x in r} - {middle})
    below = max((x for x in others if x < middle), default=middle - 1.0)
    return (below + middle) / 2


def assert_equivalent(seq, par):
    for (s, p_seq), (q, p_par) in zip(seq, par, strict=True):
        assert (q.steps, q.stopped_early, q.stop_reason) == (s.steps, s.stopped_early, s.stop_reason)
        assert q.losses == pytest.approx(s.losses, **LOSS_TOL)
        assert q.extra_losses == pytest.approx(s.extra_losses, **LOSS_TOL)
        assert torch.allclose(p_par, p_seq, atol=PROB_TOL, rtol=0), (p_par - p_seq).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_ftm_parallel_equals_sequential(arch, tokenizer, zsre_cases):
    lm = tiny_model(arch, tokenizer)
    before = state(lm)
    cases = zsre_cases[:5]
    evaluator = Evaluator(lm)
    free = FTM(lm, FTMConfig(layer=2, lr=0.2, steps=12, stop_loss=0.0), CrossEntropy())
    editor = FTM(lm, FTMConfig(layer=2, lr=0.2, steps=12, stop_loss=spread_threshold(free, evaluator, cases)),
                 CrossEntropy())
    seq = sequential(editor, evaluator, cases)
    assert len({s.steps for s, _ in seq}) > 1, "the cases should stop at different steps"
    par = parallel(editor, evaluator, cases)
    assert_same_state(lm, before)  # a parallel edit never writes into the weights
    assert_equivalent(seq, par)


@pytest.mark.parametrize("arch", ARCHS)
def test_ftm_parallel_overtone_norm_constraint_and_exact_steps(arch, tokenizer, zsre_cases):
    lm = tiny_model(arch, tokenizer)
    cases = zsre_cases[5:10]
    objective = OverTone(OverToneConfig(lam=0.3, epsilon=0.05))
    editor = FTM(lm, FTMConfig(layer=1, lr=0.05, steps=10, norm_constraint=0.02, stop_when_clipped=True), objective)
    evaluator = Evaluator(lm)
    assert_equivalent(sequential(editor, evaluator, cases), parallel(editor, evaluator, cases))
    budgets = [0, 3, None, 1, 5]
    assert_equivalent(sequential(editor, evaluator, cases, budgets), parallel(editor, evaluator, cases, budgets))


def test_ftm_parallel_fails_cleanly_naming_the_case(tiny_llama, zsre_cases):
    from helpers import NaNObjective

    before = state(tiny_llama)
    editor = FTM(tiny_llama, FTMConfig(layer=1), NaNObjective())
    with pytest.raises(EditError, match=f"case {zsre_cases[0].case_id}: the nan loss is nan"):
        editor.edit_parallel(zsre_cases[:2])
    assert_same_state(tiny_llama, before)
    assert not any(p.requires_grad for p in tiny_llama.model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["lora", "adalora"])
def test_lora_parallel_equals_sequential_with_dropout(arch, variant, tokenizer, zsre_cases):
    """Each case's adapter init and dropout masks come from its own generator, drawn as when alone; AdaLoRA's
    orthogonality term is per case; the stop decision reads a pass without dropout."""
    lm = tiny_model(arch, tokenizer)
    before = state(lm)
    cases = zsre_cases[10:15]
    evaluator = Evaluator(lm)
    settings = dict(variant=variant, lr=5e-3, steps=8, dropout=0.1)  # the default lr and dropout
    threshold = spread_threshold(LoRA(lm, LoRAConfig(**settings), CrossEntropy()), evaluator, cases)
    editor = LoRA(lm, LoRAConfig(**settings, stop_loss=threshold), CrossEntropy())
    seq = sequential(editor, evaluator, cases)
    assert len({s.steps for s, _ in seq}) > 1, "the cases should stop at different steps"
    par = parallel(editor, evaluator, cases)
    assert_same_state(lm, before)
    assert_equivalent(seq, par)
    budgets = [3, None, 0, 1, 2]
    assert_equivalent(sequential(editor, evaluator, cases, budgets), parallel(editor, evaluator, cases, budgets))


def test_lora_parallel_refuses_rank_allocation_and_an_edited_model(tiny_llama, zsre_cases):
    allocating = LoRA(tiny_llama, LoRAConfig(rank=4, rank_allocation=True), CrossEntropy())
    with pytest.raises(EditError, match="needs AdaLoRA without rank_allocation"):
        allocating.edit_parallel(zsre_cases[:2])
    editor = LoRA(tiny_llama, LoRAConfig(steps=1), CrossEntropy())
    handle = editor.edit([zsre_cases[0]])
    with pytest.raises(EditError, match="starts from the unedited model"):
        editor.edit_parallel(zsre_cases[:2])
    handle.revert()


LOCATE = {"context_lengths": ((4, 2),), "steps": 8, "lr": 0.5}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["rome", "memit"])
def test_rome_and_memit_parallel_equal_sequential(arch, name, tokenizer, corpus, zsre_cases):
    lm = tiny_model(arch, tokenizer)
    before = state(lm)
    cases = zsre_cases[:5]
    evaluator = Evaluator(lm)

    def editor(**settings):
        if name == "rome":
            return ROME(lm, ROMEConfig(layer=1, mom2_corpus=corpus, **LOCATE, **settings), CrossEntropy())
        return MEMIT(lm, MEMITConfig(layers=(1, 2), mom2_corpus=corpus, mom2_update_weight=50.0, **LOCATE,
                                     **settings), CrossEntropy())

    threshold = spread_threshold(editor(stop_loss=0.0), evaluator, cases)
    edited = editor(stop_loss=threshold)
    seq = sequential(edited, evaluator, cases)
    assert len({s.steps for s, _ in seq}) > 1, "the cases should stop at different steps"
    par = parallel(edited, evaluator, cases)
    assert_same_state(lm, before)
    assert_equivalent(seq, par)
    budgets = [2, 0, None, 3, 1]
    assert_equivalent(sequential(edited, evaluator, cases, budgets), parallel(edited, evaluator, cases, budgets))


TIMING = (*RUN_VARYING, "seconds")


def assert_close(a, b, where="record"):
    """Equal structures, floats within LOSS_TOL, timings (at any depth) skipped. Metrics read from argmax
    predictions are fractions of a few tokens, so a changed prediction moves them far beyond the tolerance."""
    if isinstance(a, dict):
        keys = [k for k in a if k not in TIMING]
        assert sorted(keys) == sorted(k for k in b if k not in TIMING), where
        for k in keys:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, **LOSS_TOL), where
    else:
        assert a == b, where


def assert_same_records(seq, par):
    """Records of a parallel run against those of one case at a time: equal but for timings and float rounding."""
    assert [r["case_id"] for r in par] == [r["case_id"] for r in seq]
    for a, b in zip(seq, par, strict=True):
        assert_close(a, b, a["case_id"])


def test_runs_with_parallel_cases_give_the_records_of_one_at_a_time_also_when_resumed(tmp_path, tiny_llama,
                                                                                       zsre_cases):
    cases = zsre_cases[:5]
    evaluator = Evaluator(tiny_llama)
    free = FTM(tiny_llama, FTMConfig(layer=2, lr=0.2, steps=8, stop_loss=0.0), CrossEntropy())
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.2, steps=8,
                                       stop_loss=spread_threshold(free, evaluator, cases)), CrossEntropy())

    def run(directory, parallel, selection=cases):
        config = {"editor": editor.describe(), "parallel": parallel}
        run_continual(editor, evaluator, selection, ResultStore(tmp_path / directory, config), parallel=parallel)
        return read_run(tmp_path / directory)[1]

    one = run("one", 1)
    assert len({r["steps"] for r in one}) > 1
    assert_same_records(one, run("three", B))
    run("resumed", 1, cases[:2])  # interrupted after two cases, resumed with another --parallel
    assert_same_records(one, run("resumed", 2))


def test_parallel_refuses_bundles_and_sequences(tmp_path, tiny_llama, zsre_cases):
    from overtone.runner import RunSpec, SpecError

    editor, evaluator = FTM(tiny_llama, FTMConfig(layer=2), CrossEntropy()), Evaluator(tiny_llama)
    store = ResultStore(tmp_path, {"editor": "ft-m"})
    with pytest.raises(SpecError, match="the cases of a --sequence 2 / --batch 1 chunk build on each other"):
        RunSpec(editor="ft-m", sequence=2, parallel=2)
    with pytest.raises(SpecError, match="editor wise edits one case at a time"):
        RunSpec(editor="wise", parallel="auto")
    bundle = EditCase("b/0", "q", "a", edits=(zsre_cases[0], zsre_cases[1]))
    with pytest.raises(ValueError, match="case b/0 bundles 2 edits applied in order"):
        run_continual(editor, evaluator, [bundle], store, parallel=2)


cli = CliRunner()


def test_cli_parallel_records_the_setting_as_volatile_and_refuses_what_it_cannot(tmp_path, tiny_llama_dir):
    base = ["bench", "--objective", "ce", "--limit", "3", "--model", str(tiny_llama_dir), "--device", "cpu",
            "--layer", "2", "--steps", "3"]
    one, par = tmp_path / "one", tmp_path / "par"
    assert cli.invoke(app, [*base, "--out", str(one)]).exit_code == 0
    result = cli.invoke(app, [*base, "--out", str(par), "--parallel", "2"])
    assert result.exit_code == 0, result.output
    config, records, _ = read_run(par)
    assert config["parallel"] == 2
    assert_same_records(read_run(one)[1], records)
    resumed = cli.invoke(app, [*base, "--out", str(par), "--parallel", "auto"])  # another B, same directory
    assert resumed.exit_code == 0, resumed.output
    for args, message in ((["--parallel", "2", "--sequence", "2"], "build on each other: use --parallel 1"),
                          (["--parallel", "0"], "--parallel must be >= 1"),
                          (["--parallel", "many"], "takes a number of cases or auto"),
                          (["--parallel", "2", "--editor", "wise"], "editor wise edits one case at a time")):
        result = cli.invoke(app, [*base, "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in said(result), result.output


@pytest.mark.parametrize("name", ["ft-m", "lora"])
def test_traces_of_a_parallel_edit_are_those_of_each_case_alone(name, tiny_llama, zsre_cases):
    from overtone.diagnostics import trace_edit, trace_parallel
    from overtone.editors import make_editor

    cases = zsre_cases[:3]
    settings = {"ft-m": {"layer": 2, "steps": 4, "lr": 0.1}, "lora": {"steps": 12}}[name]
    editor = make_editor(name, tiny_llama, OverTone(OverToneConfig(epsilon=0.05)), **settings)
    evaluator = Evaluator(tiny_llama)
    alone = [t for case in cases for t in trace_edit(editor, evaluator, [case])]
    together = trace_parallel(editor, evaluator, cases)
    for a, b in zip(alone, together, strict=True):
        assert (b.case_id, b.steps, b.final_extra, b.clipped, b.mixed) == (a.case_id, a.steps, a.final_extra, a.clipped,
                                                                          a.mixed)
        assert [x for row in b.label_log_prob for x in row] == pytest.approx(
            [x for row in a.label_log_prob for x in row], rel=LOSS_TOL["rel"], abs=1e-5)
        for metric, values in a.probe_loss.items():
            assert b.probe_loss[metric] == pytest.approx(values, rel=LOSS_TOL["rel"], abs=1e-5)


def test_cli_trace_takes_parallel(tmp_path, tiny_llama_dir):
    import json

    out = tmp_path / "trace"
    result = cli.invoke(app, ["trace", "--limit", "3", "--parallel", "2", "--model", str(tiny_llama_dir),
                              "--device", "cpu", "--layer", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    traces = json.loads((out / "trace.json").read_text())["traces"]
    assert [t["case_id"] for t in traces] == ["zsre/0", "zsre/1", "zsre/2"] * 2


def test_demo_prints_the_same_table_with_parallel_cases(tmp_path, tiny_llama_dir):
    base = ["demo", "--limit", "8", "--model", str(tiny_llama_dir), "--device", "cpu"]
    tables = []
    for parallel in ("1", "auto"):
        out = tmp_path / parallel
        result = cli.invoke(app, [*base, "--parallel", parallel, "--out", str(out)])
        assert result.exit_code == 0, result.output
        # every column but the seconds per edit
        lines = (out / "table.md").read_text().splitlines()
        seconds = [cell.strip() for cell in lines[0].split("|")].index("s/edit")
        tables.append(["|".join(c for i, c in enumerate(line.split("|")) if i != seconds) for line in lines])
        # auto: at most a quarter of the cases, so that the runner's window sorts 4 groups by length
        assert read_run(out / "ft-m-ce")[0]["parallel"] == (1 if parallel == "1" else 2)
    assert tables[0] == tables[1] and tables[0][2].startswith("| ft-m + CE |")


def test_wild_evaluation_and_the_ability_check_give_the_records_of_one_at_a_time(tmp_path, tiny_llama, zsre_cases):
    """The wild evaluator answers a group's B edited models together, the ability check one case at a time."""
    from test_ability import monitor_for

    from overtone.evaluation import WildEvaluator, WildSettings

    cases = zsre_cases[:3]
    editor = FTM(tiny_llama, FTMConfig(layer=2, lr=0.2, steps=4), CrossEntropy())
    evaluator = WildEvaluator(tiny_llama, WildSettings(max_new_tokens=6), inner=Evaluator(tiny_llama))
    monitor = monitor_for(tiny_llama, n_samples=2)

    def run(directory, parallel):
        with ResultStore(tmp_path / directory, {"parallel": parallel}) as store:
            run_continual(editor, evaluator, cases, store, ability=monitor, parallel=parallel)
        return read_run(tmp_path / directory)[1]

    one, two = run("one", 1), run("two", 2)
    assert_same_records(one, two)
    assert all("ability" in r and "wild" in r for r in two)


def test_an_editor_takes_parallel_exactly_when_it_has_a_parallel_edit():
    """``parallel_refusal`` is what the CLI and studies read: it must agree with the editor's methods."""
    from overtone.editors import EDITORS
    from overtone.editors.base import Editor

    for name, cls in EDITORS.items():
        has_parallel_edit = cls.edit_parallel is not Editor.edit_parallel
        assert (cls.parallel_refusal is None) == has_parallel_edit, name


WILD_EDITORS = {"ft-m": {"layer": 2, "lr": 0.2, "steps": 4}, "lora": {"steps": 12}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(WILD_EDITORS))
def test_eval_both_of_parallel_edits_gives_the_records_and_token_ids_of_one_at_a_time(arch, name, tokenizer,
                                                                                     zsre_cases, tmp_path,
                                                                                     monkeypatch):
    """``--eval both`` with B = 3 over 5 cases: both protocols batched over the B edited models (the
    teacher-forced rows and the generated ones each with their own case's edit) give every record field
    and every generated token id of each case edited alone. Generate calls of ``MAX_ROWS`` rows cut across
    cases, so some hold only part of a group's cases."""
    from overtone.editors import make_editor
    from overtone.evaluation import WildEvaluator, WildSettings, wild

    lm = tiny_model(arch, tokenizer)
    before = state(lm)
    cases = zsre_cases[:5]
    editor = make_editor(name, lm, CrossEntropy(), **WILD_EDITORS[name])
    evaluator = WildEvaluator(lm, WildSettings(max_new_tokens=12), inner=Evaluator(lm))
    monkeypatch.setattr(wild, "MAX_ROWS", 5)
    fields = wild.WildEvaluator._fields

    def run(directory, parallel):
        """The records, and per case (its rewrite prompt) the token ids of every reply before and after the edit."""
        ids = {}

        def spy(pre, replies, seconds):
            ids[pre.probes[0].prompt] = ([r.ids for r in pre.replies], [r.ids for r in replies])
            return fields(pre, replies, seconds)

        with monkeypatch.context() as patch:
            patch.setattr(wild.WildEvaluator, "_fields", staticmethod(spy))
            with ResultStore(tmp_path / directory, {"parallel": parallel}) as store:
                run_continual(editor, evaluator, cases, store, parallel=parallel)
        return read_run(tmp_path / directory)[1], ids

    one, alone = run("one", 1)

    def one_at_a_time(*args):
        raise AssertionError("the teacher-forced evaluation of a parallel edit runs case by case")

    monkeypatch.setattr(Evaluator, "after_each", one_at_a_time)
    three, together = run("three", B)
    assert_same_state(lm, before)
    assert_same_records(one, three)
    assert len(alone) == len(cases) and together == alone
    assert any(pre != post for pre, post in alone.values()), "the edits should change some replies"
