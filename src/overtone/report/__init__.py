"""Tables (and later plots and pages) from run directories."""

from overtone.report.stats import PairedDifference, paired_difference, paired_differences
from overtone.report.tables import markdown_table, paired_markdown, paired_table, row_cells, summary_table

__all__ = [
    "PairedDifference",
    "markdown_table",
    "paired_difference",
    "paired_differences",
    "paired_markdown",
    "paired_table",
    "row_cells",
    "summary_table",
]
