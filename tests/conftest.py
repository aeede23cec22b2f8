"""Fixtures: tiny random models of every supported architecture, with a tokenizer trained in code, and the real
embedded model shared by the slow suite.

Nothing here downloads anything. The real embedded model is only used by tests marked ``slow``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import ARCHS, WeightGuard, tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from overtone.benchmarks import load_benchmark
from overtone.models import load_model
from overtone.models.loading import LoadedModel

# Tiny models gain nothing from several threads, and on busy cores the threads wait for each other:
# one ROME/MEMIT test took 23 s with torch's default of 2 threads and 0.3 s with 1.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def eval_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own evaluation cache, never the user's (also for the commands a test starts as processes): runs
    keep the unedited model's evaluation there."""
    root = tmp_path_factory.mktemp("eval-cache")
    monkeypatch.setenv("OVERTONE_EVAL_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def zsre_cases():
    return load_benchmark("zsre", limit=40)


@pytest.fixture(scope="session")
def tokenizer(zsre_cases) -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE trained on ZsRE text: real subword splits, tiny vocabulary."""
    texts = []
    for case in zsre_cases:
        texts += [case.prompt, case.target, *case.rephrases]
        for probes in (*case.portability.values(), *case.locality.values()):
            texts += [f"{p.prompt} {p.answer}" for p in probes]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(params=ARCHS)
def any_tiny(request, tokenizer) -> LoadedModel:
    return tiny_model(request.param, tokenizer)


@pytest.fixture
def tiny_llama(tokenizer) -> LoadedModel:
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a local checkpoint folder, for loading and CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", tokenizer)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tokenizer_only(tmp_path, tokenizer) -> Path:
    """A model folder with a tokenizer and no weights: any command that loaded the model here would fail."""
    path = tmp_path / "tokenizer-only"
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path, monkeypatch, zsre_cases):
    """ZsRE text as a stand-in corpus for ROME/MEMIT statistics, cached under tmp_path."""
    monkeypatch.setenv("OVERTONE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    texts = [f"{c.prompt} {c.target}. {' '.join(c.rephrases)}" for c in zsre_cases]
    path.write_text("\n\n".join(texts))
    return str(path)


class SharedModel:
    """The real embedded model, loaded on first use and then shared by every slow test that asks for it, with a guard
    that says how its weights differ from those loaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lm: LoadedModel | None = None
        self._guard: WeightGuard | None = None

    def get(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.name, device="cpu")
            self._guard = WeightGuard(self._lm.model)
        return self._lm

    def changes(self) -> list[str]:
        """How the model differs from the one loaded; empty while every test has reverted its edits."""
        return self._guard.changes() if self._guard is not None else []

    def discard(self) -> None:
        """Forget a model a test has changed, so that the next test starts from a fresh load."""
        self._lm = self._guard = None


@pytest.fixture(scope="session")
def shared_smollm() -> SharedModel:
    return SharedModel("smollm2-135m")


@pytest.fixture
def smollm(shared_smollm, request) -> Iterator[LoadedModel]:
    """SmolLM2-135M-Instruct on the CPU, loaded once for the session.

    Sharing is safe only while every test leaves the model as it found it, so after each test this compares it with
    the model as loaded and fails the test that changed it (the next test then loads the model afresh).
    """
    yield shared_smollm.get()
    changes = shared_smollm.changes()
    if changes:
        shared_smollm.discard()
        pytest.fail(f"{request.node.nodeid} left the shared real model changed ({len(changes)} differences): "
                    f"{'; '.join(changes[:5])}", pytrace=False)
