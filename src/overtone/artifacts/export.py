"""A Hugging Face model folder with saved edits merged into the weights, for plain ``transformers``.

Edits that are weight changes export: FT-M, ROME and MEMIT are applied as they are applied in
memory; a LoRA artifact is applied as in memory (peft wrapping, the verified adapter tensors) and
merged by peft itself (each adapter layer's ``merge``, then ``unload``). WISE and MELO route each sequence to a
side memory at inference, which a plain model cannot do: they are refused, and ``overtone generate
--edit`` serves them. The model passed in is restored bit for bit afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from overtone.artifacts.artifact import EditArtifact, new_folder, write_folder
from overtone.artifacts.manifest import ArtifactError
from overtone.editors.base import EditHandle, EditStack, EditStats
from overtone.editors.locate.update import snapshot
from overtone.models.loading import LoadedModel

EDITS_FILE = "overtone_edits.json"  # the manifests of the merged edits, for provenance


def refuse_routed(artifacts: Sequence[EditArtifact]) -> None:
    """Raise for an edit that needs its editor's routing at inference (checked before any model is loaded)."""
    for artifact in artifacts:
        if artifact.editor_class.needs_routing:
            raise ArtifactError(
                f"{artifact.path}: {artifact.editor} edits route each sequence to a side memory at inference, "
                f"which a plain transformers model cannot do; serve them with "
                f"`overtone generate --edit {artifact.path}` instead")


def _merge_peft(lm: LoadedModel, artifact: EditArtifact) -> EditHandle:
    """Merge a LoRA artifact's adapters into the model's weights with peft; the handle restores the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    weights = [lm.adapter.parameter(name) for name in artifact.base_names]
    handle = EditHandle(snapshot(weights), first_layer=0, stats=EditStats(), restores=weights)
    applied = artifact.apply(lm, check=False)  # the verified tensors, as overtone apply puts them on
    try:
        for module in lm.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    except BaseException:
        applied.revert()
        handle.revert()
        raise
    applied.revert()  # unloads peft; the base layers keep the merged weights
    return handle


def export_model(lm: LoadedModel, artifacts: Sequence[EditArtifact], out: Path | str) -> Path:
    """Write ``lm`` with ``artifacts`` applied in order and merged as a Hugging Face folder at ``out``.

    The folder holds the weights (safetensors), config, generation config, tokenizer (with its chat
    template) and ``overtone_edits.json``; ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
    """
    refuse_routed(artifacts)
    out = new_folder(out)
    stack = EditStack()
    try:
        for artifact in artifacts:
            artifact.check(lm)
            stack.push(_merge_peft(lm, artifact) if artifact.is_peft_adapter else artifact.apply(lm, check=False))

        def write(folder: Path) -> None:
            lm.model.save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
            edits = [a.manifest for a in artifacts]  # as verified
            (folder / EDITS_FILE).write_text(json.dumps(edits, indent=2) + "\n")

        write_folder(out, write)
    finally:
        stack.revert()
    return out


@torch.no_grad()
def max_logit_difference(a: PreTrainedModel, b: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         prompts: Sequence[str]) -> float:
    """The largest absolute difference of two models' logits over every position of ``prompts``."""
    worst = 0.0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        la = a(**enc.to(a.device)).logits.float()
        lb = b(**enc.to(b.device)).logits.float()
        worst = max(worst, (la - lb.to(la.device)).abs().max().item())
    return worst
