"""Edits as files: save an editor's live edits, apply them to another copy of the model, export a merged model.

* ``artifact``: the folder format, ``save_edit``, ``load_edit``, ``EditArtifact.apply``;
* ``identity``: the base model an edit belongs to (config and tensor hashes) and what differs;
* ``export``: a Hugging Face folder with the edits merged, for plain ``transformers``.

Each editor describes and re-applies its own edits (``Editor.saved_edit`` / ``Editor.apply_saved``).
"""

from overtone.artifacts.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    EditArtifact,
    fact_case,
    fact_record,
    folder_bytes,
    load_edit,
    save_edit,
)
from overtone.artifacts.export import export_model, max_logit_difference, refuse_routed
from overtone.artifacts.identity import EditMismatchError, tensor_sha256

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "EditArtifact",
    "EditMismatchError",
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
