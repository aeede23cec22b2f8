"""Tables, figures and pages from run directories and traces.

``tables`` (paper-layout tables, console/Markdown/CSV), ``stats`` (paired differences), ``runs``
(reading and pairing run directories), ``figures`` (matplotlib PNGs of Figs. 1-3) and ``page`` (the
self-contained HTML report and its Markdown twin: ``overtone.report.page.write_report``). Only tables
and statistics are imported here, so commands that print a table do not load matplotlib.
"""

from overtone.report.stats import PairedDifference, paired_difference, paired_differences
from overtone.report.tables import (
    PaperTable,
    dataset_tables,
    extra_tables,
    markdown_table,
    markdown_text,
    metric_columns,
    paired_markdown,
    paired_table,
    protocol_title,
    row_cells,
    summary_table,
    to_markdown,
    to_rich,
)

__all__ = [
    "PairedDifference",
    "PaperTable",
    "dataset_tables",
    "extra_tables",
    "markdown_table",
    "markdown_text",
    "metric_columns",
    "paired_difference",
    "paired_differences",
    "paired_markdown",
    "paired_table",
    "protocol_title",
    "row_cells",
    "summary_table",
    "to_markdown",
    "to_rich",
]
