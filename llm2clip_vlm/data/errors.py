"""The bad-input policy every stage applies: :class:`DataError` names the file/record and the
problem; :class:`BadRecords` stops at the first bad record, or skips, counts and reports them
(``bad_records.json``, :func:`write_report`). A :class:`BadRecords` is also the one ledger of the
records a run skipped, whoever found them: the reader, the up-front image check, a DataLoader
worker mid-run (:mod:`llm2clip_vlm.bad_samples`) or a stream (:mod:`llm2clip_vlm.data.train_stream`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

REPORT_FILE = "bad_records.json"


class DataError(ValueError):
    """Bad input data; the message names the file (and row/record) and what is wrong."""


class BadRecords:
    """The bad-input policy: stop at the first bad record, or skip, count and report.

    Args:
        skip_bad: skip bad records instead of stopping (``data.skip_bad``).
        max_bad_fraction: with ``skip_bad``, stop anyway above this share (``data.max_bad_fraction``).
        name: the data set, for messages and the report.
        option: the config key that turns skipping on, named in the error.
        earlier: records of the same data set already skipped by an earlier phase (reading the
            manifest): ``max_bad_fraction`` bounds the total over all phases, not each phase.
    """

    def __init__(
        self,
        skip_bad: bool = False,
        max_bad_fraction: float = 0.01,
        name: str = "",
        option: str = "data.skip_bad",
        earlier: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.skip_bad, self.max_bad_fraction, self.name, self.option = (
            skip_bad,
            max_bad_fraction,
            name,
            option,
        )
        self.skipped: list[tuple[str, str]] = []
        self.earlier = list(earlier)

    def add(self, where: str, error: Exception) -> None:
        """Record a bad record; raises at once unless skipping."""
        if not self.skip_bad:
            raise DataError(f"{error} (set {self.option}=true to skip bad records)") from error
        self.skipped.append((where, str(error)))

    def take(self, pairs: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
        """Note ``[record, reason]`` pairs skipped elsewhere (a DataLoader worker, another rank, the
        run resumed from), each record once: whoever skipped them applied the policy. The new ones."""
        pairs = list(pairs)
        if not pairs:  # the common case (a batch without skips): no pass over the ledger
            return []
        known = {r for r, _ in self.skipped}
        new: list[tuple[str, str]] = []
        for record, reason in pairs:
            if record not in known:
                known.add(record)
                new.append((str(record), str(reason)))
        self.skipped += new
        return new

    def check(self, total: int) -> None:
        """After a pass over ``total`` records: log the skips and stop if too many were bad.

        ``total`` counts the records this phase saw; the earlier phases' skips are added to both
        the bad and the total count.
        """
        if not self.skipped:
            return
        bad, total = len(self.skipped) + len(self.earlier), total + len(self.earlier)
        share = bad / max(total, 1)
        log.warning(
            "%s: skipped %d of %d records (%.1f%%); first: %s",
            self.name, len(self.skipped), total, 100 * share, self.skipped[0][1],
        )  # fmt: skip
        if share > self.max_bad_fraction:
            phases = f" ({len(self.earlier)} when reading, {len(self.skipped)} here)" if self.earlier else ""
            first = (self.earlier or self.skipped)[0][1]
            raise DataError(
                f"{self.name}: {bad} of {total} records are bad{phases} ({100 * share:.1f}% > "
                f"max_bad_fraction {100 * self.max_bad_fraction:.1f}%); first: {first}"
            )


def write_report(
    out_dir: str | Path, name: str, total: int, skipped: Sequence[tuple[str, str]]
) -> Path | None:
    """Add the skipped records of data set ``name`` to ``<out_dir>/bad_records.json`` (merged).

    The report maps each data set to ``{"records": total, "skipped": [{"record", "reason"}, ...]}``.
    Nothing is written when nothing was skipped and there is no report yet.
    """
    path = Path(out_dir) / REPORT_FILE
    if not skipped and not path.is_file():
        return None
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    entry = report.setdefault(name, {"records": total, "skipped": []})
    entry["records"] = max(int(entry.get("records", 0)), total)
    seen = {s["record"] for s in entry["skipped"]}
    entry["skipped"] += [{"record": w, "reason": r} for w, r in skipped if w not in seen]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path
