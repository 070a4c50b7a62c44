"""The shared benchmark harness: warm-up, interleaved repeats, medians, peak memory, device name.

A suite builds its callables (one per variant, e.g. "tower" and "raw") and calls
:func:`measure`; variants run in interleaved rounds, in alternating order, so drift in the
machine's load (a shared CPU, GPU clocks) hits every variant alike. The suite returns a
:class:`BenchReport`, which :func:`render` prints as a table or as one JSON object.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Per-call times of one variant, in seconds."""

    name: str
    times_s: list[float]
    items_per_call: int = 1
    peak_memory_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def items_per_s(self) -> float:
        return self.items_per_call / self.median_s

    def summary(self) -> dict[str, Any]:
        """The figures a report keeps (not every raw time)."""
        return {
            "name": self.name,
            "median_ms": 1e3 * self.median_s,
            "min_ms": 1e3 * min(self.times_s),
            "max_ms": 1e3 * max(self.times_s),
            "repeats": len(self.times_s),
            "items_per_call": self.items_per_call,
            "items_per_s": self.items_per_s,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class BenchReport:
    """What a suite measured, where, and with what settings."""

    suite: str
    preset: str
    device: str
    settings: dict[str, Any]
    timings: list[Timing]
    # Suite-specific derived figures (e.g. overhead_pct).
    results: dict[str, Any] = field(default_factory=dict)
    memory_note: str = ""
    date: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    command: str = field(default_factory=lambda: " ".join(["llm2clip-vlm", *sys.argv[1:]]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [t.summary() for t in self.timings]
        return d


def resolve_device(device: str | None) -> torch.device:
    """``device`` or, when None, the first GPU if there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU model, or the CPU model and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fns: dict[str, Callable[[], Any]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    items_per_call: int = 1,
    description: str = "bench",
) -> list[Timing]:
    """Time each callable ``repeats`` times after ``warmup`` calls, in interleaved rounds.

    Round ``r`` runs the variants in order, or reversed when ``r`` is odd, so neither always
    runs first. Peak memory per variant is taken on a GPU (allocator peak of one extra call);
    on a CPU there is no per-call peak (see :func:`process_peak_rss`).
    """
    from rich.console import Console

    from llm2clip_vlm.progress import make_progress

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    # The bar goes to stderr: stdout carries the report (``--json`` output must parse).
    with make_progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=repeats, status="")
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
            progress.update(
                task, advance=1, status=" ".join(f"{n} {1e3 * times[n][-1]:.1f} ms" for n in names)
            )
    peaks: dict[str, int | None] = {name: None for name in names}
    if device.type == "cuda":
        for name in names:
            torch.cuda.reset_peak_memory_stats(device)
            fns[name]()
            synchronize(device)
            peaks[name] = int(torch.cuda.max_memory_allocated(device))
    return [Timing(name, times[name], items_per_call, peaks[name]) for name in names]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a / b`` (each round's pair ran back to back: robust to load drift)."""
    return statistics.median(x / y for x, y in zip(a.times_s, b.times_s, strict=True))


def process_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def render(report: BenchReport, json_out: bool) -> str:
    """The report as one JSON object, or as a readable table followed by the derived results."""
    if json_out:
        return json.dumps(report.to_dict(), indent=2)
    lines = [
        f"bench {report.suite} [{report.preset}] on {report.device} ({report.date})",
        "  " + ", ".join(f"{k}={v}" for k, v in report.settings.items()),
        f"  {'variant':<12} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'items/s':>10} {'peak mem':>10}",
    ]
    for t in report.timings:
        s = t.summary()
        mem = f"{s['peak_memory_bytes'] / 2**20:.0f} MiB" if s["peak_memory_bytes"] else "-"
        lines.append(
            f"  {t.name:<12} {s['median_ms']:>10.2f} {s['min_ms']:>9.2f} {s['max_ms']:>9.2f} "
            f"{s['items_per_s']:>10.1f} {mem:>10}"
        )
    for key, value in report.results.items():
        lines.append(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    if report.memory_note:
        lines.append(f"  memory: {report.memory_note}")
    return "\n".join(lines)
