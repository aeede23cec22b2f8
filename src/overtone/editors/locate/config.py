"""Settings that ROME and MEMIT share: the value optimisation, the context prefixes and the statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from overtone.editors.base import config_problems, max_length_field
from overtone.editors.locate.subject import MISSING_SUBJECT
from overtone.editors.training import stop_when_clipped_field
from overtone.stats import MomentSpec


@dataclass(frozen=True)
class LocateConfig:
    """Shared settings; defaults are the reference toolkit's ROME/MEMIT values for Llama-2-7B.

    The value loss is the objective on the target tokens plus ``kl_factor`` times KL(edited || unedited)
    of the next-token distribution after "{subject} is a", plus ``weight_decay * |delta| / |v0|^2``
    (the reference code's form); ``delta`` is projected onto the ball of radius
    ``clamp_norm_factor * |v0|`` after every step, ``v0`` being the unedited value.
    """

    lr: float = field(default=0.5, metadata={"help": "Adam learning rate of the value optimisation (v_lr)"})
    # The reference code's v_num_grad_steps = 25 forward passes make at most 24 updates: it never steps
    # after its last pass, which therefore changes nothing and is skipped here.
    steps: int = field(default=24, metadata={"help": "value updates at most (v_num_grad_steps - 1)"})
    # The reference code compares NLL + KL + weight decay with 5e-2; we compare the objective's loss alone,
    # so the stop means "the target is learnt" whatever the regularisers do (editors/training.py).
    stop_loss: float = field(
        default=5e-2, metadata={"help": "stop the value optimisation when the objective's loss is below"})
    stop_when_clipped: bool = stop_when_clipped_field()
    kl_factor: float = field(default=0.0625, metadata={"help": "weight of the KL term on the kl_prompt"})
    weight_decay: float = field(default=1e-3, metadata={"help": "weight of |delta| / |v0|^2 (v_weight_decay)"})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "|delta| <= clamp_norm_factor * |v0|"})
    kl_prompt: str = field(default="{} is a", metadata={"help": "essence prompt of the KL term; {} = subject"})
    # MEMIT's 5 prefixes of 10 tokens. ROME's paper uses [[5, 10], [10, 10]] (21 prompt variants): on the
    # embedded model it was not better (Avg -2.9 +- 4.4 on 24 development cases) and 2.4x slower (docs/locate.md).
    context_lengths: tuple[tuple[int, int], ...] = field(
        default=((10, 5),),
        metadata={"help": "(tokens, count) of sampled context prefixes, besides the bare prompt"},
    )
    context_seed: int = field(default=0, metadata={"help": "seed of the context prefix sampling"})
    missing_subject: str = field(
        default="error", metadata={"help": "subject not in its prompt: error, or prompt_last (use the last token)"}
    )
    mom2_corpus: str = field(default="wikipedia", metadata={"help": "corpus of the second-moment statistics"})
    mom2_max_tokens: int = field(default=1024, metadata={"help": "tokens per statistics sample (longer texts split)"})
    mom2_samples: int | None = field(default=None, metadata={"help": "statistics samples used (all when None)"})
    max_length: int | None = max_length_field()

    def __post_init__(self) -> None:
        problems = []
        if self.clamp_norm_factor <= 0:
            problems.append(f"clamp_norm_factor must be > 0, got {self.clamp_norm_factor}")
        if min(self.kl_factor, self.weight_decay) < 0:
            problems.append("kl_factor and weight_decay must be >= 0")
        if self.kl_prompt.count("{}") != 1:
            problems.append(f"kl_prompt must contain '{{}}' once, got {self.kl_prompt!r}")
        if self.missing_subject not in MISSING_SUBJECT:
            choices = ", ".join(MISSING_SUBJECT)
            problems.append(f"missing_subject must be one of {choices}, got {self.missing_subject!r}")
        if self.mom2_max_tokens < 2 or (self.mom2_samples is not None and self.mom2_samples < 1):
            problems.append("mom2_max_tokens must be >= 2 and mom2_samples >= 1")
        config_problems(type(self).__name__.removesuffix("Config"), problems, self.steps, self.lr)
        # YAML and the CLI hand over lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "context_lengths", tuple(tuple(int(x) for x in p) for p in self.context_lengths))

    def moment_spec(self) -> MomentSpec:
        return MomentSpec(corpus=self.mom2_corpus, max_tokens=self.mom2_max_tokens, samples=self.mom2_samples)
