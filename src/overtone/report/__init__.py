"""Tables (and later plots and pages) from run directories."""

from overtone.report.tables import markdown_table, row_cells, summary_table

__all__ = ["markdown_table", "row_cells", "summary_table"]
