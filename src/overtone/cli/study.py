"""``overtone study plan|run|status|table``: a grid of runs from one YAML file, locally or on Ray.

    overtone study plan studies/paper-table-4-2.yaml
    overtone study run studies/paper-table-4-2.yaml --out runs/t42 --executor ray --workers 2
    overtone study status runs/t42
    overtone study table runs/t42
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from overtone.cli.app import app
from overtone.cli.common import check_spec, console, fail, progress_bar, setup
from overtone.cli.options import EvalCacheOpt, ExecutionOptions, OptionGroup, VerboseOpt, grouped

study_app = typer.Typer(no_args_is_help=True, help="Studies: grids of runs from one YAML file (docs/studies.md).")
app.add_typer(study_app, name="study")

FileArg = Annotated[Path, typer.Argument(help="study file (YAML; see studies/)")]
DirArg = Annotated[Path, typer.Argument(help="the study's output directory (--out of study run)")]
StudyThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="override torch threads per worker")]
StudyEvalOpt = Annotated[str | None, typer.Option(
    "--eval", help="override the evaluation: teacher-forced, wild or both")]
StudyEvalContextOpt = Annotated[str | None, typer.Option("--eval-context", help="override the wild context: bare, qa")]
StudyAbilityOpt = Annotated[bool, typer.Option(
    "--ability", help="measure the general ability at the end of each chunk (continual cells)")]
StudyAbilityEveryOpt = Annotated[int | None, typer.Option(
    "--ability-every", min=0, metavar="K", help="and after every K edits within each chunk (implies --ability)")]
StudyParallelOpt = Annotated[str | None, typer.Option(
    "--parallel", help="override the cases a worker edits side by side in single editing (a number or auto)")]
MarkdownOpt = Annotated[bool, typer.Option("--markdown", help="print GitHub Markdown")]


@dataclass(frozen=True)
class StudyOverrides(OptionGroup):
    """A profile of the study file and the settings given on the command line; None keeps the file's."""

    profile: Annotated[str | None, typer.Option(
        "--profile", help="a profile of the study file, e.g. llama-2-7b (default: the file's own settings)")] = None
    model: Annotated[str | None, typer.Option("--model", help="override the study's model (path or hub id)")] = None
    device: Annotated[str | None, typer.Option("--device", help="override the device (cpu, cuda, auto)")] = None
    dtype: Annotated[str | None, typer.Option("--dtype", help="override the dtype (fp32, bf16)")] = None
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="override the number of cases")] = None
    offset: Annotated[int | None, typer.Option("--offset", min=0, help="override the first case")] = None

    def load(self, file: Path, **more: Any) -> Any:
        """The study in ``file`` with this profile, these overrides and ``more`` (None = not given)."""
        settings = {k: v for k, v in asdict(self).items() if k != "profile"}
        return load(file, self.profile, **settings, **more)


def load(file: Path | dict[str, Any], profile: str | None = None, **overrides: Any) -> Any:
    """The expanded study, or a clean exit naming the problem."""
    from overtone.study import StudyError, load_study

    try:
        return load_study(file, profile, overrides)
    except StudyError as exc:
        fail(str(exc))


def precheck_study(study: Any) -> None:
    """Every cell's cases checked against its editor and evaluation with the tokenizer alone (the runner's
    ``check_run``, as ``bench`` checks its run), before any worker loads a model: a bad record fails the study
    in seconds, naming the cell's settings."""
    from overtone.runner.spec import SpecError

    seen = set()
    for cell in study.cells:
        key = (cell.model.name, cell.editor, cell.settings, cell.dataset, cell.offset, cell.limit, cell.sequence,
               cell.batch, cell.generation, cell.evaluation, cell.eval_context, cell.parallel != 1)
        if key in seen:
            continue
        seen.add(key)
        try:
            spec = cell.run_spec(study.threads)
        except SpecError as exc:
            fail(f"{cell.name}: {exc}")
        check_spec(spec)


def run_study_cli(study: Any, out: Path, execution: ExecutionOptions, cpus_per_worker: float | None = None,
                  gpus_per_worker: float | None = None) -> Any:
    """Run a study with a progress bar; bad options and study errors become clean exits.

    Returns the scheduler (its cells' outcome); a failed cell is reported, not raised.
    """
    from overtone.study import StudyError
    from overtone.study.driver import run_study
    from overtone.study.executors import ExecutorOptions, make_executor

    precheck_study(study)
    options = ExecutorOptions(threads=study.threads, workers=execution.workers, address=execution.address,
                              cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    try:
        runner = make_executor(execution.executor, options)
    except ValueError as exc:
        fail(str(exc))
    with progress_bar() as progress:
        bar = progress.add_task(study.name, total=None, status="")

        def on_progress(scheduler: Any, state: Any) -> None:
            done, total = scheduler.progress()
            progress.update(bar, completed=done, total=total, status=state.cell.name)

        try:
            scheduler = run_study(study, out, runner, execution.shard_size, on_progress)
        except (StudyError, ValueError) as exc:
            fail(str(exc))
    for state in scheduler.cells.values():
        if state.status == "failed":
            console.print(f"failed: {state.cell.name}: {state.message}", style="bold red", markup=False)
    return scheduler


def print_tables(out: Path, markdown: bool = False) -> None:
    """Print the study's tables and write them to ``out/table.md``."""
    from overtone.report.tables import to_markdown, to_rich
    from overtone.study import StudyError
    from overtone.study.tables import study_tables

    try:
        tables = study_tables(out)
    except StudyError as exc:
        fail(str(exc))
    if not tables:
        console.print(f"{out}: no cell has results yet", markup=False)
        return
    for table in tables:
        if markdown:
            console.print(to_markdown(table) + "\n", markup=False, soft_wrap=True)
        else:
            console.print(to_rich(table))
    (out / "table.md").write_text("\n\n".join(to_markdown(t) for t in tables) + "\n")
    console.print(f"tables in {out / 'table.md'}", markup=False)


@study_app.command("plan")
@grouped
def plan(
    file: FileArg,
    *,
    overrides: StudyOverrides,
    parallel: StudyParallelOpt = None,
    gpu: Annotated[str | None, typer.Option(
        "--gpu", help="also print the GPU-hours on this device (h100, h100-pcie, h200, a100-80gb, a100-40gb, "
        "l40s) at --profile's model shape (llama-2-7b, llama-3-8b)")] = None,
    rate: Annotated[str | None, typer.Option(
        "--rate", metavar="edit=S,eval=S",
        help="with --gpu: seconds per case of editing and of evaluation on that device, measured, instead "
        "of the cost model's (either alone)")] = None,
) -> None:
    """Expand a study file into its cells (with their ids) and count the cases and edits it will make; with
    --gpu, what the study costs on that device, split into editing and evaluation."""
    from overtone.benchmarks import load_benchmark
    from overtone.study.spec import dataset_short

    rates = check_budget_options(overrides.profile, gpu, rate)
    study = overrides.load(file, parallel=parallel)
    grid = Table(title=Text(f"study {study.name}: {len(study.cells)} cells", style="table.title"))
    for header in ("cell (directory)", "editor", "row", "dataset", "T", "seed", "cases", "edits", "runs"):
        grid.add_column(header, justify="right" if header in ("T", "seed", "cases", "edits") else "left")
    loaded: dict[tuple[str, int, int | None], list[Any]] = {}
    total = conditional = 0
    for cell in study.cells:
        key = (cell.dataset, cell.offset, cell.limit)
        if key not in loaded:
            loaded[key] = load_benchmark(cell.dataset, limit=cell.limit, offset=cell.offset)
        cases = loaded[key]
        n_edits = sum(len(c.requests) for c in cases)
        after = study.cell(cell.after).variant.label if cell.after else ""
        if after:
            conditional += n_edits
        else:
            total += n_edits
        grid.add_row(*map(Text, (cell.name, cell.editor, cell.variant.label, dataset_short(cell.dataset),
                                 str(cell.sequence), str(cell.seed), str(len(cases)), str(n_edits),
                                 f"after {after}, if it stops early" if after else "always")))
    console.print(grid)
    for note in study.notes:
        console.print(f"note: {note}", markup=False)
    extra = f", and up to {conditional} more in matched-steps controls" if conditional else ""
    console.print(f"{len(study.cells)} cells, {total} edits{extra}; model {study.cells[0].model.name} "
                  f"({study.cells[0].model.dtype}, device {study.cells[0].model.device})", markup=False)
    if gpu is not None:
        assert overrides.profile is not None  # checked with the options
        print_budget(study, loaded, overrides.profile, gpu, rates)


def check_budget_options(profile: str | None, gpu: str | None, rate: str | None) -> dict[str, float]:
    """--gpu, --rate and the --profile they need, checked before the study is loaded; the rates given."""
    from overtone.study.budget import BudgetError, device, model_profile, parse_rates

    if gpu is None:
        if rate is not None:
            fail("--rate: give the device its seconds were measured on with --gpu")
        return {}
    if profile is None:
        fail("--gpu: give the model shape the budget is for with --profile (llama-2-7b, llama-3-8b)")
    try:
        device(gpu)
        model_profile(profile)
        return parse_rates(rate)
    except BudgetError as exc:
        fail(str(exc))


def print_budget(study: Any, loaded: dict[tuple[str, int, int | None], list[Any]], profile: str, gpu: str,
                 rates: dict[str, float]) -> None:
    """The study's GPU-hours on ``gpu`` at ``profile``'s model shape (study/budget.py), per editor and in all,
    with every assumption it makes; matched-steps cells are left out (they run only if their source stops)."""
    from overtone.study.budget import BudgetError, plan_budget

    try:
        cells = [(c, loaded[(c.dataset, c.offset, c.limit)]) for c in study.cells if not c.after]
        budget = plan_budget(cells, profile, gpu, rates)
    except BudgetError as exc:
        fail(str(exc))
    grid = Table(title=Text(f"budget on one {budget.device.name}, {budget.profile.name}", style="table.title"))
    for header in ("editor", "cells", "cases", "B", "edit s/case", "eval s/case", "edit GPU-h", "eval GPU-h"):
        grid.add_column(header, justify="left" if header == "editor" else "right")
    for editor in dict.fromkeys(c.editor for c in budget.cells):
        rows = [c for c in budget.cells if c.editor == editor]
        cases = sum(c.cases for c in rows)
        edit_s, eval_s = sum(c.edit_s for c in rows), sum(c.eval_s for c in rows)
        windows = sorted({c.window for c in rows})
        grid.add_row(*map(Text, (editor, str(len(rows)), str(cases), ",".join(map(str, windows)),
                                 f"{edit_s / max(cases, 1):.2f}", f"{eval_s / max(cases, 1):.2f}",
                                 f"{edit_s / 3600:.2f}", f"{eval_s / 3600:.2f}")))
    console.print(grid)
    console.print(f"total: {budget.edit_hours + budget.eval_hours:.1f} GPU-hours on one {budget.device.name} = "
                  f"{budget.edit_hours:.1f} editing + {budget.eval_hours:.1f} evaluation", markup=False)
    for line in budget.assumptions:
        console.print(f"assumes: {line}", markup=False, soft_wrap=True)


@study_app.command("run")
@grouped
def run(
    file: FileArg,
    *,
    out: Annotated[Path, typer.Option("--out", help="output directory: one run directory per cell (resumable)")],
    execution: ExecutionOptions,
    cpus_per_worker: Annotated[float | None, typer.Option(
        "--cpus-per-worker", min=0.0, help="ray: CPUs each worker reserves (default: --threads)")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(
        "--gpus-per-worker", min=0.0, help="ray: GPUs each worker reserves (default: 1 with --device cuda)")] = None,
    overrides: StudyOverrides,
    threads: StudyThreadsOpt = None,
    evaluation: StudyEvalOpt = None,
    eval_context: StudyEvalContextOpt = None,
    ability: StudyAbilityOpt = False,
    ability_every: StudyAbilityEveryOpt = None,
    parallel: StudyParallelOpt = None,
    eval_cache: EvalCacheOpt = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run every unfinished cell of a study; safe to kill and rerun (finished cases are kept, none is repeated)."""
    study = overrides.load(file, threads=threads, evaluation=evaluation, eval_context=eval_context,
                           ability=ability or None, ability_every=ability_every, parallel=parallel,
                           eval_cache=None if eval_cache else False)  # --no-eval-cache: off, whatever the file says
    setup(study.threads, verbose)
    scheduler = run_study_cli(study, out, execution, cpus_per_worker, gpus_per_worker)
    print_tables(out)
    counts = scheduler.summary()
    console.print(", ".join(f"{n} cell(s) {status}" for status, n in counts.items()))
    if counts.get("failed"):
        raise typer.Exit(code=1)


@study_app.command("status")
def status(out: DirArg) -> None:
    """Progress of a study directory: each cell's stored cases and state."""
    from overtone.study import StudyError
    from overtone.study.driver import cell_states, driver_running, read_plan

    try:
        plan_info = read_plan(out)
        cells = cell_states(out)
    except StudyError as exc:
        fail(str(exc))
    grid = Table(title=Text(f"study {plan_info['name']} in {out}", style="table.title"))
    for header in ("cell", "row", "cases", "state"):
        grid.add_column(header)
    for cell in cells:
        total = cell.get("cases")
        counted = f"{cell['done']}/{total}" if total is not None else str(cell["done"])
        grid.add_row(*map(Text, (cell["dir"], cell["label"], counted, cell["status"])))
    console.print(grid)
    for cell in cells:
        if cell["message"]:
            console.print(f"{cell['dir']}: {cell['status']}: {cell['message']}", markup=False, soft_wrap=True)
    states: dict[str, int] = {}
    for cell in cells:
        states[cell["status"]] = states.get(cell["status"], 0) + 1
    holder = driver_running(out)
    console.print(", ".join(f"{n} {s}" for s, n in states.items()) + "; " +
                  (f"a driver is running ({holder})" if holder else "no driver is running"), markup=False)
    for line in rates(out, cells):
        console.print(line, markup=False, soft_wrap=True)


def rates(out: Path, cells: list[dict[str, Any]]) -> list[str]:
    """Measured seconds per case (its edits and evaluation, on one worker) per editor, cases per worker-hour,
    and what the cells still to run would take: on a GPU, run a few cases first (--limit) to size a study.
    (A KnowEdit case is one edit; an MQuAKE case bundles several.)"""
    from overtone.study.driver import read_records

    seconds: dict[str, list[float]] = {}
    left: dict[str, int] = {}
    for cell in cells:
        records = read_records(out / cell["dir"]).values()
        seconds.setdefault(cell["editor"], []).extend(r["edit_s"] + r["eval_s"] for r in records)
        if cell["status"] not in ("done", "not needed", "failed") and cell.get("cases") is not None:
            left[cell["editor"]] = left.get(cell["editor"], 0) + cell["cases"] - cell["done"]
    lines = []
    for editor, values in seconds.items():
        if not values:
            continue
        per_case = sum(values) / len(values)
        line = (f"{editor}: {per_case:.2f} s per case (edit and evaluation) over {len(values)} cases = "
                f"{3600 / per_case:.0f} cases per worker-hour")
        if left.get(editor):
            line += f"; {left[editor]} cases left = {left[editor] * per_case / 3600:.2f} worker-hours"
        lines.append(line)
    return lines


@study_app.command("table")
def table(out: DirArg, markdown: MarkdownOpt = False) -> None:
    """Tables of the finished (and partly finished) cells: means over seeds with 95% bootstrap intervals, and
    paired differences to CE."""
    print_tables(out, markdown)
