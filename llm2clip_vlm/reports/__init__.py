"""Run reports: ``llm2clip-vlm report RUN... -o OUT`` renders one self-contained HTML page.

:mod:`.runs` reads run directories (``metrics.jsonl`` + ``gallery/``), :mod:`.plots` draws the
figures with matplotlib, :mod:`.html` lays out the page (images embedded as base64 PNG/JPEG).
"""

from llm2clip_vlm.reports.html import write_report
from llm2clip_vlm.reports.runs import NotARunError, load_runs

__all__ = ["NotARunError", "load_runs", "write_report"]
