"""MELO: one LoRA block per edit, switched on per sequence by a key lookup in a codebook of clusters.

The package: ``config`` (settings), ``codebook`` (keys and clusters), ``editor`` (the peft blocks,
routing hooks and training); per-model settings in ``editors/presets/melo.yaml``.

After Yu et al. 2024, *MELO: Enhancing Model Editing with Neuron-Indexed Dynamic LoRA*, as the
reference toolkit implements it (docs/protocol.md (e)) and the OverTone paper ran it (Appendix B):

* **Blocks.** Every ``edit`` call adds its own LoRA adapter (rank ``rank``) on the ``roles`` modules of
  ``layers`` and trains only it, with Adam and a step decay (``lr_step``, ``lr_gamma``) on the objective
  (CE or OverTone). The adapters are peft LoRA adapters; peft's mixed-batch forward (``adapter_names``)
  applies a different adapter, or none (``__base__``), to each row of a batch.
* **Keys.** A sequence's key is the residual stream entering block ``key_layer`` at its last real
  token (the toolkit's ``key_id = -1``); under teacher forcing that is the answer's last token.
* **Codebook.** Clusters with a centre, a radius, a label (the edit's target) and their keys, each
  key pointing at the block of the edit that added it. An edit's key farther than ``radius +
  init_radius`` from the nearest cluster starts a new cluster of radius ``init_radius``; a nearer key
  with the same label joins that cluster (new centre = mean of its keys, radius grows to cover them);
  a nearer key with another label starts its own cluster and both radii become half their distance,
  dropping the old cluster's keys that fall outside (a conflict split).
* **Routing.** A sequence whose key lies inside the nearest cluster's radius gets the block of that
  cluster's nearest key; outside every radius it gets no LoRA at all, so its output is the base
  model's, bit for bit.

``first_layer`` is ``key_layer`` (at most the lowest LoRA layer): the key is read from that block's
input, so replaying the layers from it up recomputes both the key and the LoRA layers. Training
replays only those layers too.
"""

from overtone.editors.melo.codebook import Cluster, Codebook, row_keys, sequence_keys
from overtone.editors.melo.config import MELOConfig
from overtone.editors.melo.editor import MELO

__all__ = ["MELO", "Cluster", "Codebook", "MELOConfig", "row_keys", "sequence_keys"]
