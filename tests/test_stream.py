"""Edit streams (runner/stream.py) and the lifelong metrics (evaluation/lifelong.py) on the tiny random Llama.

* the metrics against hand-computed values: n-gram entropies, the probability comparisons, the scores;
* a stream interrupted after a checkpoint and resumed gives the records of an uninterrupted stream;
* a checkpoint applied to a fresh copy of the model gives the streamed weights bit for bit;
* after many batches the revert handles hold one copy of each edited tensor, and MEMIT's saved edit
  stops growing (the weights' change instead of every batch's factors), still bit-exact;
* the options: stream settings without --stream, or a stream of one edit, are refused naming the option.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from helpers import RUN_VARYING, assert_same_state, state, tiny_model

from overtone.artifacts import load_edit, save_edit
from overtone.benchmarks import load_benchmark
from overtone.benchmarks.cases import EditCase, Probe
from overtone.cli.options import StreamOptions
from overtone.editors import EDITORS, FTM, MEMIT, FTMConfig, MEMITConfig
from overtone.evaluation import EvalCache, Evaluator, lifelong
from overtone.evaluation.lifelong import LifelongScorer, comparisons, fluency, ngram_entropy, score_rows
from overtone.models.replay import forward_hidden
from overtone.objectives import CrossEntropy
from overtone.runner.bench import summarize
from overtone.runner.spec import RunSpec, SpecError
from overtone.runner.stream import Checkpoints, StreamSettings, curve_sample, stream_records
from overtone.study import load_study
from overtone.tokens import encode_pairs

TIMINGS = RUN_VARYING
FAST = {"context_lengths": ((4, 2),), "steps": 6, "lr": 2.0, "stop_loss": 0.0}


def test_ngram_entropy_and_fluency_against_hand_computed_values():
    # "a b a b a": bigrams ab, ba, ab, ba -> two kinds, 1 bit; trigrams aba, bab, aba -> p = 2/3, 1/3
    text = "a b a b a"
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(text, 2) == pytest.approx(1.0)
    assert ngram_entropy(text, 3) == pytest.approx(h3)
    assert fluency(text) == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    # a repeated word has one bigram kind: no entropy; punctuation is a word of its own
    assert fluency("the the the the") == 0.0
    assert ngram_entropy("Paris, France.", 2) == pytest.approx(math.log2(3))  # (Paris ,) (, France) (France .)
    assert ngram_entropy("one", 2) == 0.0


CASE = EditCase(case_id="cf/0", prompt="The mother tongue of Danielle Darrieux is", target="English",
                subject="Danielle Darrieux", ground_truth="French",
                rephrases=("Where Danielle Darrieux is from, people speak", "Danielle Darrieux speaks"),
                locality={"neighborhood": (Probe("Michel Rocard is a native speaker of", "French"),)})


def test_comparisons_follow_the_papers():
    got = [(c.metric, c.prompt, c.better, c.worse) for c in comparisons(CASE)]
    assert got == [
        ("efficacy", CASE.prompt, "English", "French"),
        ("generalization", CASE.rephrases[0], "English", "French"),
        ("generalization", CASE.rephrases[1], "English", "French"),
        ("specificity", "Michel Rocard is a native speaker of", "French", "English"),
    ]
    # no old target: no efficacy or generalisation; a locality probe answered by the new target says nothing
    bare = EditCase(case_id="x", prompt="p", target="A", locality={"k": (Probe("q", "A"), Probe("r", "B"))})
    assert [(c.metric, c.better) for c in comparisons(bare)] == [("specificity", "B")]


def test_scores_from_hand_made_log_probabilities(tiny_llama, monkeypatch):
    # rows in order: (prompt, better), (prompt, worse) for each comparison of comparisons(CASE)
    given = [-1.0, -2.0,  # efficacy: new above old -> 1
             -3.0, -2.0, -1.0, -1.5,  # generalisation: wrong, right -> 0.5
             -0.5, -0.4]  # specificity: the true answer below the new target -> 0
    monkeypatch.setattr(LifelongScorer, "logprobs", lambda self, pairs: given[: len(pairs)])
    scores = LifelongScorer(tiny_llama, fluency_tokens=0).score([CASE])
    assert scores == [{"efficacy": 1.0, "generalization": 0.5, "specificity": 0.0}]


def test_logprobs_are_mean_answer_token_log_probabilities(tiny_llama):
    scorer = LifelongScorer(tiny_llama)
    pairs = [("Who is listed as Wang Jipeng father?", "Wang Chonghua"), ("What voice type is", "mezzo soprano")]
    got = scorer.logprobs(pairs)
    tokenizer = tiny_llama.tokenizer
    for (prompt, answer), value in zip(pairs, got, strict=True):
        ids = tokenizer(f"{prompt} {answer}", return_tensors="pt").input_ids
        start = len(tokenizer(prompt).input_ids)  # the answer's tokens follow the prompt's here
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama.model(ids).logits[0].float(), dim=-1)
        expected = torch.stack([logp[t - 1, ids[0, t]] for t in range(start, ids.size(1))]).mean().item()
        assert value == pytest.approx(expected, abs=1e-5)


def test_rows_are_scored_once_and_one_token_answers_ride_on_their_prompts_row(tiny_llama, monkeypatch):
    tokenizer = tiny_llama.tokenizer
    prompt = "Which family does Epaspidoceras belong to?"
    rows = [encode_pairs(tokenizer, [prompt], [answer]) for answer in ("Noctuidae", "Noctuidae")]
    one = next(a for a in ("a", "The", "of", "is") if encode_pairs(tokenizer, [prompt], [a]).labels.size(1) == 1)
    rows.append(encode_pairs(tokenizer, [prompt], [one]))
    alone = [score_rows(tiny_llama, [row])[0] for row in rows]
    passes = []
    monkeypatch.setattr(lifelong, "forward_hidden", lambda *a: passes.append(a[1].shape) or forward_hidden(*a))
    together = score_rows(tiny_llama, rows)
    assert passes == [torch.Size([1, rows[0].input_ids.size(1)])]  # one row through the model, once
    for got, expected in zip(together, alone, strict=True):
        assert torch.equal(got.tokens, expected.tokens)
        assert got.logprob == pytest.approx(expected.logprob, abs=1e-6)
        assert torch.allclose(got.entropy, expected.entropy, atol=1e-6)


def ftm(lm):
    return FTM(lm, FTMConfig(layer=2, lr=0.1, steps=3), CrossEntropy())


def memit(lm, corpus):
    return MEMIT(lm, MEMITConfig(layers=(1, 2), mom2_corpus=corpus, **FAST), CrossEntropy())


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


class Stop(Exception):
    """Stands for a kill: raised by the progress callback once enough edits are made."""


@pytest.mark.parametrize("name", ["ft-m", "memit"])
def test_an_interrupted_stream_resumes_from_its_checkpoint_with_the_same_records(
        tmp_path, tokenizer, zsre_cases, corpus, name):
    cases = zsre_cases[:12]
    settings = StreamSettings(checkpoint_every=2, curve_every=4, curve_sample=3, fluency_tokens=4)

    def stream(folder, on_edits=None):
        lm = tiny_model("llama", tokenizer)
        editor = ftm(lm) if name == "ft-m" else memit(lm, corpus)
        before = state(lm)
        try:
            return stream_records(editor, Evaluator(lm), cases, 2, settings, seed=0, checkpoints=folder,
                                  on_edits=on_edits)
        finally:
            assert_same_state(lm, before)  # reverted at the end, and when interrupted

    expected = stream(tmp_path / "reference")
    made = []

    def stop_after_nine(n):
        made.append(n)
        if sum(made) >= 9:  # inside batch 5: checkpoints after 4 and 8 edits
            raise Stop

    with pytest.raises(Stop):
        stream(tmp_path / "run", stop_after_nine)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["edits-000008"]  # the older one pruned
    resumed = []
    got = stream(tmp_path / "run", resumed.append)
    assert resumed[0] == 8 and sum(resumed) == 12  # the checkpoint's 8 edits skipped, 4 made
    assert comparable(got) == comparable(expected)
    assert [p["edits"] for p in got[0]["curve"]] == [4, 8, 12]
    summary = summarize(got)["lifelong"]
    assert [p["edits"] for p in summary["curve"]] == [4, 8, 12] and summary["curve"][-1]["sample"] == 3
    assert set(summary["post"]) == {"efficacy", "generalization", "specificity", "fluency"}
    assert all(set(r["lifelong"]["post"]) == {"efficacy", "generalization", "specificity", "fluency"} for r in got)
    # a restart after the final checkpoint only evaluates
    again = []
    assert comparable(stream(tmp_path / "run", again.append)) == comparable(expected) and again == [12]


class CaseByCase(Evaluator):
    """The teacher-forced evaluator by another type: the stream evaluates it case by case (``after_many``) and
    the comparisons apart, the path every evaluator took before ``evaluate_together``."""


def test_a_stream_evaluated_together_has_the_records_of_one_evaluated_case_by_case(tokenizer, zsre_cases):
    """One pass over every row of every case (shared rows once, one-token answers read from their prompt's
    row) gives the records of the evaluation per case: equal, the flatness (rounded to 4 places) included."""
    cases = [*zsre_cases[:6], *load_benchmark("counterfact-mend", limit=6)]
    settings = StreamSettings(curve_every=4, curve_sample=3, fluency_tokens=4)
    records = {}
    for kind in (Evaluator, CaseByCase):
        lm = tiny_model("llama", tokenizer)
        records[kind] = comparable(stream_records(ftm(lm), kind(lm), cases, 2, settings, seed=0))
    assert records[Evaluator] == records[CaseByCase]
    assert {r["lifelong"]["pre"]["efficacy"] for r in records[Evaluator]} == {0.0, 1.0}  # not all alike


def test_a_streams_unedited_pass_is_read_from_the_evaluation_cache_with_the_same_records(
        tokenizer, zsre_cases, eval_cache_dir):
    """The unedited pass of a stream (KnowEdit probes and comparisons, every case at once) is one cache entry: a
    second stream on the same cases reads it (every case counts its rows as hits) and its records are those of a
    stream without the cache; other cases are a miss."""
    cases = [*zsre_cases[:4], *load_benchmark("counterfact-mend", limit=4)]
    settings = StreamSettings(curve_every=4, curve_sample=3, fluency_tokens=4)
    lm = tiny_model("llama", tokenizer)
    cache = EvalCache(lm)

    def stream(these, cached):
        evaluator = Evaluator(lm)
        evaluator.eval_cache = cache if cached else None  # as make_evaluator sets it
        return stream_records(ftm(lm), evaluator, these, 2, settings, seed=0)

    plain, cold = stream(cases, False), stream(cases, True)
    assert len([p for p in eval_cache_dir.rglob("*.json") if p.name != "model.json"]) == 1
    warm = stream(cases, True)
    assert [r["eval_cache_hits"] for r in cold] == [0] * len(cases) and all(r["eval_cache_hits"] > 0 for r in warm)
    assert "eval_cache_hits" not in plain[0]
    assert comparable(plain) == comparable(cold) == comparable(warm)
    assert [r["eval_cache_hits"] for r in stream(cases[1:], True)] == [0] * (len(cases) - 1)


def test_fluency_every_k_scores_every_kth_edit_and_changes_nothing_else(tokenizer, zsre_cases):
    """``--fluency-every 3``: the fluency of edits 1, 4, 7, ... of the final evaluation (the first of every three,
    as the reference's generation_test_interval), equal to their fluency when every edit is scored; the other
    edits have none, and every other field of every record is as before."""
    cases = zsre_cases[:8]
    records = {}
    for every in (1, 3):
        lm = tiny_model("llama", tokenizer)
        settings = StreamSettings(fluency_tokens=4, fluency_every=every)
        records[every] = stream_records(ftm(lm), Evaluator(lm), cases, 2, settings, seed=0)
    fluent = [i for i, r in enumerate(records[3]) if "fluency" in r["lifelong"]["post"]]
    assert fluent == [0, 3, 6]
    assert [records[3][i]["lifelong"]["post"]["fluency"] for i in fluent] == \
        [records[1][i]["lifelong"]["post"]["fluency"] for i in fluent]
    expected = [r if i in fluent else {**r, "lifelong": {**r["lifelong"], "post": {
        k: v for k, v in r["lifelong"]["post"].items() if k != "fluency"}}} for i, r in enumerate(records[1])]
    assert comparable(records[3]) == comparable(expected)


def test_bench_prints_a_streams_lifelong_tables_with_its_edits_by_batch(tmp_path, tiny_llama_dir):
    """``overtone bench --stream`` ends with the summary, the lifelong metrics, the curve and the final scores
    by the batch that made each edit, each once; ``--fluency-every 2`` is named in the run's configuration."""
    from typer.testing import CliRunner

    from overtone.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "2",
        "--objective", "ce", "--limit", "6", "--sequence", "6", "--batch", "2", "--stream", "--curve-every", "4",
        "--fluency-tokens", "4", "--fluency-every", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for title in ("Lifelong metrics: unedited → after the stream", "Along the stream", "By the batch that made"):
        assert result.output.count(title) == 1, title
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["stream"]["fluency_every"] == 2


def test_a_checkpoint_applied_to_a_fresh_model_gives_the_streamed_weights(tmp_path, tokenizer, zsre_cases):
    lm = tiny_model("llama", tokenizer)
    editor = ftm(lm)
    cases = zsre_cases[:6]
    streamed = {}

    class Keep:
        def on_step(self, editor, cases):
            return None

        def edited(self, handle):
            streamed.update(state(lm))  # the weights after each batch: the last one stays

    stream_records(editor, Evaluator(lm), cases, 3, StreamSettings(checkpoint_every=5, fluency_tokens=0), seed=0,
                   checkpoints=tmp_path, observer=Keep())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits-000006"]  # the end is always saved
    fresh = tiny_model("llama", tokenizer)
    handle = load_edit(tmp_path / "edits-000006").apply(fresh)
    assert_same_state(fresh, streamed)
    handle.revert()
    assert_same_state(fresh, state(tiny_model("llama", tokenizer)))
    chain, stream = Checkpoints(tmp_path).latest()
    assert chain == [6] and stream["from"] == 0 and len(stream["stats"]) == 2


def test_after_many_batches_one_copy_of_each_edited_tensor_is_held(tokenizer, zsre_cases, corpus):
    class Handles:
        def __init__(self):
            self.handles = []

        def on_step(self, editor, cases):
            return None

        def edited(self, handle):
            self.handles.append(handle)

    for editor, tensors in ((ftm(tiny_model("llama", tokenizer)), 1),
                            (memit(tiny_model("llama", tokenizer), corpus), 2)):
        seen = Handles()
        stream_records(editor, Evaluator(editor.lm), zsre_cases[:20], 2, StreamSettings(fluency_tokens=0), seed=0,
                       observer=seen)
        handles = seen.handles
        assert len(handles) == 10
        held = [h for h in handles[1:] if h.active]
        assert not held, f"{editor.name}: later batches kept {len(held)} copies"
        assert len(handles[0].restores) == tensors


def test_a_long_memit_stream_saves_the_change_of_its_weights_not_every_batch(tmp_path, tokenizer, zsre_cases,
                                                                            corpus):
    """The tiny model's MEMIT layers are 32 x 64: 10 facts' factors take 10 x 96 values a layer, the widened
    change 2 x 2048; so two batches of 10 keep their factors and a third drops them."""
    lm = tiny_model("llama", tokenizer)
    unedited = state(lm)
    editor = memit(lm, corpus)
    handles = []  # not on an EditStack, which would release the later handles' copies
    for first in (0, 10, 20):
        handles.append(editor.edit(zsre_cases[first: first + 10]))
        if first == 0:
            assert set(save_edit(editor, tmp_path / "one").saved.state) == {"updates"}  # a single edit's format
    assert not editor.log.complete and editor.log.edits[-1] is None
    kept = sum(t.numel() * t.element_size() for edit in editor.log.edits if edit for u in edit for t in u[1:])
    assert kept <= editor.log.limit_bytes
    saved = save_edit(editor, tmp_path / "long").saved
    assert set(saved.state) == {"weights"} and all(t.dtype == torch.float64 for t in saved.tensors.values())
    streamed = state(lm)
    fresh = tiny_model("llama", tokenizer)
    handle = load_edit(tmp_path / "long").apply(fresh)
    assert_same_state(fresh, streamed)
    handle.revert()
    assert_same_state(fresh, unedited)
    handles[-1].revert()  # back to two edits: their factors were kept, so they save as factors again
    assert editor.log.complete and set(editor.saved_edit().state) == {"updates"}
    for earlier in handles[1::-1]:
        earlier.revert()
    assert_same_state(lm, unedited)


def test_curve_samples_are_fixed_and_drawn_from_earlier_edits():
    assert curve_sample(0, 1000, 100) == curve_sample(0, 1000, 100)
    assert curve_sample(0, 1000, 100) != curve_sample(1, 1000, 100)
    assert len(curve_sample(0, 50, 100)) == 50 and max(curve_sample(0, 1000, 100)) < 1000


def test_stream_options_are_checked_when_the_spec_is_built():
    with pytest.raises(SpecError, match=r"--curve-every set.* add --stream"):
        RunSpec(editor="ft-m", sequence=10, curve_every=5)
    with pytest.raises(SpecError, match=r"--stream .* T >= 2"):
        RunSpec(editor="ft-m", stream=True)
    with pytest.raises(SpecError, match="--eval-timing must be end"):
        RunSpec(editor="ft-m", stream=True, sequence=10, eval_timing="after-each")
    spec = RunSpec(editor="ft-m", stream=True, sequence=10, batch=5, curve_every=5)
    assert spec.stream_settings == StreamSettings(curve_every=5)
    assert "checkpoint_every" not in spec.stream_settings.describe()  # it does not change results
    assert "fluency_every" not in spec.stream_settings.describe()  # named only when it samples: old runs resume
    sampled = RunSpec(editor="ft-m", stream=True, sequence=10, batch=5, fluency_every=10).stream_settings
    assert sampled is not None and sampled.describe()["fluency_every"] == 10
    with pytest.raises(SpecError, match="--fluency-every must be >= 1, got 0"):
        RunSpec(editor="ft-m", stream=True, sequence=10, fluency_every=0)
    with pytest.raises(SpecError, match=r"--fluency-every set.* add --stream"):
        RunSpec(editor="ft-m", sequence=10, fluency_every=2)


def test_the_command_line_defaults_are_the_stream_settings():
    defaults = {f.name: f.default for f in fields(StreamOptions)}
    assert defaults.pop("stream") is False
    assert defaults == {f.name: f.default for f in fields(StreamSettings)}


STUDIES = Path(__file__).resolve().parent.parent / "studies"
LIFELONG = {"lifelong-counterfact.yaml": (1000, 500), "lifelong-zsre.yaml": (1000, 500),
            "lifelong-ultraedit.yaml": (10000, 1000)}


@pytest.mark.parametrize("name", sorted(LIFELONG))
@pytest.mark.parametrize("profile", [None, "llama-3-8b"])
def test_the_lifelong_study_files_expand_into_streams(name, profile):
    """Each file, and its Llama-3-8B profile, gives stream cells of batches of 100; an editor not yet in this
    tree (alphaedit, ultraedit) is read as memit, whose settings and protocol are those of its family."""
    raw = yaml.safe_load((STUDIES / name).read_text())

    def known(editor):
        return editor if editor in EDITORS else "memit"

    if "editor" in raw["fixed"]:
        raw["fixed"]["editor"] = known(raw["fixed"]["editor"])
    else:
        raw["axes"]["editor"] = list(dict.fromkeys(known(e) for e in raw["axes"]["editor"]))
    editors = len(raw["axes"].get("editor", [raw["fixed"].get("editor")]))
    study = load_study(raw, profile=profile)
    edits, curve = LIFELONG[name]
    if profile is not None:
        edits = 2000 if name == "lifelong-counterfact.yaml" else edits
        assert all(c.model.name.startswith("meta-llama/Meta-Llama-3-8B") for c in study.cells)
    assert len(study.cells) == 2 * editors
    assert {c.variant.objective for c in study.cells} == {"ce", "overtone"}
    for cell in study.cells:
        spec = cell.run_spec()
        assert (cell.sequence, cell.batch, spec.limit) == (edits, 100, edits)
        assert spec.stream_settings == StreamSettings(curve_every=curve, curve_sample=100)
