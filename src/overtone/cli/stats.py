"""``overtone stats``: second-moment statistics of MLP keys for ROME and MEMIT, cached and resumable."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from overtone.cli.app import app
from overtone.cli.common import console, fail, progress_bar, setup
from overtone.cli.options import DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, VerboseOpt


@app.command()
def stats(
    model: ModelOpt = "smollm2-135m",
    layers: Annotated[
        str | None, typer.Option("--layers", help="comma-separated layers (default: ROME's and MEMIT's default layers)")
    ] = None,
    corpus: Annotated[str, typer.Option("--corpus", help="packaged corpus (wikipedia) or a text file")] = "wikipedia",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="tokens per sample")] = 1024,
    samples: Annotated[int | None, typer.Option("--samples", min=1, help="use the first N samples (all)")] = None,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", min=1, help="padded tokens per forward pass")] = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = 1,
    verbose: VerboseOpt = False,
) -> None:
    """Compute (or find in the cache) E[k k^T] of MLP keys at some layers; rerun after an interruption to resume."""
    from overtone.corpus import CorpusError
    from overtone.editors.memit import default_layers
    from overtone.editors.rome import default_layer
    from overtone.models import ArchitectureError, ModelLoadError, load_model
    from overtone.stats import MomentSpec, second_moments

    setup(threads, verbose)
    try:
        lm = load_model(model, device=device, dtype=dtype)
        if layers is None:
            chosen = sorted({default_layer(lm), *default_layers(lm)})
        else:
            chosen = sorted({int(x) for x in layers.split(",") if x.strip()})
        for layer in chosen:
            lm.adapter.check_layer(layer)
        spec = MomentSpec(corpus=corpus, max_tokens=max_tokens, samples=samples)
    except (ModelLoadError, ArchitectureError, ValueError) as exc:
        fail(str(exc))
    start = time.perf_counter()
    try:
        with progress_bar() as progress:
            task = progress.add_task(f"second moments, layers {','.join(map(str, chosen))}", total=None, status="")

            def report(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, status=f"{done:,} tokens")

            result = second_moments(lm, chosen, spec, report, batch_tokens=batch_tokens)
    except KeyboardInterrupt:
        console.print("interrupted; the partial sums are saved, rerun the same command to resume")
        raise typer.Exit(code=130) from None
    except (CorpusError, ValueError) as exc:
        fail(str(exc))
    out = Table(title=Text(f"second moments of {model} on {corpus} ({time.perf_counter() - start:.1f} s)",
                           style="table.title"))
    for column in ("layer", "tokens", "source", "compute s", "file"):
        out.add_column(column)
    for layer, moment in result.items():
        out.add_row(str(layer), f"{moment.tokens:,}", "computed" if moment.computed else "cache",
                    f"{moment.seconds:.0f}", Text(str(moment.path)))
    console.print(out)
