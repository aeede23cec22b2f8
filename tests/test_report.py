"""`overtone trace` and `overtone report` on a tiny local model, and the page rendered by a real browser."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import bench, cli

from overtone.diagnostics import load_traces
from overtone.report.runs import ReportError, collect, pair_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# `make test` installs Chromium and sets this, so there the browser test cannot be skipped.
REQUIRE_BROWSER = os.environ.get("OVERTONE_REQUIRE_BROWSER") == "1"
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({name: i.closest('figure') ? i.closest('figure').id : '',
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll('table')].map(t => ({caption: t.caption ? t.caption.textContent : '',
    rows: t.rows.length, height: t.getBoundingClientRect().height,
    cells: [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.textContent))}));
  const fetched = performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));
  const out = document.createElement('pre');
  out.id = 'overtone-check';
  out.textContent = JSON.stringify({images, tables, fetched});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_llama_dir) -> Path:
    """Real runs on the tiny model: CE, OverTone, an ablation, a run with another lr, and a trace."""
    root = tmp_path_factory.mktemp("results")
    bench(root / "runs" / "ce", tiny_llama_dir, "--objective", "ce")
    bench(root / "runs" / "ot", tiny_llama_dir, "--objective", "overtone", "--epsilon", "0")
    bench(root / "runs" / "noclip", tiny_llama_dir, "--objective", "overtone", "--epsilon", "0", "--no-clip")
    bench(root / "runs" / "ce-lr", tiny_llama_dir, "--objective", "ce", "--lr", "0.01")
    # Continual runs are written by another protocol with the same run-directory format; their
    # configuration adds protocol, sequence and eval_timing, which is all the report reads.
    for name in ("ce", "ot"):
        target = root / "runs" / f"{name}-T10"
        shutil.copytree(root / "runs" / name, target)
        config = yaml.safe_load((target / "config.yaml").read_text())
        config.update(protocol="continual", sequence=10, eval_timing="after_all")
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli("trace", "--limit", "2", "--out", root / "trace", "--model", tiny_llama_dir, "--device", "cpu", "--layer", "2",
        "--steps", "3", "--lr", "0.05", "--stop-loss", "0", "--epsilon", "0.001")
    return root


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_trace_writes_json_plots_and_token_tables(results):
    trace_dir = results / "trace"
    meta, traces = load_traces(trace_dir / "trace.json")
    assert meta["dataset"] == {"name": "zsre", "offset": 0}
    assert [(t.case_id, t.label) for t in traces] == [("zsre/0", "CE"), ("zsre/1", "CE"), ("zsre/0", "OverTone"),
                                                       ("zsre/1", "OverTone")]
    # FT-M's own pass after its last update records the final weights: no extra row is needed
    assert all(t.steps == [0, 1, 2, 3] and not t.final_extra for t in traces)
    for name in ("fig1_probe_loss", "fig2_ud_zsre-0", "fig2_ud_zsre-1"):
        width, height = png_size((trace_dir / f"{name}.png").read_bytes())
        assert width > 300 and height > 200
    header, *rows = (trace_dir / "tokens.csv").read_text().splitlines()
    assert header.startswith("objective,i,token,unedited greedy,NLL before,NLL final,UD final")
    assert len(rows) == sum(len(t.tokens) for t in traces)
    markdown = (trace_dir / "tokens.md").read_text()
    assert "**Trace summary (nats)**" in markdown and "| zsre/0 OverTone | 3 |" in markdown


def test_runs_are_paired_only_when_they_differ_in_the_objective(results):
    inputs = collect([results / "runs"])
    by_name = {r.path.name: r for r in inputs.runs}
    assert by_name["noclip"].objective == "w/o clip" and by_name["ce-T10"].sequence == 10
    assert by_name["ce"].sequence == 1  # no `sequence` key: single editing
    assert by_name["ce"].tag == "lr=0.0005" and by_name["ce-lr"].tag == "lr=0.01"
    pairs = {(p.ce.path.name, p.overtone.path.name): p for p in pair_runs(inputs.runs)}
    assert set(pairs) == {("ce", "ot"), ("ce-T10", "ot-T10")}
    pair = pairs["ce", "ot"]
    ce = json.loads((results / "runs" / "ce" / "summary.json").read_text())
    ot = json.loads((results / "runs" / "ot" / "summary.json").read_text())
    assert pair.n_cases == 2 and pair.delta["avg"] == pytest.approx(ot["avg"] - ce["avg"], abs=0.011)
    assert pair.avg is not None and pair.avg.n == 2 and pair.avg.mean == pytest.approx(pair.delta["avg"], abs=0.011)
    assert pair.within_noise is (abs(pair.avg.mean) <= pair.avg.half_width)


def test_report_errors_name_the_input(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        collect([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="holds no run directory"):
        collect([tmp_path / "empty"])
    assert "holds no run directory" in cli("report", tmp_path / "empty", "--out", tmp_path / "r", code=2).output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trace.json").write_text("{}")
    assert "not an overtone trace" in cli("report", tmp_path / "bad", "--out", tmp_path / "r", code=2).output


def test_trace_option_errors(tmp_path, tiny_llama_dir):
    base = ["trace", "--out", str(tmp_path / "t"), "--model", str(tiny_llama_dir), "--device", "cpu"]
    assert "unknown dataset 'nope'" in cli(*base, "--dataset", "nope", code=2).output
    assert "has 1301 cases, so none from --offset 100000" in cli(*base, "--offset", "100000", code=2).output
    assert not (tmp_path / "t").exists()


@pytest.fixture(scope="module")
def report(results) -> Path:
    out = results / "report"
    cli("report", results / "runs", results / "trace", "--out", out)
    return out


def test_report_is_self_contained_and_has_a_markdown_twin(report, results):
    page = (report / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page), "the page references an outside file"
    assert "http://" not in page and "https://" not in page
    for title in ("Single editing (x100)", "Continual editing, ZsRE", "Ablations, ZsRE",
                  "OverTone minus CE, paired (x100 points)", "Per-token trace (nats)"):
        assert html.escape(title) in page
    markdown = (report / "report.md").read_text()
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", markdown)
    assert len(linked) == 4  # Fig. 3, and Fig. 1 + two Fig. 2 of the trace
    assert all((report / link).is_file() for link in linked)
    assert page.count("data:image/png;base64,") == len(linked)


def run_chromium(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` from disk in headless Chromium and return what the check script saw."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000", "--dump-dom"]
    done = subprocess.run([CHROMIUM, *flags, checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="overtone-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def broken_images(seen: dict, page: Path) -> list[str]:
    """Images that did not decode to the size of the PNG embedded for them."""
    sizes = [png_size(base64.b64decode(m)) for m in
             re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())]
    assert len(sizes) == len(seen["images"])
    return [img["name"] for img, size in zip(seen["images"], sizes, strict=True)
            if not (img["complete"] and (img["width"], img["height"]) == size and img["shown"] > 0)]


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail("chromium is not installed; `make test` installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def test_the_page_renders_in_chromium(browser, report, results, tmp_path):
    page = report / "report.html"
    seen = run_chromium(page, tmp_path)
    assert seen["fetched"] == []
    assert len(seen["images"]) == 4 and broken_images(seen, page) == []
    tables = {t["caption"]: t for t in seen["tables"]}
    assert all(t["height"] > 0 for t in seen["tables"])
    single = tables["Single editing (x100)"]
    ce = json.loads((results / "runs" / "ce" / "summary.json").read_text())
    row = next(r for r in single["cells"] if r[0] == "FT-M (lr=0.0005)")
    assert row[1:] == [f"{ce[m]:.2f}" for m in ("rel", "gen", "por", "loc", "avg")]
    assert any(r[0] == "FT-M + OverTone" for r in single["cells"])
    ablation = next(t for name, t in tables.items() if name.startswith("Ablations, ZsRE, tiny-llama"))
    assert [r[0] for r in ablation["cells"]] == [
        "FT-M (lr=0.0005)", "FT-M (lr=0.01)", "FT-M + OverTone", "FT-M + w/o clip", "Δ FT-M OverTone − CE"]
    assert tables["Per-token trace (nats)"]["rows"] > 4


def test_a_broken_image_is_caught(browser, report, tmp_path):
    page = tmp_path / "broken.html"
    text = (report / "report.html").read_text()
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    page.write_text(text[:start] + "AAAA" + text[start + 4:])  # corrupt the first image's PNG signature
    seen = run_chromium(page, tmp_path)
    assert len(broken_images(seen, report / "report.html")) == 1
