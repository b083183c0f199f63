"""The report of an evaluation run: titles, Markdown tables, the self-contained HTML page, the files of a run
folder (``write.py``) and the per-query comparison of two runs."""
