"""An edit as a folder: the changed tensors (never the whole model) plus a self-describing, self-verifying manifest.

Layout of an artifact folder::

    manifest.json               format version, package version, base model identity (name, config and
                                its hash, hashes of the touched tensors' original values), editor and
                                objective settings, the facts, the metrics measured at save time; size and
                                sha256 of every other file, name, shape, dtype and sha256 of every edit
                                tensor, and a hash of itself (``manifest.py``)
    edit.safetensors            the editor's tensors (``Editor.saved_edit``): FT-M the delta of each
                                edited matrix, ROME/MEMIT the factors of their low-rank updates,
                                WISE its side memories, MELO its LoRA blocks and key codebook
    adapter_config.json         LoRA instead of edit.safetensors: the folder is a standard peft
    adapter_model.safetensors   adapter folder, loadable by ``PeftModel.from_pretrained``

``save_edit`` writes it from an editor's live edits; ``load_edit`` reads and verifies all of it (no model
needed): the manifest against its own hash and its fields' types, every file against its size and sha256,
every tensor against the manifest's list, and the edit's layout against the weights it records
(``layout.py``). The tensors ``apply`` uses are those verified bytes, read once. ``EditArtifact.apply``
checks the model against the recorded base and re-applies the edit through the editor class
(``Editor.apply_saved``), returning a handle whose ``revert`` restores the model bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from overtone.artifacts.identity import (
    EditMismatchError,
    base_identity,
    config_sha256,
    differences,
    tensor_record,
)
from overtone.artifacts.layout import check_layout
from overtone.artifacts.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ArtifactError,
    check_seal,
    read_manifest,
    refuse,
    sealed,
)
from overtone.benchmarks.cases import EditCase, Probe
from overtone.editors import EDITORS, EditHandle, Editor
from overtone.editors.base import SavedEdit
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective, OverToneConfig, make_objective
from overtone.version import __version__

log = logging.getLogger(__name__)

TENSORS = "edit.safetensors"
PEFT_TENSORS = "adapter_model.safetensors"  # peft's file names
PEFT_CONFIG = "adapter_config.json"
PEFT_EDITORS = frozenset({"lora"})  # editors whose folder is a peft adapter folder (``SavedEdit.peft_config``)
# What a value of the wrong type or range raises where a config, objective or fact is built from the manifest.
_BAD_VALUE = (TypeError, ValueError, AttributeError, KeyError, IndexError)


def fact_record(case: EditCase) -> dict[str, Any]:
    """A case as JSON, in the field names of hand-written facts where they exist (``benchmarks.facts``)."""
    record: dict[str, Any] = {"id": case.case_id, "prompt": case.prompt, "target": case.target}
    if case.subject:
        record["subject"] = case.subject
    if case.ground_truth:
        record["ground_truth"] = case.ground_truth
    if case.rephrases:
        record["paraphrases"] = list(case.rephrases)
    for name in ("portability", "locality"):
        groups = getattr(case, name)
        if groups:
            record[name] = {kind: [asdict(p) for p in probes] for kind, probes in groups.items()}
    if case.edits:
        record["edits"] = [fact_record(e) for e in case.edits]
    return record


def fact_case(record: dict[str, Any]) -> EditCase:
    """The inverse of ``fact_record``."""

    def groups(name: str) -> dict[str, tuple[Probe, ...]]:
        return {kind: tuple(Probe(p["prompt"], p["answer"], tuple(p.get("aliases", ()))) for p in probes)
                for kind, probes in record.get(name, {}).items()}

    return EditCase(case_id=record["id"], prompt=record["prompt"], target=record["target"],
                    subject=record.get("subject"), ground_truth=record.get("ground_truth"),
                    rephrases=tuple(record.get("paraphrases", ())), portability=groups("portability"),
                    locality=groups("locality"), edits=tuple(fact_case(e) for e in record.get("edits", ())))


def _tuples(value: Any) -> Any:
    """JSON lists back into the tuples of frozen config dataclasses."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def new_folder(path: Path | str) -> Path:
    """``path`` as the destination of a new folder: refused when it exists and is not empty."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ArtifactError(f"{path} already exists and is not an empty folder; choose a new one")
    return path


def write_folder(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` in a temporary sibling folder and rename it to ``path``: no half-written folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkdtemp (and safetensors) make private files; the folder is meant to be shared like any other
        tmp.chmod(0o777 & ~umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class EditArtifact:
    """A saved edit, read from its folder and verified (``load_edit``); ``apply(lm)`` puts it on a model."""

    path: Path
    manifest: dict[str, Any]
    saved: SavedEdit  # the editor's tensors and state, from the verified bytes of the folder

    @property
    def editor(self) -> str:
        return self.manifest["editor"]["name"]

    @property
    def editor_class(self) -> type[Editor]:
        return EDITORS[self.editor]

    @property
    def is_peft_adapter(self) -> bool:
        return self.editor in PEFT_EDITORS

    @property
    def tensor_file(self) -> str:
        return PEFT_TENSORS if self.is_peft_adapter else TENSORS

    @property
    def facts(self) -> list[EditCase]:
        return [fact_case(r) for r in self.manifest["facts"]]

    @property
    def base_names(self) -> list[str]:
        """The model parameters the edit changes or builds on."""
        return list(self.manifest["model"]["tensors"])

    def describe(self) -> str:
        objective = (self.manifest.get("objective") or {}).get("name", "-")
        return f"{self.path} ({self.editor} + {objective}, {len(self.manifest['facts'])} facts)"

    def config(self) -> Any:
        """The editor's resolved config, rebuilt from the manifest."""
        cls = self.editor_class.config_class
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: _tuples(v) for k, v in self.manifest["editor"].items() if k in names})
        except _BAD_VALUE as exc:
            raise refuse(self.path, MANIFEST, "editor", f"its {self.editor} settings are not valid in this overtone "
                                                        f"({__version__}): {exc}") from None

    def objective(self) -> Objective | None:
        settings = self.manifest.get("objective")
        if not settings:
            return None
        names = {f.name for f in fields(OverToneConfig)}
        try:
            return make_objective(settings["name"], OverToneConfig(**{k: v for k, v in settings.items() if k in names}))
        except _BAD_VALUE as exc:
            raise refuse(self.path, MANIFEST, "objective", f"not a valid objective here: {exc}") from None

    def check(self, lm: LoadedModel) -> None:
        """Raise ``EditMismatchError`` naming what differs when ``lm`` is not the model the edit was made on."""
        problems = differences(lm, self.manifest["model"])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise EditMismatchError(
                f"{self.path / MANIFEST}: field model: the edit was made on {self.manifest['model']['name']}; the "
                f"model {lm.name} differs: " + "; ".join(problems[:5]) + more, file=MANIFEST, field="model")

    def apply(self, lm: LoadedModel, check: bool = True) -> EditHandle:
        """Apply the edit to ``lm`` in place; the handle's ``revert`` restores ``lm`` bit for bit.

        Several artifacts applied in sequence go on an ``EditStack``, which reverts them newest first. An
        edit that does not fit ``lm`` is refused (``ArtifactError``) with ``lm`` left as it was.
        """
        if check:
            self.check(lm)
        try:
            return self.editor_class.apply_saved(lm, self.config(), self.saved, self.objective())
        except (*_BAD_VALUE, RuntimeError) as exc:
            raise refuse(self.path, self.tensor_file, None, f"the {self.editor} edit does not apply to {lm.name}: "
                                                            f"{exc}") from None


def save_edit(editor: Editor, path: Path | str, facts: Sequence[EditCase] = (), metrics: dict[str, Any] | None = None,
              protocol: dict[str, Any] | None = None) -> EditArtifact:
    """Write the live edits of ``editor`` (applied and not reverted) as an artifact folder at ``path``, and read
    it back through every check of ``load_edit``.

    ``facts`` are the cases that were edited, ``metrics`` what was measured on them, ``protocol`` how
    they were applied (a sequence, batches); all three go into the manifest as given.
    """
    path = new_folder(path)
    saved = editor.saved_edit()
    if not saved.tensors:
        raise ArtifactError(f"the {editor.name} editor holds no live edits to save")
    lm = editor.lm
    # distinct CPU copies: safetensors refuses tensors that share memory (a MELO cluster's centre and keys)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in saved.tensors.items()}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "overtone_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": base_identity(lm, saved.base),
        "editor": editor.describe(),
        "objective": editor.objective.config() if editor.objective else None,
        "protocol": protocol or {},
        "edit": {"state": saved.state, "tensors": {n: tensor_record(t) for n, t in tensors.items()}},
        "facts": [fact_record(c) for c in facts],
        "metrics": metrics,
    }

    def write(folder: Path) -> None:
        if saved.peft_config is not None:
            config = copy.deepcopy(saved.peft_config)
            config.base_model_name_or_path = lm.model.name_or_path or lm.name
            config.save_pretrained(str(folder))
            save_file(tensors, str(folder / PEFT_TENSORS), metadata={"format": "pt"})
        else:
            save_file(tensors, str(folder / TENSORS), metadata={"format": "pt"})
        manifest["files"] = {file.name: {"sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
                                         "bytes": file.stat().st_size} for file in sorted(folder.iterdir())}
        (folder / MANIFEST).write_text(json.dumps(sealed(manifest), indent=2) + "\n")

    write_folder(path, write)
    return load_edit(path)


def _read_files(folder: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The bytes of every file the manifest lists, each of its recorded size and sha256 (read once, then used)."""
    expected = {PEFT_CONFIG, PEFT_TENSORS} if manifest["editor"]["name"] in PEFT_EDITORS else {TENSORS}
    listed = manifest["files"]
    if listed.keys() != expected:
        wrong = sorted(listed.keys() ^ expected)[0]
        raise refuse(folder, MANIFEST, f"files.{wrong}", f"a {manifest['editor']['name']} edit's folder holds "
                                                         f"exactly {', '.join(sorted(expected))}")
    contents = {}
    for name in sorted(expected):
        record, file = listed[name], folder / name
        if not file.is_file():
            raise refuse(folder, name, None, "missing or not a file (the manifest lists it)")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise refuse(folder, name, "bytes", f"{size} bytes, the manifest records {record['bytes']}: the file is "
                                                "truncated or was changed")
        with file.open("rb") as handle:
            data = handle.read(record["bytes"] + 1)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != record["bytes"] or digest != record["sha256"]:
            raise refuse(folder, name, "sha256", f"{digest[:12]} differs from the manifest's {record['sha256'][:12]}: "
                                                 "the file is damaged or was changed")
        contents[name] = data
    unlisted = sorted(p.name for p in folder.iterdir() if p.name not in expected | {MANIFEST})
    if unlisted:
        log.info("%s: ignoring files the manifest does not list: %s", folder, ", ".join(unlisted))
    return contents


def _tensors(folder: Path, file: str, data: bytes, listed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``data``, exactly those the manifest lists, by name, shape, dtype and sha256."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise refuse(folder, file, None, f"not a readable safetensors file: {exc}") from None
    missing, extra = sorted(listed.keys() - tensors.keys()), sorted(tensors.keys() - listed.keys())
    if missing or extra:
        name = (missing or extra)[0]
        raise refuse(folder, file, name, "listed in the manifest (edit.tensors) but not in the file" if missing
                     else "in the file but not listed in the manifest (edit.tensors)")
    for name, tensor in tensors.items():
        got = tensor_record(tensor)
        for key in ("shape", "dtype", "sha256"):
            if got[key] != listed[name][key]:
                raise refuse(folder, file, name, f"{key} {got[key]} differs from the manifest's {listed[name][key]} "
                                                 "(edit.tensors)")
    return tensors


def _peft_config(folder: Path, data: bytes) -> Any:
    """The peft adapter config from the verified bytes of ``adapter_config.json``."""
    from peft import PeftConfig

    try:
        values = json.loads(data.decode("utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"expected an object, found {type(values).__name__}")
        return PeftConfig.from_peft_type(**values)
    except (UnicodeDecodeError, RecursionError, *_BAD_VALUE) as exc:
        raise refuse(folder, PEFT_CONFIG, None, f"not a peft adapter config: {exc}") from None


def load_edit(path: Path | str) -> EditArtifact:
    """Read the artifact folder at ``path`` and verify all of it, before any model is loaded.

    Every refusal is an ``ArtifactError`` naming the folder, the file and the field or tensor.
    """
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    model = manifest["model"]
    if config_sha256(model["config"]) != model["config_sha256"]:
        raise refuse(folder, MANIFEST, "model.config", "its sha256 differs from model.config_sha256: the config was "
                                                       "changed after the edit was saved")
    check_seal(folder, manifest)
    name = manifest["editor"]["name"]
    if name not in EDITORS:
        raise refuse(folder, MANIFEST, "editor.name", f"unknown editor {name!r}; known: {', '.join(sorted(EDITORS))}")
    contents = _read_files(folder, manifest)
    file = PEFT_TENSORS if name in PEFT_EDITORS else TENSORS
    tensors = _tensors(folder, file, contents[file], manifest["edit"]["tensors"])
    state = manifest["edit"]["state"]
    check_layout(folder, file, name, state, tensors, {n: t["shape"] for n, t in model["tensors"].items()})
    peft_config = _peft_config(folder, contents[PEFT_CONFIG]) if name in PEFT_EDITORS else None
    artifact = EditArtifact(folder, manifest, SavedEdit(tensors=tensors, state=state, peft_config=peft_config))
    artifact.config()
    artifact.objective()
    for i, record in enumerate(manifest["facts"]):
        try:
            fact_case(record)
        except _BAD_VALUE as exc:
            raise refuse(folder, MANIFEST, f"facts[{i}]", f"not a fact: {exc}") from None
    return artifact


def folder_bytes(path: Path) -> int:
    """Bytes of the files in an artifact or model folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())

