"""The shared benchmark harness: warm-up, interleaved repeats, medians, peak memory, device name.

A suite builds its callables (one per variant, e.g. "tower" and "raw") and calls
:func:`measure`; variants run in interleaved rounds, in alternating order, so drift in the
machine's load (a shared CPU, GPU clocks) hits every variant alike. The suite returns a
:class:`BenchReport`, which :func:`render` prints as a table or as one JSON object.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llm2clip_vlm.progress import make_progress


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
    # Per-variant figures placed at the top level of the JSON (``{"offline": {...}, ...}``).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_note: str = ""
    # At the end of the run: on a shared CPU the timings depend on it.
    load_average: str = field(default_factory=lambda: load_average())
    date: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    command: str = field(default_factory=lambda: " ".join(["llm2clip-vlm", *sys.argv[1:]]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [t.summary() for t in self.timings]
        variants = d.pop("variants")
        clash = set(variants) & set(d)
        if clash:
            raise ValueError(f"variant names {sorted(clash)} clash with report keys")
        d.update(variants)
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


@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (on a CPU device; None = leave torch's setting).

    [IMPORTANT] On a shared CPU with more runnable processes than cores, torch's threads wait for
    each other at every op: measured on the 2-core development machine at load average 6-9, one
    thread ran an embed pass 3-4x faster than two. Tiny presets therefore pin one thread.
    """
    if n is None or device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    runs first. Peak memory per variant comes from one extra call: on a GPU the allocator's peak;
    on a CPU the process's peak resident memory during that call (Linux ``VmHWM``, reset before
    it), which includes everything resident at the time (other variants' models too).
    """
    from rich.console import Console

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    # The bar goes to stderr: stdout carries the report (``--json`` output must parse).
    with make_progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=repeats, status="", unit="repeat")
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
    elif reset_peak_rss():
        for name in names:
            reset_peak_rss()
            fns[name]()
            peaks[name] = current_peak_rss()
    return [Timing(name, times[name], items_per_call, peaks[name]) for name in names]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a / b`` (each round's pair ran back to back: robust to load drift)."""
    return statistics.median(x / y for x, y in zip(a.times_s, b.times_s, strict=True))


def process_peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss() -> int | None:
    """Peak resident memory since the last :func:`reset_peak_rss`, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_mb(timing: Timing) -> float | None:
    """A variant's peak memory in MiB (None when it was not measured)."""
    return None if timing.peak_memory_bytes is None else round(timing.peak_memory_bytes / 2**20, 1)


def load_average() -> str:
    """The 1/5/15-minute load averages (a shared CPU's timings depend on them)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def render(report: BenchReport, json_out: bool) -> str:
    """The report as one JSON object, or as a readable table followed by the derived results."""
    if json_out:
        return json.dumps(report.to_dict(), indent=2)
    lines = [
        f"bench {report.suite} [{report.preset}] on {report.device} ({report.date}, load average {report.load_average})",
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
