"""Text from data stays text: rich markup, matplotlib mathtext and HTML in prompts, targets and run names
come out literally from every place that prints or draws them, and nothing crashes.

A prompt with ``[/i]`` used to crash the command (a closing tag with nothing open), ``[link=...]`` became a
terminal hyperlink, ``$\\nosuchcmd{ x$`` aborted the figures and ``$5 ... $10`` was typeset as math.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from matplotlib.text import Text
from typer.testing import CliRunner

from overtone.cli import app
from overtone.cli.common import console
from overtone.diagnostics import load_traces
from overtone.report.figures import png, probe_loss_figure, ud_heatmap_figure
from overtone.report.tables import markdown_text, to_rich, token_table

runner = CliRunner()
MARKUP = "[/i] [link=https://x.test/]here[/link] [bold]b[/bold]"
MATH = r"$\nosuchcmd{ x$ costs $5 or $10"
HTML = "<b>tag</b> &amp; <script>x</script>"
PROMPT = f"Fact {MARKUP} {MATH} {HTML} is"
TARGET = "$5 [/i] <i>ok</i>"
RUN = "run [red]x[link=mailto:a] $x$ <b> a|b"  # a run directory's name is data too (no slash: one folder)


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """A facts file full of markup, a bench run in a directory named with markup, and a trace of it."""
    root = tmp_path_factory.mktemp("escaping")
    facts = root / "facts.json"
    facts.write_text(json.dumps([{"prompt": PROMPT, "target": TARGET, "paraphrases": [f"Also {MATH}"],
                                  "locality": [f"Unrelated {MARKUP}"]},
                                 {"prompt": f"Second {HTML} is", "target": "two"}]))  # two: a section each
    tiny = ["--model", str(tiny_llama_dir), "--device", "cpu", "--layer", "2", "--steps", "2"]
    run = root / "runs" / RUN
    for args in (["bench", "--dataset", str(facts), "--out", str(run), *tiny],
                 ["trace", "--dataset", str(facts), "--limit", "2", "--out", str(root / "trace"), *tiny]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return {"facts": facts, "run": run, "trace": root / "trace", "root": root}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """No wrapping inside a table cell, so a payload shows on one line."""
    monkeypatch.setattr(console, "width", 2000)


def literal(output: str, *texts: str) -> None:
    for text in texts:
        assert text in output, f"{text!r} not printed as itself:\n{output}"
    assert "\x1b]8;" not in output, "a terminal hyperlink was emitted"


def unescaped(markdown: str, *raw: str) -> list[str]:
    """The pieces of ``raw`` that occur in ``markdown`` without a backslash before them."""
    return [r for r in raw if re.search(r"(?<!\\)" + re.escape(r), markdown)]


def test_edit_prints_prompts_and_targets_as_text(made, tiny_llama_dir):
    result = runner.invoke(app, ["edit", "--facts", str(made["facts"]), "--model", str(tiny_llama_dir),
                                 "--device", "cpu", "--layer", "2", "--steps", "2", "--show", "2"])
    assert result.exit_code == 0, result.output
    literal(result.output, PROMPT, TARGET, f"Also {MATH}", f"Unrelated {MARKUP}")


def test_table_prints_run_names_as_text(made):
    result = runner.invoke(app, ["table", str(made["run"])])
    assert result.exit_code == 0, result.output
    literal(result.output, RUN)
    result = runner.invoke(app, ["table", "--markdown", str(made["run"])])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("|")]
    assert any(markdown_text(RUN) in row for row in rows) and not any(RUN in row for row in rows)
    assert {row.count(" | ") for row in rows[2:]} == {rows[0].count(" | ")}, "a name split a table row"


def test_errors_print_data_as_text(made, tmp_path):
    missing = tmp_path / "[/i] [link=https://x.test/]gone[/link]"
    result = runner.invoke(app, ["table", str(missing)])
    assert result.exit_code != 0
    literal(result.output, str(missing.name))


def test_trace_tables_keep_prompts_as_text(made):
    with console.capture() as shown:
        console.print(to_rich(token_table(load_traces(made["trace"] / "trace.json")[1])))
    literal(shown.get(), PROMPT, TARGET)
    tokens = (made["trace"] / "tokens.md").read_text()
    assert markdown_text(PROMPT) in tokens and PROMPT not in tokens
    assert not unescaped(tokens, "<b>", "<script>", "[link=", "$5")


def test_report_escapes_html_and_markdown(made):
    out = made["root"] / "report"
    result = runner.invoke(app, ["report", str(made["run"]), str(made["trace"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert html.escape(PROMPT) in page and HTML not in page and html.escape(RUN) in page
    markdown = (out / "report.md").read_text()
    assert markdown_text(PROMPT) in markdown and markdown_text(RUN) in markdown
    assert not unescaped(markdown, "<b>", "<script>", "](https://x.test/", "$x$", "[red]")


@pytest.mark.parametrize("draw", [probe_loss_figure, ud_heatmap_figure])
def test_figures_draw_data_without_mathtext(made, draw):
    figure = draw([t for t in load_traces(made["trace"] / "trace.json")[1] if t.prompt == PROMPT])
    assert png(figure).startswith(b"\x89PNG")  # drawing did not abort on the unknown command
    drawn = [t._preprocess_math(t.get_text()) for t in figure.findobj(Text)]
    data = [(text, math) for text, math in drawn if "nosuchcmd" in text or "$5" in text]
    assert data, "no figure text carries the prompt or the target"
    assert not any(math for _, math in data), data
    assert any(MATH in text for text, _ in data) or any("$5" in text for text, _ in data)
