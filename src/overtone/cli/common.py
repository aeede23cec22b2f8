"""The glue of the commands: the console, clean one-line exits, logging and signal setup, the run
directory's lock and interrupts, and a run's specification handed to the runner with a progress bar.

Options are declared in cli/options.py; what they mean is checked in ``runner.spec.RunSpec``; runs are
assembled and executed by runner/run.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console()
if not console.is_terminal:
    console.width = 120  # logs and pipes: wide enough that tables never truncate a number
log = logging.getLogger("overtone")
T = TypeVar("T")


def setup(threads: int, verbose: bool) -> None:
    """Logging, signals and torch threads of a command (a run seeds its generators itself, per chunk)."""
    import torch
    from rich.logging import RichHandler
    from transformers.utils import logging as hf_logging

    from overtone.runner.signals import raise_on_signals

    raise_on_signals()  # SIGINT/SIGTERM revert the weights and end the run cleanly (exit_on_interrupt)

    hf_logging.disable_progress_bar()

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long
    raise typer.Exit(code=2)


def check_out(out: Path, resumed: bool = True) -> None:
    """Refuse at once, before any heavy import, a run directory that another process is writing or (when the
    run would resume it) that a writer could not resume (damaged ``config.yaml`` or ``cases.jsonl``); creates
    nothing (``runner.store``)."""
    from overtone.runner.store import RunLock, StoreError, check_resumable

    try:
        RunLock(out).check_free()
        if resumed:
            check_resumable(out)
    except StoreError as exc:
        fail(str(exc))


def hold_run_dir(out: Path) -> Any:
    """The lock of run directory ``out`` (``runner.store.RunLock``), or a clean exit naming its holder."""
    from overtone.runner.store import RunLock, StoreError

    try:
        return RunLock(out).acquire()
    except StoreError as exc:
        fail(str(exc))


@contextmanager
def exit_on_interrupt(out: Path | None = None) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a one-line message and exit status 128 + signal; the weights were reverted by
    then (editors and ``edit_chunk`` restore them on any exception). ``out``: the run directory whose finished
    cases are on disk (None: a command that writes nothing before it ends, ``overtone edit``)."""
    from overtone.runner.signals import Interrupted
    from overtone.runner.store import StoreError, read_run

    try:
        yield
    except KeyboardInterrupt as exc:
        name, code = (exc.name, exc.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
        if out is None:
            said = "nothing was saved; rerun the same command to start again"
        else:
            try:
                saved = f"{len(read_run(out)[1])} finished cases are saved in {out}"
            except (StoreError, OSError, ValueError):
                saved = "no case was finished"
            said = f"{saved}; rerun the same command to resume"
        console.print(f"[bold red]interrupted[/] by {name}: {escape(said)}", soft_wrap=True)
        raise typer.Exit(code=code) from None


def progress_bar() -> Progress:
    """A progress bar with a free-text status field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


def specified(build: Callable[[], T]) -> T:
    """What ``build`` makes of the options (a ``runner.spec.RunSpec``, OverTone's config, editor settings), or
    a clean exit naming the option that does not fit."""
    from overtone.runner.settings import SettingError
    from overtone.runner.spec import SpecError

    try:
        return build()
    except (SpecError, SettingError) as exc:
        fail(str(exc))


def check_spec(spec: Any) -> Any:
    """``runner.run.check_run``: every case checked with the tokenizer, before the model loads; a clean exit."""
    from overtone.runner.run import check_run
    from overtone.runner.spec import SpecError

    try:
        return check_run(spec)
    except SpecError as exc:
        fail(str(exc))


def prepare_spec(spec: Any, inputs: Any = None, lm: Any = None) -> Any:
    """``runner.run.prepare_run`` (the model loaded unless ``lm``); a clean exit."""
    from overtone.runner.run import prepare_run
    from overtone.runner.spec import SpecError

    try:
        return prepare_run(spec, inputs, lm)
    except SpecError as exc:
        fail(str(exc))


def execute(prepared: Any, out: Path, label: str, lock: Any = None, observer: Any = None) -> dict[str, Any]:
    """Execute a prepared run into run directory ``out`` (resumed when it holds the same run) with a progress
    bar (its status: the last case's scores, or the step of the edit in flight); ``lock``: the directory's
    ``RunLock`` when the caller took it before loading the model; ``observer`` sees every edit call
    (``runner.bench.EditObserver``)."""
    from overtone.runner import ResultStore, RunError, StoreError
    from overtone.runner.run import StepProgress

    try:
        store = ResultStore(out, prepared.config, lock)
    except StoreError as exc:
        fail(str(exc))
    with store:
        if store.done:
            log.info("%s: resuming, %d cases already done", out,
                     len(store.done & {c.case_id for c in prepared.cases}))
        with progress_bar() as progress:
            task = progress.add_task(label, total=len(prepared.cases), status="")

            def on_case(record: dict[str, Any] | None) -> None:
                """A case finished (its record), or one skipped or edited in a stream (None: the rate)."""
                speed = progress.tasks[task].speed
                status = f"{speed:.2f} cases/s" if speed else ""
                if record is not None:
                    scores = [f"{name} {100 * part['post']['rel']:.0f}" for name, part in
                              (("rel", record), ("wild rel", record.get("wild"))) if part and "post" in part]
                    status = f"{' '.join(scores)} steps {record['steps']} {record['edit_s'] + record['eval_s']:.1f}s"
                progress.update(task, advance=1, status=status)

            def on_step(status: str) -> None:
                progress.update(task, status=status)

            try:
                return prepared.execute(store, on_case, StepProgress(on_step, observer))
            except RunError as exc:
                fail(str(exc))
