"""Test helpers: tiny random models of every supported architecture, weight snapshots, the guard of a model shared
between tests, and the command line run in this process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
from typer.testing import CliRunner, Result

from overtone.cli import app
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


def digest(tensor: torch.Tensor) -> str:
    """The sha1 of a tensor's bytes (the quickest of hashlib's on the real model's 0.6 GB: about a second)."""
    return hashlib.sha1(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()


class WeightGuard:
    """Says how a model differs from when the guard was made: its tensors' values, names (a wrapper adds or removes
    some), training mode, hooks and which parameters train.

    Cheap enough to ask after every test of a shared model: every tensor is hashed once, at the start; later only a
    tensor that was replaced or written in place (its version counter moved) is hashed again, so a test that edits
    one matrix and reverts it costs the hash of that matrix. A write through ``.data`` bypasses the version counter
    and is not seen (the library makes none).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.tensors = model.state_dict(keep_vars=True)
        self.versions = {name: tensor._version for name, tensor in self.tensors.items()}
        self.digests = {name: digest(tensor) for name, tensor in self.tensors.items()}
        self.settings = self._settings()

    def _settings(self) -> dict[str, object]:
        """What a test could leave behind, besides the values, that changes the next test's forward pass."""
        modules = list(self.model.modules())
        return {"training mode": [m.training for m in modules],
                "forward hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules),
                "trainable parameters": [n for n, p in self.model.named_parameters() if p.requires_grad]}

    def changes(self) -> list[str]:
        """One line per difference; empty while the model is as it was."""
        now = self.model.state_dict(keep_vars=True)
        found = [f"{name}: removed" for name in self.tensors.keys() - now.keys()]
        found += [f"{name}: added" for name in now.keys() - self.tensors.keys()]
        for name in self.tensors.keys() & now.keys():
            tensor, same_object = now[name], now[name] is self.tensors[name]
            if same_object and tensor._version == self.versions[name]:
                continue
            if digest(tensor) != self.digests[name]:
                found.append(f"{name}: values differ")
            elif same_object:
                self.versions[name] = tensor._version  # written and restored: not hashed again until written again
        found += [f"{key} differs" for key, value in self._settings().items() if value != self.settings[key]]
        return sorted(found)


def cli(*args: str | Path, code: int | None = 0, **kwargs) -> Result:
    """``overtone ARGS`` in this process; unless ``code`` is None, fails with the command's output when it exits with
    another status. ``kwargs`` go to ``CliRunner.invoke`` (``input``, ``env``)."""
    result = CliRunner().invoke(app, [str(a) for a in args], **kwargs)
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def bench(out: Path, model: Path, *extra: str) -> Result:
    """A two-case FT-M ``overtone bench`` on a tiny model folder (layer 2, three steps) that must succeed."""
    return cli("bench", "--limit", "2", "--out", out, "--model", model, "--device", "cpu", "--layer", "2",
               "--steps", "3", *extra)


def said(result: Result) -> str:
    """The output as one line: rich wraps long lines (paths) at the console width."""
    return " ".join(result.output.split())


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


# Record fields that differ between two runs of the same cases: timings, and how much of a run the evaluation
# cache served (a resumed or repeated run reads what an earlier one stored).
RUN_VARYING = ("edit_s", "eval_s", "eval_cache_hits")
