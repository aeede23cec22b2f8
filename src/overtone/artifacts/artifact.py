"""An edit as a folder: the changed tensors (never the whole model) plus a self-describing manifest.

Layout of an artifact folder::

    manifest.json               format version, package version, base model identity (name, config,
                                hashes of the touched tensors' original values), editor and objective
                                settings, the facts, the metrics measured at save time
    edit.safetensors            the editor's tensors (``Editor.saved_edit``): FT-M the delta of each
                                edited matrix, ROME/MEMIT the factors of their low-rank updates,
                                WISE its side memories, MELO its LoRA blocks and key codebook
    adapter_config.json         LoRA instead of edit.safetensors: the folder is a standard peft
    adapter_model.safetensors   adapter folder, loadable by ``PeftModel.from_pretrained``

``save_edit`` writes it from an editor's live edits; ``load_edit`` reads it; ``EditArtifact.apply``
checks the model against the recorded base and re-applies the edit through the editor class
(``Editor.apply_saved``), returning a handle whose ``revert`` restores the model bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from overtone.artifacts.identity import EditMismatchError, base_identity, differences, dtype_name
from overtone.benchmarks.cases import EditCase, Probe
from overtone.editors import EDITORS, EditHandle, Editor
from overtone.editors.base import SavedEdit
from overtone.models.loading import LoadedModel
from overtone.objectives import Objective, OverToneConfig, make_objective
from overtone.version import __version__

FORMAT = "overtone-edit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "edit.safetensors"
PEFT_TENSORS = "adapter_model.safetensors"  # peft's file names
PEFT_CONFIG = "adapter_config.json"


class ArtifactError(ValueError):
    """A folder is not a readable edit artifact, or cannot be written."""


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
    """A saved edit, read from its folder; ``apply(lm)`` puts it on a model."""

    path: Path
    manifest: dict[str, Any]

    @property
    def editor(self) -> str:
        return self.manifest["editor"]["name"]

    @property
    def editor_class(self) -> type[Editor]:
        return EDITORS[self.editor]

    @property
    def is_peft_adapter(self) -> bool:
        return (self.path / PEFT_CONFIG).is_file()

    @property
    def facts(self) -> list[EditCase]:
        return [fact_case(r) for r in self.manifest["facts"]]

    @property
    def base_names(self) -> list[str]:
        """The model parameters the edit changes or builds on."""
        return list(self.manifest["model"]["tensors"])

    @property
    def model_source(self) -> str:
        """What ``load_model`` needs to load the base model: its name, or the folder it was loaded from."""
        model = self.manifest["model"]
        return model["identity"].get("path") or model["name"]

    def describe(self) -> str:
        objective = (self.manifest.get("objective") or {}).get("name", "-")
        return f"{self.path} ({self.editor} + {objective}, {len(self.manifest['facts'])} facts)"

    @cached_property
    def saved(self) -> SavedEdit:
        """The editor's tensors and state, read from the folder."""
        from peft import PeftConfig

        edit = self.manifest["edit"]
        if self.is_peft_adapter:
            return SavedEdit(tensors=load_file(self.path / PEFT_TENSORS), state=edit["state"],
                             peft_config=PeftConfig.from_pretrained(str(self.path)))
        return SavedEdit(tensors=load_file(self.path / TENSORS), state=edit["state"])

    def config(self) -> Any:
        """The editor's resolved config, rebuilt from the manifest."""
        cls = self.editor_class.config_class
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: _tuples(v) for k, v in self.manifest["editor"].items() if k in names})
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: its {self.editor} settings are not valid in this overtone "
                                f"({__version__}): {exc}") from exc

    def objective(self) -> Objective | None:
        settings = self.manifest.get("objective")
        if not settings:
            return None
        names = {f.name for f in fields(OverToneConfig)}
        return make_objective(settings["name"], OverToneConfig(**{k: v for k, v in settings.items() if k in names}))

    def check(self, lm: LoadedModel) -> None:
        """Raise ``EditMismatchError`` naming what differs when ``lm`` is not the model the edit was made on."""
        problems = differences(lm, self.manifest["model"])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise EditMismatchError(
                f"{self.path} was made on {self.manifest['model']['name']}; the model {lm.name} differs: "
                + "; ".join(problems[:5]) + more)

    def apply(self, lm: LoadedModel, check: bool = True) -> EditHandle:
        """Apply the edit to ``lm`` in place; the handle's ``revert`` restores ``lm`` bit for bit.

        Several artifacts applied in sequence go on an ``EditStack``, which reverts them newest first.
        """
        if check:
            self.check(lm)
        return self.editor_class.apply_saved(lm, self.config(), self.saved, self.objective())


def save_edit(editor: Editor, path: Path | str, facts: Sequence[EditCase] = (), metrics: dict[str, Any] | None = None,
              protocol: dict[str, Any] | None = None) -> EditArtifact:
    """Write the live edits of ``editor`` (applied and not reverted) as an artifact folder at ``path``.

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
        "edit": {"state": saved.state,
                 "tensors": {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in tensors.items()}},
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
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")

    write_folder(path, write)
    return EditArtifact(path, json.loads((path / MANIFEST).read_text()))


def load_edit(path: Path | str) -> EditArtifact:
    """Read the artifact folder at ``path``; clear errors for anything that is not one."""
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an edit artifact (no {MANIFEST}); `overtone edit --save DIR` writes one")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version!r}, written by overtone "
                            f"{manifest.get('overtone_version')}; this overtone ({__version__}) reads up to "
                            f"{FORMAT_VERSION}")
    if manifest.get("editor", {}).get("name") not in EDITORS:
        raise ArtifactError(f"{path}: unknown editor {manifest.get('editor', {}).get('name')!r}; "
                            f"known: {', '.join(sorted(EDITORS))}")
    artifact = EditArtifact(path, manifest)
    missing = [f for f in ((PEFT_CONFIG, PEFT_TENSORS) if artifact.is_peft_adapter else (TENSORS,))
               if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"{path}: missing {', '.join(missing)}")
    return artifact


def folder_bytes(path: Path) -> int:
    """Bytes of the files in an artifact or model folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())

