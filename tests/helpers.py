"""Test helpers: tiny random models of every supported architecture and weight snapshots."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from overtone.editors import FTM, FTMConfig
from overtone.models.loading import LoadedModel, prepare_model
from overtone.objectives import CrossEntropy, Objective

ARCHS = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2")


def tiny_config(arch: str, vocab_size: int):
    # A large init scale gives peaked predictions, so an edit visibly changes them.
    common = dict(vocab_size=vocab_size, num_hidden_layers=4, num_attention_heads=4, tie_word_embeddings=False,
                  initializer_range=0.3)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                          initializer_range=0.3, bos_token_id=1, eos_token_id=1)
    llama_like = dict(common, hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                      max_position_embeddings=128)
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "mistral":
        return MistralConfig(**llama_like, sliding_window=8)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=8, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"] * 2)
    raise ValueError(arch)


def tiny_model(arch: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return prepare_model(model, tokenizer, name=f"tiny-{arch}")


def state(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_same_state(lm: LoadedModel, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"weights differ: {changed}"


class NaNObjective(Objective):
    """An objective whose loss is NaN, to check that editors name the case and restore the weights."""

    name = "nan"

    def token_losses(self, logits, labels, reference):
        false = torch.zeros_like(labels, dtype=torch.bool)
        return logits.sum(-1) * float("nan"), false, false, torch.zeros_like(labels)


class CountingFTM(FTM):
    """FT-M that records the order of its edits and can be told to fail on one case."""

    fail_on: str | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.edited: list[str] = []

    def edit(self, cases, on_step=None, steps=None):
        self.edited += [c.case_id for c in cases]
        if cases[0].case_id == self.fail_on:
            raise ValueError("synthetic failure")
        return super().edit(cases, on_step, steps)


def counting_ftm(lm, layer=2, lr=0.1, steps=3) -> CountingFTM:
    return CountingFTM(lm, FTMConfig(layer=layer, lr=lr, steps=steps), CrossEntropy())
