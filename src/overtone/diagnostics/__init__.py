"""Diagnostics of edits: per-token, per-step traces of heterogeneous token overfitting (paper Sec. 2.3)."""

from overtone.diagnostics.trace import (
    TRACE_FILE,
    CaseTrace,
    TraceCollector,
    TraceError,
    TraceRecorder,
    load_traces,
    save_traces,
    trace_edit,
    trace_parallel,
)

__all__ = ["TRACE_FILE", "CaseTrace", "TraceCollector", "TraceError", "TraceRecorder", "load_traces", "save_traces",
           "trace_edit", "trace_parallel"]
