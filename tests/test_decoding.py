"""The wild protocol's greedy decoder against transformers' greedy ``generate``: the same reply ids, token for token."""

from __future__ import annotations

import contextlib
import functools
import random

import pytest
import torch
from helpers import tiny_model

from overtone.editors import FTM, FTMConfig
from overtone.evaluation import WildSettings
from overtone.evaluation.decoding import _Text, eos_ids, greedy_ids, shared_prefix
from overtone.evaluation.generation import generate_ids
from overtone.evaluation.wild import answer, context_text, find_stop, wild_probes
from overtone.models.per_case import CaseRows
from overtone.objectives import CrossEntropy

LIMIT = 16


def stops(reply: str) -> bool:
    """The wild stop rule, or a length, so that rows of the tiny random models end at different steps."""
    return find_stop(reply, finished=False) is not None or len(reply) >= 18


def expected(lm, generated: torch.Tensor, limit: int) -> list[list[int]]:
    """Each row of ``generate`` up to the token after which it stopped: end of sequence, the limit, or ``stops``.

    A model without an end-of-sequence token in its generation config keeps generating after a row is done,
    so the stop is read from the tokens rather than from the padding."""
    eos = eos_ids(lm)
    out = []
    for row in generated.tolist():
        n = next(n for n in range(1, limit + 1) if n == limit or row[n - 1] in eos
                 or stops(lm.tokenizer.decode(row[:n], skip_special_tokens=True)))
        out.append(row[:n])
    return out


def texts(lm, cases, context: str) -> list[str]:
    return [context_text(lm.tokenizer, p.prompt, context) for case in cases for p in wild_probes(case)]


@pytest.mark.parametrize("context", ["bare", "qa"])
def test_greedy_ids_are_generates_on_every_architecture(any_tiny, zsre_cases, context):
    prompts = texts(any_tiny, zsre_cases[:3], context)
    enc = any_tiny.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    if context == "qa":  # the instruction is a prefix of every prompt, longer than the sliding windows (8)
        assert shared_prefix(enc["input_ids"], enc["attention_mask"]) > 8
    reference = expected(any_tiny, generate_ids(any_tiny, prompts, LIMIT, done=stops), LIMIT)
    lengths = {len(r) for r in reference}
    assert len(lengths) > 2 and min(lengths) < LIMIT, "rows should leave the batch at different steps"
    for share in (True, False):
        assert greedy_ids(any_tiny, prompts, LIMIT, done=stops, share_prefix=share) == reference


def test_each_row_keeps_its_cases_edit_as_rows_leave(any_tiny, zsre_cases):
    """Three parallel FT-M edits; rows of the three cases mixed in one batch (a batch cut across cases as
    ``MAX_ROWS`` cuts it): every row's ids are those of ``generate`` with the same rows under the same edits."""
    cases = zsre_cases[:3]
    edits = FTM(any_tiny, FTMConfig(layer=2, lr=0.2, steps=4), CrossEntropy()).edit_parallel(cases)
    for context in ("bare", "qa"):
        prompts = texts(any_tiny, cases, context)
        owners = tuple(i for i, case in enumerate(cases) for _ in wild_probes(case))[1:]
        prompts = prompts[1:]

        def scope(rows: tuple[int, ...]):
            return edits.applied(CaseRows(rows, len(cases)))

        with scope(owners):
            reference = expected(any_tiny, generate_ids(any_tiny, prompts, LIMIT, done=stops), LIMIT)
        assert greedy_ids(any_tiny, prompts, LIMIT, done=stops, owners=owners, scope=scope) == reference
        unedited = greedy_ids(any_tiny, prompts, LIMIT, done=stops)
        assert unedited != reference, "the edits should change some replies"


def test_the_prefix_runs_once_per_model_state_unless_a_hook_may_read_the_whole_call(tiny_llama, zsre_cases,
                                                                                   monkeypatch):
    """The shared prefix runs once (once per case under per-case edits), then the rest of the prompts; a forward
    hook may read every token of a call (WISE's and MELO's routing), so a hooked model prefills the prompts whole."""
    prompts = texts(tiny_llama, zsre_cases[:2], "qa")
    enc = tiny_llama.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    width, prefix = enc["input_ids"].shape[1], shared_prefix(enc["input_ids"], enc["attention_mask"])
    shapes = []
    forward = tiny_llama.model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_llama.model, "forward", spy)
    rows = len(prompts)
    greedy_ids(tiny_llama, prompts, 2)
    assert shapes[:2] == [(1, prefix), (rows, width - prefix)] and shapes[2][1] == 1
    shapes.clear()
    greedy_ids(tiny_llama, prompts, 2, owners=[0, 1] * (rows // 2) + [0] * (rows % 2),
               scope=lambda owners: contextlib.nullcontext())
    assert shapes[:2] == [(2, prefix), (rows, width - prefix)]
    shapes.clear()
    handle = tiny_llama.adapter.layers[0].register_forward_pre_hook(lambda module, args: None)
    try:
        greedy_ids(tiny_llama, prompts, 2)
    finally:
        handle.remove()
    assert shapes[0] == (rows, width)


def test_the_reply_text_grows_as_decode_gives_it(tokenizer):
    """``_Text`` decodes each token once and equals ``tokenizer.decode`` of the reply so far, also for ids that end
    inside a character (random byte tokens) and for special tokens."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 25))]
        text = _Text(tokenizer)
        assert text.stream is not None
        for n in range(1, len(ids) + 1):
            assert text.add(ids[n - 1]) == tokenizer.decode(ids[:n], skip_special_tokens=True)


def test_a_generation_config_that_changes_greedy_choices_is_refused(tiny_llama):
    from overtone.evaluation import WildEvaluator

    tiny_llama.model.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.3.*decoder 'generate'"):
        WildEvaluator(tiny_llama)
    WildEvaluator(tiny_llama, WildSettings(decoder="generate"))
    with pytest.raises(ValueError, match="unknown wild decoder 'beam'"):
        WildSettings(decoder="beam")


def test_the_wild_replies_are_the_same_with_either_decoder(tiny_llama, zsre_cases):
    prompts = [p.prompt for case in zsre_cases[:3] for p in wild_probes(case)]
    for context in ("bare", "qa"):
        fast = answer(tiny_llama, prompts, WildSettings(context=context, max_new_tokens=12))
        assert fast == answer(tiny_llama, prompts, WildSettings(context=context, max_new_tokens=12,
                                                                decoder="generate"))


def test_a_half_precision_head_reads_a_contiguous_last_position(tokenizer, zsre_cases, monkeypatch):
    """The prefill keeps its last position by index, not as a strided view: on a bf16 model on the CPU, torch
    multiplies a strided 3-D input by the head one row at a time, each against its own copy of the head
    (pytorch/pytorch#151934; 250 MB and seconds per row at 7B). Every call hands the head one contiguous position
    per row, with or without the shared prefix (float32 keeps the view: the same kernels, the same replies)."""
    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    head = lm.adapter.lm_head
    seen = []
    forward = head.forward

    def spy(hidden):
        seen.append((tuple(hidden.shape), hidden.is_contiguous()))
        return forward(hidden)

    monkeypatch.setattr(head, "forward", spy)
    prompts = texts(lm, zsre_cases[:2], "qa")
    for share in (True, False):
        seen.clear()
        greedy_ids(lm, prompts, 3, share_prefix=share)
        assert seen and all(shape[1] == 1 and contiguous for shape, contiguous in seen), seen
