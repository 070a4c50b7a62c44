"""Benchmarks of the package's hot loops: ``llm2clip-vlm bench SUITE [--preset P] [--json]``.

Outside the core import graph: only the CLI's ``bench`` command imports it, lazily (a test pins it).

Each suite is a module ``llm2clip_vlm.bench.<suite>`` with ``PRESETS`` (name -> settings; the
first is the default) and ``run(preset, *, device, warmup, repeats) -> BenchReport``, built on the
shared :mod:`~llm2clip_vlm.bench.harness`. Adding a suite = adding its module; :func:`run_suite`
finds it by name and says so when a known suite has no module yet.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from llm2clip_vlm.bench.harness import BenchReport

# Every suite the CLI knows, with what it measures.
SUITES: dict[str, str] = {
    "stage1": "a stage-1 SimCSE step (LoRA, chunked embedding, loss)",
    "embed": "the caption-embedding pass (bucketing, padding, throughput)",
    "stage2": "a stage-2 step: offline store vs online LLM vs LoRA",
    "tower": "the tower inside LLaVA: overhead per batch",
    "llava": "a LLaVA training step",
    "data": "the data path: manifest/shard readers, index, image check, stage-2 loader",
}


class SuiteNotBuilt(LookupError):
    """A known suite whose module does not exist yet."""


def suite_module(name: str) -> str:
    """The module of suite ``name``.

    Raises:
        ValueError: not a known suite (the message lists them).
        SuiteNotBuilt: known, but not built yet.
    """
    if name not in SUITES:
        raise ValueError(f"unknown bench suite {name!r}; known: {', '.join(SUITES)}")
    module = f"{__name__}.{name}"
    if importlib.util.find_spec(module) is None:
        raise SuiteNotBuilt(f"bench suite {name!r} ({SUITES[name]}) is not built yet")
    return module


def run_suite(
    name: str,
    preset: str | None = None,
    *,
    device: str | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
) -> BenchReport:
    """Run suite ``name`` with ``preset`` (default: the suite's first preset).

    Raises:
        ValueError: unknown suite or preset.
        SuiteNotBuilt: the suite has no module yet.
    """
    module = importlib.import_module(suite_module(name))
    presets = module.PRESETS
    preset = preset or next(iter(presets))
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for bench {name}; known: {', '.join(presets)}")
    return module.run(preset, device=device, warmup=warmup, repeats=repeats)
