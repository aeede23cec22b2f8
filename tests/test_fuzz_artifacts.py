"""Fuzzed artifact loader: real edit artifacts, mutated at random, are either accepted because they are intact
or refused with ``ArtifactError`` naming the folder, the file and the field; never another exception, never
an applied corrupt edit.

The artifacts are saved from a tiny random Llama by FT-M, LoRA (AdaLoRA), ROME, WISE and MELO (two facts
each). 120 seeded mutations per artifact: bytes flipped (1 to 4096) in any file, a file truncated, removed,
swapped for another artifact's, an extra file, the manifest's JSON broken, or one manifest field anywhere
dropped, retyped, changed or renamed. A mutation of what the edit is (format, base model, files, the edit's
tensors, ROME's targets) is also tried with the manifest sealed again (its own hash recomputed), as a
crafted folder would be ("crafted"), and so is a tensor file changed with its size and sha256 recorded again: those
must be caught by the checks that name a field, not by the seal. Rewriting editor settings with a new seal
makes another, consistent edit, so it is not tried. An accepted folder is applied to the model: its logits
and weights must equal the intact artifact's, and its revert must restore the model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_state, state, tiny_model
from test_artifacts import CASE, OTHER, PAIRS
from test_memory_editors import SETTINGS as MEMORY_SETTINGS
from test_memory_editors import logits_of, structure

from overtone.artifacts import ArtifactError, load_edit, save_edit
from overtone.artifacts.identity import config_sha256
from overtone.artifacts.manifest import MANIFEST, sealed
from overtone.editors import EditStack, make_editor
from overtone.objectives import CrossEntropy

log = logging.getLogger(__name__)

TRIES_PER_ARTIFACT = 120
KINDS = {
    "ft-m": dict(layer=3, steps=5, lr=1e-2),
    "lora": dict(steps=5, lr=1e-2),
    "rome": dict(layer=1, mom2_adjustment=False, context_lengths=((4, 2),), steps=6, lr=2.0, stop_loss=0.0),
    "wise": dict(MEMORY_SETTINGS["wise"], steps=10),
    "melo": dict(MEMORY_SETTINGS["melo"], steps=10),
}
TENSOR_FILES = ("edit.safetensors", "adapter_model.safetensors")
OTHER_VALUES = [None, True, 0, -1, 1.5, "x", "", [], {}, [1], {"a": 1}]


def places(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into ``value`` (dict keys and list indices), the value itself excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out += [(*path, key), *places(item, (*path, key))]
    return out


def changed(value: Any, rng: random.Random) -> Any:
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, -value - 1, 2**63])
    if isinstance(value, float):
        return rng.choice([value * 2, -value, value + 1e-6, 0.0])
    if isinstance(value, str) and len(value) == 64:  # a sha256: another one
        at = rng.randrange(64)
        return value[:at] + ("0" if value[at] != "0" else "1") + value[at + 1:]
    if isinstance(value, str):
        return rng.choice([value + "x", "", value[::-1] + "y", "../" + value, value.upper() + "Z"])
    if isinstance(value, list):
        return rng.choice([value[:-1], [*value, copy.deepcopy(value[0]) if value else 1], [*value[::-1], 0]])
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return "x"


def is_structural(kind: str, path: tuple) -> bool:
    """What the edit is: a sealed-again change of these must still be refused (or change nothing applied)."""
    return path[0] in ("format", "format_version", "model", "files") or path[:2] == ("edit", "tensors") or \
        (path[:2] == ("edit", "state") and kind == "rome")


def seal(folder: Path, files: bool = False) -> None:
    """Seal the manifest again (with ``files``: record the files' present sizes and hashes first)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if files:
        manifest["files"] = {name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                                    "bytes": (folder / name).stat().st_size} for name in manifest["files"]}
    (folder / MANIFEST).write_text(json.dumps(sealed({k: v for k, v in manifest.items() if k != "manifest_sha256"})))


def flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    count = min(len(out), rng.choice([1, 1, 2, 16, 256, 4096]))
    start = rng.randrange(len(out) - count + 1)
    for i in range(start, start + count):
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def mutate(kind: str, folder: Path, others: dict[str, Path], rng: random.Random) -> str:
    """Damage ``folder`` in one random way; returns what was done."""
    files = sorted(p.name for p in folder.iterdir())
    how = rng.choice(["flip", "flip", "truncate", "remove", "extra", "swap", "json", "field", "field", "field",
                      "crafted", "crafted", "another-base", "tensor-resealed"])
    if how == "tensor-resealed":
        (name,) = [f for f in files if f in TENSOR_FILES]
        (folder / name).write_bytes(flip((folder / name).read_bytes(), rng))
        seal(folder, files=True)
        return f"{how} {name}"
    if how in ("flip", "truncate", "remove"):
        name = rng.choice(files)
        path = folder / name
        if how == "flip":
            path.write_bytes(flip(path.read_bytes(), rng))
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
        else:
            path.unlink()
        return f"{how} {name}"
    if how == "extra":
        name = rng.choice(["notes.txt", "adapter_config.json", "edit.safetensors", "model.safetensors", ".hidden"])
        if (folder / name).exists():
            name = f"extra-{name}"
        (folder / name).write_bytes(rng.randbytes(rng.randrange(1, 64)))
        return f"{how} {name}"
    if how == "swap":
        source = others[rng.choice(sorted(k for k in others if k != kind))]
        name = rng.choice(sorted(p.name for p in source.iterdir()))
        shutil.copy(source / name, folder / name)
        return f"{how} {name} from {source.name}"
    path = folder / MANIFEST
    text = path.read_text()
    if how == "another-base":  # consistent, sealed, but made on other weights: refused when applied
        manifest = json.loads(text)
        model = manifest["model"]
        if rng.random() < 0.5:
            name = rng.choice(sorted(model["tensors"]))
            model["tensors"][name]["sha256"] = changed(model["tensors"][name]["sha256"], rng)
        else:
            name = rng.choice(sorted(k for k, v in model["config"].items() if isinstance(v, int | float)))
            model["config"][name] = changed(model["config"][name], rng)
            model["config_sha256"] = config_sha256(model["config"])
        path.write_text(json.dumps(manifest))
        seal(folder)
        return f"{how} {name}"
    if how == "json":
        at = rng.randrange(len(text))
        broken = rng.choice([text[:at], text[:at] + rng.choice("{}[],:\"x0") + text[at:], "[]", "\"manifest\"", "1",
                             text.replace('"format"', '"format": "x", "format"', 1)])
        path.write_text(broken)
        return f"{how} at {at}"
    manifest = json.loads(text)
    where = rng.choice(places(manifest))
    if how == "crafted":  # a part of what the edit is first (the config alone has ~30 entries), then a place in it
        parts = [p for p in places(manifest) if is_structural(kind, p) and p[0] != "manifest_sha256"]
        group = rng.choice(sorted({p[:2] for p in parts}))
        where = rng.choice([p for p in parts if p[:2] == group])
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    key, value = where[-1], parent[where[-1]]
    op = rng.choice(["drop", "retype", "change", *(["rename"] if isinstance(parent, dict) else [])])
    if op == "drop":
        del parent[key]
    elif op == "retype":
        parent[key] = rng.choice([v for v in OTHER_VALUES if type(v) is not type(value)])
    elif op == "change":
        parent[key] = changed(value, rng)
    else:
        parent[f"{key}x"] = parent.pop(key)
    path.write_text(json.dumps(manifest, indent=2))
    again = how == "crafted"
    if again:
        seal(folder)
    return f"{op} {'.'.join(map(str, where))}{' (sealed again)' if again else ''}"


def reason(exc: ArtifactError) -> str:
    """A refusal's kind, for the tally: the field (two levels deep), a tensor, or the problem's first words."""
    if exc.field is None:
        return str(exc).split(": ")[1][:32]
    if exc.file in TENSOR_FILES and exc.field not in ("bytes", "sha256"):
        return "a tensor"
    return ".".join(exc.field.split("[")[0].split(".")[:2])


@pytest.fixture(scope="module")
def intact(tokenizer, tmp_path_factory):
    """Per kind: the artifact folder, and the logits and weights of the tiny model with it applied."""
    lm = tiny_model("llama", tokenizer)
    base = state(lm)
    root = tmp_path_factory.mktemp("intact")
    out = {}
    for kind, settings in KINDS.items():
        editor, stack = make_editor(kind, lm, CrossEntropy(), **settings), EditStack()
        for case in (CASE, OTHER):
            stack.push(editor.edit([case]))
        save_edit(editor, root / kind, facts=[CASE, OTHER])
        stack.revert()
        handle = load_edit(root / kind).apply(lm)
        out[kind] = (root / kind, logits_of(lm, PAIRS), state(lm))
        handle.revert()
        assert_same_state(lm, base)
    return lm, base, out


def test_mutated_artifacts_are_accepted_intact_or_refused_naming_file_and_field(intact, tmp_path):
    lm, base, artifacts = intact
    shape = structure(lm)
    folders = {kind: folder for kind, (folder, _, _) in artifacts.items()}
    tally: Counter[tuple[str, str]] = Counter()
    for kind, (folder, logits, weights) in artifacts.items():
        rng = random.Random(f"issue-24-{kind}")
        for i in range(TRIES_PER_ARTIFACT):
            copy_ = tmp_path / f"{kind}-{i}"
            shutil.copytree(folder, copy_)
            what = mutate(kind, copy_, folders, rng)
            stage = "refused by load_edit"
            try:
                try:
                    artifact = load_edit(copy_)
                    stage = "refused when applied"
                    handle = artifact.apply(lm)
                except ArtifactError as exc:
                    message = str(exc)
                    assert str(copy_) in message and exc.file and exc.file in message, (what, message)
                    assert exc.file in (MANIFEST, "adapter_config.json", *TENSOR_FILES), (what, message)
                    assert_same_state(lm, base)
                    assert structure(lm) == shape, what
                    tally[(stage, f"{exc.file}: {reason(exc)}")] += 1
                    continue
                assert all(torch.equal(a, b) for a, b in zip(logits_of(lm, PAIRS), logits, strict=True)), what
                assert_same_state(lm, weights)
                handle.revert()
                assert_same_state(lm, base)
                assert structure(lm) == shape, what
                tally[("accepted", what.split(" ")[0])] += 1
            except Exception as exc:
                raise AssertionError(f"{kind} try {i}: {what}: {type(exc).__name__}: {exc}") from exc
            finally:
                shutil.rmtree(copy_)
    total = sum(tally.values())
    log.info("%d mutations: %s", total, json.dumps({f"{s} | {r}": n for (s, r), n in sorted(tally.items())}, indent=1))
    assert total == TRIES_PER_ARTIFACT * len(KINDS) >= 500
    accepted = sum(n for (s, _), n in tally.items() if s == "accepted")
    assert 0 < accepted < total / 4  # some mutations leave the edit intact (whitespace, extra files); most do not
