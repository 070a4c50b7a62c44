"""Benchmarks of the package's hot loops: ``llm2clip-vlm bench SUITE [--preset P] [--json]``.

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

# Every suite the CLI knows, with the issue that built it.
SUITES: dict[str, str] = {
    "stage1": "issue 7",
    "embed": "issue 7",
    "stage2": "issue 7",
    "tower": "issue 4",
    "llava": "issue 7",
    "data": "issue 12",
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
        raise SuiteNotBuilt(f"bench suite {name!r} is not built yet ({SUITES[name]})")
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
