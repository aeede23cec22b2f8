"""A 7B rehearsal: FT-M, LoRA, ROME and MEMIT on a randomly initialised Llama-2-7B-shaped model in bfloat16.

Not a test (at 7B it takes most of an hour on a 2-core CPU): it shows, before a GPU is rented, that every
editor's bf16 path runs at the paper's size through the project's own runner (``RunSpec`` ->
``check_run`` -> ``prepare_run`` -> ``PreparedRun.execute``), and measures per editor and ``--parallel B``:

* the peak memory above what is live at each of the runner's calls to the editor (the edit) and to the
  evaluator, the largest of each phase (on the CPU the resident set's high-water mark, reset through
  ``/proc/self/clear_refs``; on CUDA the allocator's peak); the edit's beside what the memory model behind
  ``--parallel auto`` predicts (B cases of ``Editor.case_memory()`` and its shared float32 copy of the
  head), the evaluation's beside B cases of the evaluator's share (``runner.run.case_memory``: the wild
  replies' key/value cache), and the memory the editor itself holds
  (ROME's inverse and MEMIT's second moments);
* seconds per optimisation step, evaluation seconds per case (``--eval both``), and the cost model's
  efficiency on this machine (``overtone.study.budget``: the model's FLOPs and bytes at the machine's own
  measured bf16 matmul peak and bandwidth, over the measured time), which ``study plan`` carries to a GPU;
* any dtype or device path that fails (the error is printed and the next editor runs).

The weights are random, so no edit converges: every edit runs its ``--steps`` and every generated reply its
50 tokens (a worst case: a real model stops a ZsRE answer after a few). ROME and MEMIT take their
second moments from ``--stat-samples`` samples of 128 tokens of the statistics corpus: a small sample,
which the output says, enough for the cost, not for the edits' quality. The tokenizer is the embedded
model's, cut to Llama-2's 32,000 tokens (its first 32,000 and the merges among them), so the embeddings and
the head have Llama-2-7B's shape.

    python benchmarks/rehearsal_7b.py --shape tiny                      # seconds: the same paths, tiny
    nice -n 5 python benchmarks/rehearsal_7b.py --json runs/rehearsal.json   # needs ~17 GiB free
    python benchmarks/rehearsal_7b.py --device cuda                     # on a GPU (benchmarks/gpu_parallel.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the random model has no hub id; nothing is downloaded

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.initialization import no_init_weights

from overtone.editors.parallel import ModelShape, free_memory
from overtone.models import embedded
from overtone.models.loading import DEFAULT_MODEL, LoadedModel, prepare_model
from overtone.runner import ResultStore
from overtone.runner.run import case_memory, check_run, prepare_run
from overtone.runner.spec import RunSpec
from overtone.stats import MomentSpec, second_moments
from overtone.study.budget import MODELS, MachineRates, case_tokens, edit_cost, eval_cost

log = logging.getLogger("rehearsal")

# The shapes rehearsed: the model profiles of the budget (overtone/study/profiles.yaml), and a tiny one
# that runs the same paths in seconds.
TINY = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 32000}
EDITORS = ("ft-m", "lora", "rome", "memit")
STAT_TOKENS = 128


def shape_config(shape: str) -> dict[str, Any]:
    """LlamaConfig fields of ``shape``: ``tiny`` or a model profile of the budget (llama-2-7b, llama-3-8b)."""
    if shape == "tiny":
        return dict(TINY)
    return MODELS[shape].config_fields()


@cache
def cut_tokenizer(vocab: int) -> Any:
    """The embedded model's fast tokenizer keeping ids below ``vocab`` (and the merges that make only those),
    so a model of Llama-2's vocabulary can be fed any text: every byte is one of the first 256 tokens."""
    source, _ = embedded.checkpoint_dir(DEFAULT_MODEL)
    data = json.loads((Path(source) / "tokenizer.json").read_text())
    model = data["model"]
    kept = {token: i for token, i in model["vocab"].items() if i < vocab}
    merges = [m for m in model["merges"] if all(p in kept for p in m) and "".join(m) in kept]
    model["vocab"], model["merges"] = kept, merges
    with tempfile.TemporaryDirectory(prefix="rehearsal-tokenizer-") as scratch:
        folder = Path(scratch)
        (folder / "tokenizer.json").write_text(json.dumps(data))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (Path(source) / name).exists():
                (folder / name).write_text((Path(source) / name).read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) <= vocab, (len(tokenizer), vocab)
    return tokenizer


def random_model(shape: str, device: torch.device, layers: int | None = None) -> LoadedModel:
    """A randomly initialised Llama of ``shape`` in bfloat16 on ``device`` (the weights' values do not change
    the work), with the embedded tokenizer cut to its vocabulary. Built without the library's initialisers
    (the rehearsal's first build, with them, took 526 s on the 2-core CPU) and filled with N(0, 0.02) in
    place."""
    fields = shape_config(shape)
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields, tie_word_embeddings=False)
    tokenizer = cut_tokenizer(config.vocab_size)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device(device), no_init_weights():  # the buffers (rotary frequencies) are still computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    name = f"random-{shape}" + (f"-{layers}-layers" if layers else "")
    return prepare_model(model, tokenizer, name=name, identity={"name": name, "dtype": "bf16", "seed": 0})


# ----------------------------------------------------------------------------------------------- measurement


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def release() -> None:
    """Return freed memory to the system, so the next measurement starts from what is live."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def peak_above(device: torch.device) -> Iterator[dict[str, int]]:
    """The peak bytes above what is live on entry: the CUDA allocator's peak, or the resident set's high-water
    mark (VmHWM, reset by writing 5 to /proc/self/clear_refs) on the CPU."""
    out: dict[str, int] = {}
    release()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    yield out
    out["peak"] = (_rss_kib("VmHWM") - base) * 1024


EDIT_CALLS = ("edit", "edit_parallel")  # what the runner asks an editor for
EVAL_CALLS = ("before", "after", "before_many", "after_many", "before_cases", "after_cases")  # and an evaluator


@contextmanager
def phase_peaks(device: torch.device, editor: Any, evaluator: Any) -> Iterator[dict[str, int]]:
    """The peak bytes above what is live at the start of each call of the runner to the editor (``edit``) and
    to the evaluator (``eval``), the largest of each phase: the memory model behind ``--parallel auto`` is the
    editing's, so its prediction is compared with the edit phase alone. A call made inside a measured call
    (``before_many`` calling ``before``) is part of the outer one."""
    peaks = {"edit": 0, "eval": 0}
    inside = False

    def measured(phase: str, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal inside
            if inside:
                return call(*args, **kwargs)
            inside = True
            try:
                with peak_above(device) as peak:
                    out = call(*args, **kwargs)
            finally:
                inside = False
            peaks[phase] = max(peaks[phase], peak.get("peak", 0))
            return out
        return wrapper

    patched = [(obj, name, vars(obj).get(name)) for obj, names in ((editor, EDIT_CALLS), (evaluator, EVAL_CALLS))
               for name in names if hasattr(obj, name)]
    for obj, name, _ in patched:
        setattr(obj, name, measured("edit" if obj is editor else "eval", getattr(obj, name)))
    try:
        yield peaks
    finally:
        for obj, name, own in patched:
            if own is None:
                delattr(obj, name)  # the class's method is back
            else:
                setattr(obj, name, own)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it has seen it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_rates(device: torch.device) -> MachineRates:
    """This machine's bf16 matmul throughput (a 4096 x 11008 weight times 256 rows) and the bandwidth of a
    one-row product with it (a decode step's reading of the weights): the peaks the cost model's efficiency
    is measured against."""
    weight = torch.randn(11008, 4096, dtype=torch.bfloat16, device=device)

    def timed(rows: int, repeat: int) -> float:
        x = torch.randn(rows, 4096, dtype=torch.bfloat16, device=device)
        x @ weight.T
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeat):
            x @ weight.T
        synchronize(device)
        return (time.perf_counter() - start) / repeat

    flops = 2 * 256 * weight.numel() / timed(256, 5)
    bandwidth = weight.numel() * weight.element_size() / timed(1, 10)
    return MachineRates(flops=flops, bandwidth=bandwidth)


# ----------------------------------------------------------------------------------------------- rehearsal


@dataclass
class Row:
    """One editor at one ``--parallel``: what it did and cost."""

    editor: str
    parallel: int
    status: str = "ok"
    cases: int = 0
    steps: float = 0.0  # optimisation steps, all cases
    setup_s: float = 0.0  # editor built: context prefixes, statistics read, inverse
    edit_s: float = 0.0  # per case
    eval_s: float = 0.0  # per case
    step_s: float = 0.0
    editor_mib: float = 0.0  # held by the editor itself
    peak_mib: float = 0.0  # above the model and editor while editing or evaluating: the larger phase's
    edit_peak_mib: float = 0.0  # above what is live at each editor call, the largest
    eval_peak_mib: float = 0.0  # the same, evaluator calls
    predicted_mib: float = 0.0  # B x (state + activations) + the shared part: the editing's memory model
    predicted_eval_mib: float = 0.0  # B x the evaluation's share (``CaseMemory.evaluation``)
    model_step_s: float = 0.0  # the cost model's step time at this machine's peaks
    model_eval_s: float = 0.0  # the cost model's evaluation time per case at this machine's peaks

    @property
    def ratio(self) -> float:
        """The edit phase's peak over the memory model's prediction for it."""
        return self.edit_peak_mib / self.predicted_mib if self.predicted_mib else float("nan")

    @property
    def eval_ratio(self) -> float:
        """The evaluation's peak over the memory model's prediction for it."""
        return self.eval_peak_mib / self.predicted_eval_mib if self.predicted_eval_mib else float("nan")


def settings_for(editor: str, steps: int, samples: int) -> dict[str, Any]:
    """Few steps; for ROME and MEMIT the second moments from a small sample."""
    settings: dict[str, Any] = {"steps": steps}
    if editor in ("rome", "memit"):
        settings.update(mom2_samples=samples, mom2_max_tokens=STAT_TOKENS)
    return settings


def precompute_moments(lm: LoadedModel, spec: RunSpec) -> None:
    """MEMIT's and ROME's statistics one layer at a time (cached, so the editor reads them): one pass for all
    layers holds a float64 sum of I x I per layer at once, 4.8 GiB for MEMIT's five at 7B."""
    from overtone.editors.memit import default_layers
    from overtone.editors.rome import default_layer

    layers = default_layers(lm) if spec.editor == "memit" else [default_layer(lm)]
    settings = spec.editor_settings
    moment = MomentSpec(max_tokens=settings["mom2_max_tokens"], samples=settings["mom2_samples"])
    for layer in layers:
        second_moments(lm, [layer], moment)
        release()


def editor_memory(editor: str, lm: LoadedModel) -> int:
    """Bytes the editor holds beside its cases, at most (ROME: C read in fp32, widened and inverted in fp64;
    MEMIT: its layers' C in fp32, one layer's lambda C + k k^T and the solve's copy in fp64)."""
    from overtone.editors.memit import default_layers, solve_memory

    if editor == "rome":
        return 3 * 8 * lm.model.config.intermediate_size ** 2
    if editor == "memit":
        return solve_memory(ModelShape.of(lm.model.config, lm.dtype), len(default_layers(lm)))
    return 0


def rehearse(lm: LoadedModel, editor: str, parallel: int, args: argparse.Namespace, rates: MachineRates,
             scratch: Path) -> Row:
    """One editor at one ``--parallel`` through the runner, on the first ``--cases`` ZsRE test cases."""
    row = Row(editor, parallel)
    spec = RunSpec(editor=editor, dataset="zsre", limit=args.cases, model=lm.name, device=str(lm.device),
                   dtype="bf16", threads=torch.get_num_threads(), parallel=parallel, evaluation=args.eval,
                   settings=tuple(settings_for(editor, args.steps, args.stat_samples).items()))
    prepared = None
    try:
        inputs = check_run(spec, lm.tokenizer)
        need = editor_memory(editor, lm) + 2 * parallel * 2**30
        if free_memory(lm.device) < need:
            row.status = (f"skipped: needs about {need / 2**30:.1f} GiB beside the model (editor state, cases, "
                          f"a margin), {free_memory(lm.device) / 2**30:.1f} GiB free")
            return row
        if editor in ("rome", "memit"):
            precompute_moments(lm, spec)
        lm.adapter.drop_fp32_head()  # each row makes its own, as a run of its own would
        start = time.perf_counter()
        with peak_above(lm.device) as held:
            prepared = prepare_run(spec, inputs, lm)
        row.setup_s = time.perf_counter() - start
        row.editor_mib = held["peak"] / 2**20
        memory = case_memory(prepared.editor, prepared.evaluator, lm)
        row.predicted_mib = (parallel * (memory.state + memory.activations) + memory.shared) / 2**20
        row.predicted_eval_mib = parallel * memory.evaluation / 2**20
        with ResultStore(scratch / f"{editor}-{parallel}", prepared.config) as store, \
                phase_peaks(lm.device, prepared.editor, prepared.evaluator) as phases:
            prepared.execute(store)
            records = store.records
        row.edit_peak_mib, row.eval_peak_mib = phases["edit"] / 2**20, phases["eval"] / 2**20
        row.peak_mib = max(row.edit_peak_mib, row.eval_peak_mib)
        row.cases = len(records)
        row.steps = sum(r["steps"] for r in records)
        row.edit_s = sum(r["edit_s"] for r in records) / len(records)
        row.eval_s = sum(r["eval_s"] for r in records) / len(records)
        row.step_s = row.edit_s * len(records) / max(row.steps, 1)
        tokens = [case_tokens(lambda text: len(lm.tokenizer(text)["input_ids"]), case) for case in inputs.cases]
        shape = MODELS.shape_of(lm.model.config)
        costs = [edit_cost(editor, shape, prepared.editor.config, t) for t in tokens]
        row.model_step_s = sum(rates.step_seconds(c.step_flops * parallel, c.weight_bytes) / parallel
                               for c in costs) / len(costs)
        row.model_eval_s = sum(rates.eval_seconds(eval_cost(shape, t, args.eval, prepared.editor.first_layer),
                                                  shape, parallel) for t in tokens) / len(tokens)
    except Exception as exc:  # a failing dtype or device path is what the rehearsal reports
        log.exception("%s --parallel %d failed", editor, parallel)
        row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        del prepared
        release()
    return row


def table(rows: list[Row], rates: MachineRates, args: argparse.Namespace, device: str, lm_name: str) -> str:
    """The rows as a Markdown table, with what they were measured on."""
    lines = [f"{lm_name} (random weights, bf16) on {device}, {torch.get_num_threads()} threads; "
             f"{args.cases} ZsRE test cases, {args.steps} steps per edit, --eval {args.eval}; ROME/MEMIT second "
             f"moments from {args.stat_samples} samples of {STAT_TOKENS} tokens (a small sample); machine: "
             f"bf16 matmul {rates.flops / 1e9:.0f} GFLOP/s, one-row product {rates.bandwidth / 1e9:.1f} GB/s",
             "",
             "| editor | B | steps | s/step | model s/step | edit s/case | eval s/case | model eval s/case | "
             "editor MiB | peak MiB | edit peak MiB | eval peak MiB | predicted edit MiB | edit peak/predicted | "
             "predicted eval MiB | eval peak/predicted | status |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.editor} | {r.parallel} | | | | | | | | | | | | | | | {r.status} |")
            continue
        lines.append(f"| {r.editor} | {r.parallel} | {r.steps:g} | {r.step_s:.2f} | {r.model_step_s:.2f} | "
                     f"{r.edit_s:.1f} | {r.eval_s:.1f} | {r.model_eval_s:.1f} | {r.editor_mib:.0f} | "
                     f"{r.peak_mib:.0f} | {r.edit_peak_mib:.0f} | {r.eval_peak_mib:.0f} | {r.predicted_mib:.0f} | "
                     f"{r.ratio:.2f} | {r.predicted_eval_mib:.0f} | {r.eval_ratio:.2f} | ok |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b", help="llama-2-7b, llama-3-8b or tiny")
    parser.add_argument("--layers", type=int, default=None,
                        help="the shape's widths with this many layers (a quicker check of its rates)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--editors", default=",".join(EDITORS))
    parser.add_argument("--parallel", default="1,2", help="the --parallel B values, comma-separated")
    parser.add_argument("--cases", type=int, default=2, help="ZsRE test cases per run")
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps per edit")
    parser.add_argument("--eval", default="both", help="teacher-forced, wild or both")
    parser.add_argument("--stat-samples", type=int, default=8, help="ROME/MEMIT statistics samples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and machine rates here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    editors = [e.strip() for e in args.editors.split(",") if e.strip()]
    sizes = [int(x) for x in args.parallel.split(",")]
    rates = machine_rates(device)
    start = time.perf_counter()
    lm = random_model(args.shape, device, args.layers)
    log.info("built %s in %.0f s; %.1f GiB free", lm.name, time.perf_counter() - start,
             free_memory(device) / 2**30)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as scratch, \
            tempfile.TemporaryDirectory(prefix="rehearsal-cache-") as cache_dir:
        # the statistics of random weights are kept only for this rehearsal
        os.environ["OVERTONE_CACHE"] = cache_dir
        for editor in editors:
            for size in sizes:
                row = rehearse(lm, editor, size, args, rates, Path(scratch))
                rows.append(row)
                log.info("%s", row)
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"shape": lm.name, "device": str(device),
                                                     "threads": torch.get_num_threads(), "rates": asdict(rates),
                                                     "args": {k: str(v) for k, v in vars(args).items()},
                                                     "rows": [asdict(r) for r in rows]}, indent=1))
    print(table(rows, rates, args, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", lm.name))


if __name__ == "__main__":
    main()
