"""Run and trace directories as the report sees them: what was run, and which runs form a CE/OverTone pair.

A run directory (``config.yaml``, ``cases.jsonl``, ``summary.json``) is read with ``read_run``. The
report needs from its configuration the model, dataset, editor, objective, protocol, sequence length
``sequence`` (1 when absent: single editing) and ``eval_timing``. Two runs form a pair when their
configurations differ only in the objective (CE vs OverTone with every component on); the gain is
computed over the cases both runs finished, paired case by case.

A run evaluated with several protocols (``--eval both``) is seen through one ``RunInfo`` per protocol
(``RunInfo.views``): the same run, its records and summary projected onto that protocol's metrics, so
every table, pairing and statistic works the same for teacher-forced and wild numbers.

A ``summary.json`` is shown only while it matches the readable records of ``cases.jsonl`` (their number and,
when it records them, their case ids); otherwise the summary is computed from those records and one warning
says so (``checked_summary``), so a damaged, resumed or hand-edited run never shows stale numbers.

Runs made by different code (``code`` in ``config.yaml``: version, git revision, dirtiness) are still
combined, with one warning naming each run's code (``mixed_code``): ``overtone table`` and ``report``
give it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from overtone.diagnostics import TRACE_FILE
from overtone.evaluation.teacher_forced import METRICS
from overtone.evaluation.wild import WILD, protocol_records
from overtone.objectives import objective_label
from overtone.report.stats import PairedDifference, paired_difference
from overtone.runner.bench import summarize
from overtone.runner.store import CONFIG_FILE, SUMMARY_FILE, VOLATILE_KEYS, StoreError, case_ids_digest, read_run
from overtone.version import describe

log = logging.getLogger(__name__)

TEACHER_FORCED = "teacher-forced"

# Keys that never change results: left out when deciding whether two runs differ only in the objective (the
# code that made them is warned about instead, ``mixed_code``).
NON_RESULT_KEYS = (*VOLATILE_KEYS, "overtone_version")


class ReportError(ValueError):
    """An input of the report cannot be used; the message names it."""


def _name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "-"))
    return "-" if value is None else str(value)


def model_name(identity: Any) -> str:
    """A model's name from its identity (``LoadedModel.identity``); a local folder by its last component."""
    if isinstance(identity, dict) and identity.get("path"):
        return Path(str(identity["path"])).name
    return _name(identity)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): config}


@dataclass
class RunInfo:
    """One run directory: its configuration, per-case records and summary (x100)."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    tag: str = ""  # set by ``tag_runs`` when runs would otherwise share a table cell
    evaluation: str = TEACHER_FORCED  # the protocol whose metrics ``records`` and ``summary`` hold

    @property
    def protocols(self) -> list[str]:
        """The evaluation protocols the run's summary holds (teacher-forced only for older runs)."""
        return list(self.summary.get("protocols", [TEACHER_FORCED]))

    def views(self, protocols: tuple[str, ...] = (TEACHER_FORCED, WILD)) -> list[RunInfo]:
        """The run seen through each of ``protocols`` it has, teacher-forced first."""
        out = []
        for protocol in protocols:
            if protocol not in self.protocols:
                continue
            if protocol == TEACHER_FORCED:
                out.append(self)
            else:
                out.append(RunInfo(self.path, self.config, protocol_records(self.records, protocol),
                                   self.summary[protocol], self.tag, protocol))
        return out

    @property
    def model(self) -> str:
        return model_name(self.config.get("model"))

    @property
    def dataset(self) -> str:
        return _name(self.config.get("dataset"))

    @property
    def editor(self) -> str:
        return _name(self.config.get("editor"))

    @property
    def objective(self) -> str:
        return objective_label(self.config.get("objective"))

    @property
    def protocol(self) -> str:
        return str(self.config.get("protocol") or "single")

    @property
    def sequence(self) -> int:
        """Edits applied before evaluation (T); 1, single editing, when the config has none."""
        return int(self.config.get("sequence") or 1)

    @property
    def eval_timing(self) -> str | None:
        timing = self.config.get("eval_timing")
        return None if timing is None else str(timing)

    @property
    def cell(self) -> tuple[Any, ...]:
        """What a table cell is keyed by; runs sharing it are told apart by ``tag``."""
        return (self.model, self.dataset, self.protocol, self.sequence, self.eval_timing, self.editor, self.objective)

    @cached_property
    def comparison_key(self) -> str:
        """The configuration without the objective and without settings that do not change results."""
        rest = {k: v for k, v in self.config.items() if k not in (*NON_RESULT_KEYS, "objective")}
        return json.dumps(rest, sort_keys=True, default=str)



def code_identities(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The code identities (``version.code_identity``) a run was made with, the latest last; a run older than
    these records gives its version with no revision."""
    latest = config.get("code") or {"version": config.get("overtone_version", "?"), "revision": None}
    return [*(config.get("code_before") or []), latest]


def mixed_code(runs: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """One line naming the runs and their code when ``runs`` (name, config) were not all made by one clean
    revision: different versions or revisions, a dirty tree, or a revision not recorded beside others; None
    when they were."""
    labels = {name: [describe(code) for code in code_identities(config)] for name, config in runs}
    codes = [code for _, config in runs for code in code_identities(config)]
    distinct = {json.dumps(code, sort_keys=True, default=str) for code in codes}
    if len(distinct) < 2 and not any(code.get("dirty") for code in codes):
        return None
    named = "; ".join(f"{name}: {' then '.join(found)}" for name, found in labels.items())
    return f"these runs were made by different or uncommitted code, so their numbers may not be comparable ({named})"


def checked_summary(path: Path, records: list[dict[str, Any]], summary: dict[str, Any] | None
                    ) -> tuple[dict[str, Any], str | None]:
    """The summary to show for run ``path``: its ``summary.json`` while that covers exactly the readable
    ``records``, else one computed from them, with a one-line warning (None when none is due)."""
    if summary is None:  # a run still going (or killed before its end): nothing to disagree with
        return summarize(records), None
    digest = summary.get("case_ids_sha256")
    if summary.get("n_cases") == len(records) and digest in (None, case_ids_digest(records)):
        return summary, None
    differs = (f"covers {summary.get('n_cases')} cases where cases.jsonl holds {len(records)} readable records"
               if summary.get("n_cases") != len(records)
               else f"covers other case ids than the {len(records)} readable records of cases.jsonl")
    return summarize(records), f"{path}: {SUMMARY_FILE} {differs}; the summary shown is computed from those records"


def read_run_info(path: Path) -> RunInfo:
    try:
        config, records, summary = read_run(path)
    except (StoreError, OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read the run ({exc})") from exc
    if not isinstance(config, dict):
        raise ReportError(f"{path}: {CONFIG_FILE} does not hold a mapping")
    summary, warning = checked_summary(path, records, summary)
    if warning:
        log.warning(warning)
    return RunInfo(path=path, config=config, records=records, summary=summary)


@dataclass
class Inputs:
    runs: list[RunInfo] = field(default_factory=list)
    traces: list[Path] = field(default_factory=list)  # trace.json files


def collect(paths: list[Path]) -> Inputs:
    """Run directories and trace files under ``paths`` (each a run, a trace, or a folder holding them)."""
    run_dirs: list[Path] = []
    traces: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ReportError(f"{path}: no such file or directory")
        if path.is_file():
            if path.name != TRACE_FILE:
                raise ReportError(f"{path}: expected a run directory, a trace directory or a {TRACE_FILE}")
            traces.append(path)
        elif (path / CONFIG_FILE).exists() or (path / TRACE_FILE).exists():
            if (path / CONFIG_FILE).exists():
                run_dirs.append(path)
            if (path / TRACE_FILE).exists():
                traces.append(path / TRACE_FILE)
        else:
            found_runs = sorted(p.parent for p in path.rglob(CONFIG_FILE))
            found_traces = sorted(path.rglob(TRACE_FILE))
            if not found_runs and not found_traces:
                raise ReportError(f"{path}: holds no run directory ({CONFIG_FILE}) and no trace ({TRACE_FILE})")
            run_dirs += found_runs
            traces += found_traces
    runs = [read_run_info(p) for p in dict.fromkeys(p.resolve() for p in run_dirs)]
    warning = mixed_code([(str(run.path), run.config) for run in runs])
    if warning:
        log.warning(warning)
    tag_runs(runs)
    return Inputs(runs=runs, traces=list(dict.fromkeys(p.resolve() for p in traces)))


def tag_runs(runs: list[RunInfo]) -> None:
    """Give runs that share a table cell a tag naming the settings in which they differ."""
    cells: dict[tuple[Any, ...], list[RunInfo]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    for group in cells.values():
        if len(group) < 2:
            continue
        flat = [{k: v for k, v in _flatten(r.config).items() if k.split(".")[0] not in NON_RESULT_KEYS}
                for r in group]
        keys = sorted({k for f in flat for k in f if len({json.dumps(g.get(k), default=str) for g in flat}) > 1})
        for run, values in zip(group, flat, strict=True):
            run.tag = ", ".join(f"{k.split('.')[-1]}={values.get(k)}" for k in keys) or run.path.name


@dataclass
class Pair:
    """A CE run and an OverTone run that differ only in the objective, compared on their common cases."""

    ce: RunInfo
    overtone: RunInfo
    n_cases: int  # cases both runs finished (0: no per-case records, summaries compared as they are)
    ce_summary: dict[str, Any]
    overtone_summary: dict[str, Any]
    delta: dict[str, float | None]  # OverTone minus CE per metric and Avg., x100
    avg: PairedDifference | None  # per-case paired Avg. difference with its 95% t-interval

    @property
    def within_noise(self) -> bool | None:
        if self.avg is None or self.avg.n < 2:
            return None
        return not self.avg.significant


def _scored(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with a case id and post-edit metrics: those a paired comparison can use."""
    return [r for r in records if "case_id" in r and isinstance(r.get("post"), dict)]


def _paired(ce: RunInfo, ot: RunInfo) -> Pair:
    ce_records, ot_records = _scored(ce.records), _scored(ot.records)
    common = {r["case_id"] for r in ce_records} & {r["case_id"] for r in ot_records}
    if common:
        ce_summary = summarize([r for r in ce_records if r["case_id"] in common])
        ot_summary = summarize([r for r in ot_records if r["case_id"] in common])
        avg = paired_difference(ce_records, ot_records, "avg")
    else:
        ce_summary, ot_summary, avg = ce.summary, ot.summary, None
    delta = {}
    for metric in (*METRICS, "avg"):
        a, b = ce_summary.get(metric), ot_summary.get(metric)
        delta[metric] = None if a is None or b is None else round(b - a, 2)
    return Pair(ce, ot, len(common), ce_summary, ot_summary, delta, avg)


def pair_runs(runs: list[RunInfo]) -> list[Pair]:
    """Every (CE, OverTone) pair of runs whose configurations differ only in the objective (same protocol view)."""
    groups: dict[tuple[str, str], list[RunInfo]] = {}
    for run in runs:
        groups.setdefault((run.comparison_key, run.evaluation), []).append(run)
    pairs = []
    for group in groups.values():
        for ot in (r for r in group if r.objective == "OverTone"):
            pairs += [_paired(ce, ot) for ce in group if ce.objective == "CE"]
    return pairs
