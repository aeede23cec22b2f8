"""LoRA: low-rank adapters on attention projections, trained on the target tokens (built on peft).

The package: ``config`` (settings), ``factors`` (initial values, scaling and regulariser both paths
share), ``editor`` (the editor; one edit at a time through peft), ``per_case`` (the per-case forward
of ``edit_parallel``); OverTone defaults in ``editors/presets/lora.yaml``.

The reference toolkit's LoRA editor (docs: protocol.md (d)): adapters on q_proj and v_proj of every
layer, rank 8, alpha 32, dropout 0.1, Adam lr 5e-3, 70 steps, loss on the target tokens of
``prompt + " " + target``; AdaLoRA is the variant its shipped config selects. Differences, on purpose:

* evaluation runs in eval mode (the reference evaluates with dropout on, so its post-edit metrics are
  random); adapter dropout is active only while training;
* AdaLoRA's orthogonality regulariser is added to the objective explicitly (the reference gets it
  implicitly from peft's forward) and recorded apart from the objective's loss; like the reference we
  do not run its rank allocation unless ``rank_allocation`` is set, so AdaLoRA here is the
  SVD-parametrised adapter at its initial rank (``init_rank``; ``rank``, its target, then has no
  effect and is refused);
* the objective is pluggable. The loop is the reference's: all ``steps`` updates (``stop_loss`` 0
  never stops on the loss). A stop rule, when one is set (``stop_loss`` > 0, ``stop_when_clipped``),
  is judged on an extra forward pass without dropout, so a lucky dropout mask cannot end training.

Single editing injects fresh adapters and removes them on revert, leaving the base weights bit-exact.
Continual editing keeps training the same adapters; reverting a later edit restores their values.

Randomness: every edit call has its own random generator, seeded from ``seed`` and the ids of its cases;
the adapters' initial values and every adapter-dropout mask are drawn from it, in a fixed order
(``factors.initial_factors``, ``models.per_case.dropout_noise``). So an edit does not depend on anything
else drawn from torch's global generator, and a case draws the same values alone and in a parallel edit.

Parallel editing (``edit_parallel``): one adapter per case without peft, the factors of all cases
stacked ([cases, r, in] and [cases, out, r] per adapted module) and applied row by row with the
formulas of peft's LoRA and AdaLoRA layers (``models.per_case.CaseLowRank``), each case with its own
generator, Adam state, AdaLoRA orthogonality term and stop. AdaLoRA's rank allocation is refused there.
"""

from overtone.editors.lora.config import LoRAConfig
from overtone.editors.lora.editor import ADAPTER, LoRA
from overtone.editors.lora.factors import orthogonality
from overtone.editors.lora.per_case import case_memory

__all__ = ["ADAPTER", "LoRA", "LoRAConfig", "case_memory", "orthogonality"]
