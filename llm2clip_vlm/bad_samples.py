"""Images found unreadable *during* training (``data.verify_images=false``): skip, count, replace.

The data-loading side (:func:`load_or_replace`, run in DataLoader workers) never raises for a bad
image: it draws a replacement position from a generator seeded by ``(seed, epoch, position,
attempt)`` alone, so the replacement is the same in every run, process count and resume, and it
hands the failures back with the sample. The training side (:class:`MidRunBadImages`, in the
main process) applies the policy to them: without ``data.skip_bad`` the run stops with one line
naming the file (no worker traceback, since nothing was raised in the worker); with it, each bad
image is counted once, listed in ``bad_records.json`` and the run stops only when the records
skipped over all phases (reading, the up-front check, mid-run) exceed ``data.max_bad_fraction``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip_vlm.data.errors import REPORT_FILE, BadRecords, DataError, write_report

# Consecutive unreadable draws before giving up: a data set this broken is not worth training on.
MAX_TRIES = 16


def load_or_replace(
    load: Callable[[Any], Any],
    records: Sequence[Any],
    indices: Sequence[int],
    position: int,
    epoch: int,
    seed: int,
) -> tuple[Any, int, str]:
    """Load the image at sampler ``position``; on a bad image, a deterministic replacement.

    Returns:
        ``(image, record index used, failures)`` where ``failures`` is a JSON list of
        ``[record, reason]`` pairs ("" when none), a string so the default collate keeps it.
    """

    failures: list[list[str]] = []
    pos = position
    for attempt in range(1, MAX_TRIES + 1):
        index = indices[pos]
        record = records[index]
        try:
            image = load(record)
            return image, index, json.dumps(failures) if failures else ""
        except DataError as e:
            failures.append([getattr(record, "source", "") or getattr(record, "key", str(index)), str(e)])
            pos = int(np.random.default_rng((seed, epoch, position, attempt)).integers(len(indices)))
    raise DataError(f"{MAX_TRIES} images in a row could not be read; first: {failures[0][1]}")


class MidRunBadImages:
    """The main process's side: the policy over the failures the loader reports.

    Args:
        skip_bad, max_bad_fraction: ``data.skip_bad`` and ``data.max_bad_fraction``.
        out: the run directory (``bad_records.json`` there also holds the earlier phases' skips).
        name: the data set's name in the report (``train``).
        total: records in the data set (after reading).
        seen: bad records already counted (restored from a checkpoint).
        write: write ``bad_records.json`` (the main process only).
    """

    def __init__(
        self,
        skip_bad: bool,
        max_bad_fraction: float,
        out: Path,
        name: str,
        total: int,
        seen: Iterable[Sequence[str]] = (),
        write: bool = True,
    ) -> None:
        self.out, self.name, self.write = Path(out), name, write
        # The ledger (data.errors.BadRecords): this phase's skips, restored from the checkpoint.
        self.ledger = BadRecords(skip_bad, max_bad_fraction, name=f"{name} images")
        self.ledger.take(seen)
        mine = {r for r, _ in self.ledger.skipped}
        report = self.out / REPORT_FILE
        entry = json.loads(report.read_text()).get(name, {}) if report.is_file() else {}
        # Skipped before training (reading, up-front check); the report also lists this phase's.
        self.ledger.earlier = [
            (s["record"], s["reason"]) for s in entry.get("skipped", []) if s["record"] not in mine
        ]
        # The report counts the records as read (with the ones skipped then); ``total`` those kept.
        self.read_total = max(total, int(entry.get("records", 0)))

    @property
    def seen(self) -> list[tuple[str, str]]:
        """The records skipped mid-run so far (what the checkpoint stores)."""
        return self.ledger.skipped

    def add(self, failures: Iterable[str]) -> None:
        """Apply the policy to one batch's reported failures (raises DataError to stop)."""
        known = {r for r, _ in self.ledger.skipped}
        new: list[tuple[str, str]] = []
        for item in failures:
            for record, reason in json.loads(item) if item else []:
                if record not in known:
                    known.add(record)
                    new.append((record, reason))
        if not new:
            return
        # Met again after a resume: listed in the report by the run before, not an earlier phase.
        self.ledger.earlier = [e for e in self.ledger.earlier if e[0] not in known]
        for record, reason in new:
            self.ledger.add(record, DataError(reason))  # raises unless skipping
        if self.write:
            write_report(self.out, self.name, self.read_total, new)
        self.ledger.check(self.read_total - len(self.ledger.earlier))


def gather_failures(accelerator: Any, failures: Sequence[str]) -> list[str]:
    """Every process's reported failures, on every process (so all take the same decision).

    One scalar all-reduce per step; the lists themselves are gathered only when there are any.
    """
    failures = [f for f in failures if f]
    if accelerator is None or accelerator.num_processes == 1:
        return failures
    import torch
    from accelerate.utils import gather_object

    count = torch.tensor([float(len(failures))], device=accelerator.device)
    if float(accelerator.reduce(count, reduction="sum").item()) == 0.0:
        return []
    return list(gather_object(failures))
