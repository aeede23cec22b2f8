"""Edits as files: save an editor's live edits, apply them to another copy of the model, export a merged model.

* ``artifact``: the folder format, ``save_edit``, ``load_edit`` (which verifies every file), ``EditArtifact.apply``;
* ``manifest``: the manifest's fields and types, its hash of itself, ``ArtifactError``;
* ``layout``: what each editor's saved tensors must look like, against the weights the manifest records;
* ``identity``: the base model an edit belongs to (config and tensor hashes), what differs, which model to load;
* ``export``: a Hugging Face folder with the edits merged, for plain ``transformers``.

Each editor describes and re-applies its own edits (``Editor.saved_edit`` / ``Editor.apply_saved``).
"""

from overtone.artifacts.artifact import (
    EditArtifact,
    fact_case,
    fact_record,
    folder_bytes,
    load_edit,
    save_edit,
)
from overtone.artifacts.export import export_model, max_logit_difference, refuse_routed
from overtone.artifacts.identity import BaseChoice, EditMismatchError, choose_base, tensor_sha256
from overtone.artifacts.manifest import FORMAT_VERSION, ArtifactError

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "BaseChoice",
    "EditArtifact",
    "EditMismatchError",
    "choose_base",
    "export_model",
    "fact_case",
    "fact_record",
    "folder_bytes",
    "load_edit",
    "max_logit_difference",
    "refuse_routed",
    "save_edit",
    "tensor_sha256",
]
