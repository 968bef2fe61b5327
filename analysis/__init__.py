"""Analysis of hpcnoise run directories: tables, figures and the report."""
