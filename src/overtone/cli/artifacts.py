"""``overtone apply``, ``export`` and ``generate``: saved edits on a model, merged into a model folder, or
tried out in a chat."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from overtone.cli.app import app
from overtone.cli.common import console, fail, log, setup
from overtone.cli.edit import print_completions, print_metrics, probe_prompts
from overtone.cli.options import (
    BaseDtypeOpt,
    BaseModelOpt,
    BaseModelOptions,
    DeviceOpt,
    EditDirsArg,
    MaxNewTokensOpt,
    SeedOpt,
    ShowOpt,
    ThreadsOpt,
    TrustModelOpt,
    VerboseOpt,
    grouped,
)


def load_artifacts(paths: list[Path]) -> list[Any]:
    """The edit artifacts at ``paths``, every file verified against its manifest (no model needed); a folder
    that fails is a clean exit naming it, the file and what differs."""
    from overtone.artifacts import ArtifactError, load_edit

    try:
        return [load_edit(path) for path in paths]
    except ArtifactError as exc:
        fail(str(exc))


def load_base(artifacts: list[Any], base: Any) -> Any:
    """The model to apply ``artifacts`` to (``artifacts.choose_base``: the user's ``--model``, the embedded model
    the edits were made on, or the manifest's folder or hub id with ``--trust-manifest-model``), in the dtype of
    the first edit unless ``--dtype``; one log line says which model and why."""
    from overtone.artifacts import ArtifactError, choose_base
    from overtone.models import ModelLoadError, load_model
    from overtone.models.loading import DTYPES

    try:
        choice = choose_base(artifacts, base.model, base.trust_manifest_model)
    except ArtifactError as exc:
        fail(str(exc))
    dtype = base.dtype
    if dtype is None and artifacts:
        saved = artifacts[0].manifest["model"]["dtype"]
        dtype = next((name for name, value in DTYPES.items() if str(value) == f"torch.{saved}"), "fp32")
    log.info("base model: %s (%s)", choice.source, choice.reason)
    try:
        return load_model(choice.source, device=base.device, dtype=dtype or "fp32")
    except (ModelLoadError, ValueError) as exc:
        fail(str(exc))


def _apply_all(lm: Any, artifacts: list[Any]) -> Any:
    """An ``EditStack`` holding ``artifacts`` applied in order; a refusal is a clean exit (nothing stays applied)."""
    from overtone.editors import EditStack

    stack = EditStack()
    for artifact in artifacts:
        try:
            stack.push(artifact.apply(lm))
        except ValueError as exc:  # ArtifactError, EditMismatchError, a second peft-based edit
            stack.revert()
            fail(str(exc))
    return stack


@app.command("apply")
@grouped
def apply_edits(
    edits: EditDirsArg,
    *,
    base: BaseModelOptions,
    max_new_tokens: MaxNewTokensOpt = 12,
    show: ShowOpt = 20,
    verbose: VerboseOpt = False,
) -> None:
    """Apply saved edits to a model (refused if it is not their base), measure their facts again next to
    the metrics saved with them, and revert (checked bit for bit)."""
    from overtone.artifacts import tensor_sha256
    from overtone.evaluation import Evaluator
    from overtone.generation import greedy_complete

    artifacts = load_artifacts(edits)
    setup(base.threads, verbose)
    lm = load_base(artifacts, base)
    cases = [case for artifact in artifacts for case in artifact.facts]
    touched = {name: lm.adapter.parameter(name) for a in artifacts for name in a.base_names if _has(lm, name)}
    hashes = {name: tensor_sha256(t) for name, t in touched.items()}
    evaluator = Evaluator(lm)
    pending = [evaluator.before(case, record_from=None) for case in cases]
    rows = probe_prompts(cases[:show])
    before = greedy_complete(lm, [text for *_, text in rows], max_new_tokens)
    stack = _apply_all(lm, artifacts)
    try:
        records = [{"case_id": c.case_id, **evaluator.after(pre, replay=False), "steps": None, "edit_s": None}
                   for c, pre in zip(cases, pending, strict=True)]
        after = greedy_complete(lm, [text for *_, text in rows], max_new_tokens)
    finally:
        stack.revert()
    print_completions(f"{len(artifacts)} edit(s) applied to {lm.name}; greedy completions", rows, before, after)
    print_metrics("teacher-forced metrics of the saved facts (x100, before → after)", cases, records)
    for artifact in artifacts:
        saved = (artifact.manifest.get("metrics") or {}).get("summary")
        if saved:
            console.print(f"{artifact.describe()} at save time: " + ", ".join(
                f"{label} {saved[m]:.1f}" for m, label in (("rel", "Rel."), ("gen", "Gen."), ("por", "Por."),
                                                          ("loc", "Loc.")) if saved.get(m) is not None),
                          markup=False)
    exact = all(tensor_sha256(t) == hashes[name] for name, t in touched.items())
    console.print(f"reverted: the {len(touched)} touched tensor(s) are "
                  f"{'bit for bit as before' if exact else 'NOT as before'}")
    if not exact:
        raise typer.Exit(code=1)


def _has(lm: Any, name: str) -> bool:
    from overtone.models import ArchitectureError

    try:
        lm.adapter.parameter(name)
    except ArchitectureError:
        return False
    return True


@app.command()
@grouped
def export(
    edits: EditDirsArg,
    *,
    out: Annotated[Path, typer.Option("--out", help="the model folder to write (a new folder)")],
    base: BaseModelOptions,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="reload the folder with transformers and compare its logits with the edited "
        "model's on the facts' prompts")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Write a Hugging Face model folder with saved edits merged into the weights (FT-M, LoRA, ROME, MEMIT),
    loadable by plain transformers."""
    from overtone.artifacts import ArtifactError, export_model, folder_bytes, refuse_routed
    from overtone.artifacts.artifact import new_folder

    artifacts = load_artifacts(edits)
    try:
        refuse_routed(artifacts)
        new_folder(out)
    except ArtifactError as exc:
        fail(str(exc))
    setup(base.threads, verbose)
    lm = load_base(artifacts, base)
    try:
        export_model(lm, artifacts, out)
    except ArtifactError as exc:
        fail(str(exc))
    console.print(f"wrote {out} ({folder_bytes(out) / 1e6:.1f} MB): "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})", markup=False)
    if check:
        _check_export(lm, edits, out)


# The largest logit difference --check accepts: FT-M, ROME and MEMIT export bit for bit (0); peft's LoRA merge
# rounds (6.2e-05 on the embedded model in fp32, docs/artifacts.md); bf16 weights round at 2^-8.
EXPORT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}


def _check_export(lm: Any, edits: list[Path], out: Path) -> None:
    """Compare the exported folder, loaded by transformers alone, with the edits as saved: read from their folders
    again and verified (not the objects the export used), applied to ``lm``; exit 1 when they differ."""
    from transformers import AutoModelForCausalLM

    from overtone.artifacts import max_logit_difference
    from overtone.artifacts.identity import dtype_name

    saved = load_artifacts(edits)
    prompts = [text for *_, text in probe_prompts([c for a in saved for c in a.facts])]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=lm.dtype).to(lm.device).eval()
    stack = _apply_all(lm, saved)
    try:
        worst = max_logit_difference(lm.model, exported, lm.tokenizer, prompts)
    finally:
        stack.revert()
    console.print(f"check: max |logit difference| between the exported folder and the saved edits applied over "
                  f"{len(prompts)} prompts: {worst:.3g}")
    tolerance = EXPORT_TOLERANCE.get(dtype_name(lm.dtype), 1e-3)
    if not worst <= tolerance:
        console.print(f"[bold red]error:[/] {out} does not reproduce the saved edits (difference above "
                      f"{tolerance:g}); do not use it", soft_wrap=True)
        raise typer.Exit(code=1)


@app.command()
def generate(
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="a prompt to reply to (repeatable)")] = None,
    edit: Annotated[list[Path] | None, typer.Option("--edit", help="a saved edit to apply first (repeatable)")] = None,
    model: BaseModelOpt = None,
    trust_manifest_model: TrustModelOpt = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="chat on stdin until EOF or 'exit'")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="complete the prompt as plain text, without the chat "
                                                    "template")] = False,
    max_new_tokens: MaxNewTokensOpt = 64,
    temperature: Annotated[float, typer.Option(
        "--temperature", min=0.0, help="sampling temperature (0: greedy)")] = 0.0,
    device: DeviceOpt = "auto",
    dtype: BaseDtypeOpt = None,
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Reply to prompts with a model and saved edits applied (every editor, WISE and MELO included), in the
    model's chat template when it has one."""
    from overtone.evaluation.generation import complete, render

    if not prompt and not interactive:
        fail("give --prompt TEXT (repeatable) or --interactive")
    artifacts = load_artifacts(edit or [])
    setup(threads, verbose)
    lm = load_base(artifacts, BaseModelOptions(model=model, trust_manifest_model=trust_manifest_model, device=device,
                                                 dtype=dtype, threads=threads))
    stack = _apply_all(lm, artifacts)
    chat = bool(lm.tokenizer.chat_template) and not raw
    history: list[dict[str, str]] = []

    def reply(text: str) -> str:
        nonlocal history
        turn = [*history, {"role": "user", "content": text}] if chat else []
        rendered = render(lm.tokenizer, turn) if chat else text
        answer = complete(lm, [rendered], max_new_tokens, temperature, seed, add_special_tokens=not chat)[0]
        if chat and interactive:
            history = [*turn, {"role": "assistant", "content": answer}]
        return answer

    mode = "chat template" if chat else "plain text"
    console.print(f"{lm.name}, {len(artifacts)} edit(s) applied, {mode}", style="dim", markup=False)
    try:
        for text in prompt or []:
            console.print(f"> {text}", style="bold", markup=False, highlight=False)
            console.print(reply(text), markup=False, highlight=False)
        while interactive:
            try:
                text = input("> ")
            except EOFError:
                break
            if text.strip().lower() in ("exit", "quit"):
                break
            if text.strip():
                console.print(reply(text), markup=False, highlight=False)
    finally:
        stack.revert()
