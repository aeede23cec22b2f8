"""WISE: edits written into a side copy of one FFN output matrix, routed per sequence.

The package: ``config`` (settings), ``memory`` (shards, side outputs, distances, TIES), ``editor``
(routing hooks and training); per-model settings in ``editors/presets/wise.yaml``.

After Wang et al. 2024, *WISE: Rethinking the Knowledge Memory for Lifelong Model Editing*, as the
OverTone paper ran it (docs/protocol.md (e), paper Appendix B):

* **Side memory.** A copy W' of the ``mlp_out`` matrix W of one late layer; the model's own weights
  never change. An edit trains W' with SGD on the objective (CE or OverTone: OverTone replaces only
  this term) plus the activation-margin loss below, with the gradient masked by a random
  Bernoulli(``mask_ratio``) mask drawn once per shard, and W' clamped element-wise to
  W ± ``norm_constraint`` after every step. No data augmentation (the paper removed WISE's
  context-template copies to measure heterogeneous token overfitting).
* **Activation distance.** ``d(x) = mean_t ‖act(W'a_t) − act(W a_t)‖₂`` over the real tokens of a
  sequence, where a_t is the FFN's inner activation and act the model's activation function (the
  reference toolkit's form; the paper writes it without act).
* **Margin loss.** With d_in the distance on the edit and d_out on an irrelevant sentence (ZsRE train
  ``loc + " " + loc_ans``, ``benchmarks.irrelevant``): ``[d_out − d_in + γ]₊ + [d_out − α]₊ + [β − d_in]₊``.
* **Routing.** A shard's threshold is ``min over its edits of d_in`` (measured after each edit) ×
  ``act_ratio`` × ``threshold_scale``. At inference every sequence of a batch computes d for every
  shard; it takes the shard with the largest d among those above their thresholds, or the original
  output if none is. Padding is ignored (``models.routing``), so a row routes the same alone or in a batch.
* **Shards.** Every ``save_freq`` edits the current shard is closed and a new one (with a new mask) is
  opened; every ``merge_freq`` edits the shards closed since the last merge are merged with TIES
  (trim to ``density``, elect signs, disjoint mean) into one memory whose threshold is the smallest of
  theirs. Routing retrieves across all memories (WISE-Retrieve, the toolkit's default).

Differences from the reference toolkit, all deliberate: distances ignore padding; a shard's threshold
uses each edit's distance after its last update (the toolkit records it one step earlier); with
several cases in one call each case is an edit with its own irrelevant sentence.

Speed: the FFN input at the side-memory layer cannot change, so training replays only the layers from
it up (``models.replay``), and the irrelevant sentence's distance is a product with its recorded FFN
input, with no forward pass at all after the first.
"""

from overtone.editors.wise.config import WISEConfig
from overtone.editors.wise.editor import WISE
from overtone.editors.wise.memory import Shard, ties_merge

__all__ = ["WISE", "Shard", "WISEConfig", "ties_merge"]
