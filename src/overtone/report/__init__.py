"""Tables (and later plots and pages) from run directories."""

from overtone.report.tables import dataset_tables, markdown_table, metric_columns, row_cells, summary_table

__all__ = ["dataset_tables", "markdown_table", "metric_columns", "row_cells", "summary_table"]
