"""``llava-compare``: the same LLaVA trained on several towers, their held-out tables side by side.

The paper's comparison in miniature (LLaVA-1.5 on the LLM2CLIP tower against the tower without
it). For each ``--tower NAME=DIR`` the recipe's ``llava-pretrain`` and ``llava-finetune`` run into
``OUT/NAME/pretrain`` and ``OUT/NAME/finetune``, exactly as the two commands would (same config,
same run folders: each can also be resumed or inspected by hand), then
:mod:`llm2clip_vlm.reports.compare` writes ``OUT/comparison.json``, ``comparison.md`` and
``report.html``.

- **Same data for every tower.** Without LLaVA data in the recipe, the demo's LLaVA world is
  written once to ``OUT/demo-data/llava`` (``data.demo_dir``) and every tower trains and is
  evaluated on it.
- **Resumable.** A phase whose folder holds a finished run (``run.json`` complete, its
  ``metrics.json`` written) with this config and these inputs (tower, data, LLM, projector) is
  skipped; an unfinished one resumes from its checkpoints; one made with another config or tower
  is refused (the run folder's own check) unless ``--restart``. A phase's config is the keys it
  reads (the shared ``llava`` keys and its own phase): a changed finetune setting refuses only
  the finetune runs (the message says to remove them to train only the finetunes again), and the
  finished pretraining runs are reused.
- **Progress** is logged per tower and phase (and the phases' own progress lines), also to
  ``OUT/compare.log``.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2clip_vlm import run_dir
from llm2clip_vlm.commands import llava_inputs, run_llava
from llm2clip_vlm.errors import UserError
from llm2clip_vlm.llava.inputs import phase_data
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.reports.compare import TowerRun, write_comparison

log = get_logger(__name__)

LOG_FILE = "compare.log"
PHASES = ("pretrain", "finetune")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# How a refused run folder is resolved here (llava-compare has no --allow-config-change: one
# tower's LLaVA trained under two configs would not compare with the other's).
REMEDY = "Use --restart to train every tower again, or another -o"


class TowerSpecError(UserError, ValueError):
    """A ``--tower`` argument that is not ``NAME=DIR`` with a tower in DIR."""


@dataclass(frozen=True)
class Tower:
    """One ``--tower NAME=DIR``."""

    name: str
    path: Path


def parse_towers(specs: Sequence[str]) -> list[Tower]:
    """``NAME=DIR`` arguments -> towers (names unique, each DIR an exported tower with config.json)."""
    towers: list[Tower] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise TowerSpecError(f"--tower {spec!r}: expected NAME=DIR (e.g. llm2clip=runs/demo/tower)")
        if not _NAME.match(name):
            raise TowerSpecError(
                f"--tower {spec!r}: the name {name!r} must be letters, digits, '.', '_' or '-'"
            )
        if any(t.name == name for t in towers):
            raise TowerSpecError(f"--tower {spec!r}: the name {name!r} is given twice")
        if not (Path(path) / "config.json").is_file():
            raise TowerSpecError(f"--tower {spec!r}: {path} is not a tower directory (no config.json)")
        towers.append(Tower(name, Path(path)))
    if len(towers) < 2:
        raise TowerSpecError(f"give two or more --tower NAME=DIR to compare (got {len(towers)})")
    return towers


def tower_config(cfg: RunConfig, tower: Tower, out: Path) -> RunConfig:
    """The run config of one tower: the recipe with ``llava.tower`` set, sharing one demo world."""
    tcfg = copy.deepcopy(cfg)
    tcfg.llava.tower = str(tower.path)
    if not tcfg.data.demo_dir:  # only read when the recipe names no LLaVA data
        tcfg.data.demo_dir = str(out / "demo-data")
    return tcfg


def finished(cfg: RunConfig, phase: str, run: Path, init: Path | None) -> bool:
    """Whether ``run`` holds a finished ``llava-<phase>`` run of this config and these inputs.

    Raises:
        RunDirError: ``run`` belongs to another command or holds work with another config.
    """
    command = f"llava-{phase}"
    remedy = REMEDY
    if phase == "finetune":  # its pretraining is still good: say how to keep it
        remedy = (
            "Use --restart to train every tower again, another -o, or remove "
            f"{run} to train only this finetune again (its pretraining is reused)"
        )
    run_dir.check(run, command, cfg, remedy=remedy)  # another owner or config: refused here, in one line
    owner = run_dir.read_owner(run) if run.is_dir() else {}
    if owner.get("status") != "complete" or not (run / "metrics.json").is_file():
        return False
    data = phase_data(cfg.llava, phase, run, demo_dir=cfg.data.demo_dir, demo_seed=cfg.data.demo_seed)
    return owner.get("inputs") == llava_inputs(cfg, phase, data, init)


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("llm2clip_vlm").addHandler(handler)
    return handler


def run_compare(
    cfg: RunConfig, towers: Sequence[Tower], out: Path, *, restart: bool = False
) -> dict[str, Any]:
    """Train the recipe's LLaVA on every tower (skipping finished phases) and write the comparison.

    ``restart`` discards every tower's earlier runs in ``out`` and trains again.
    Returns the comparison document (``comparison.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = _log_to_file(out / LOG_FILE)
    try:
        runs: list[TowerRun] = []
        for i, tower in enumerate(towers, 1):
            tcfg = tower_config(cfg, tower, out)
            folders = {phase: out / tower.name / phase for phase in PHASES}
            for phase in PHASES:
                run, init = folders[phase], (folders["pretrain"] if phase == "finetune" else None)
                where = f"tower {i}/{len(towers)} {tower.name!r}: llava-{phase}"
                if not restart and finished(tcfg, phase, run, init):
                    log.info("%s in %s is finished with this config and inputs: skipped", where, run)
                    continue
                log.info("%s into %s (tower %s)", where, run, tower.path)
                with run_dir.claimed(run, f"llava-{phase}", tcfg, restart=restart) as claim:
                    run_llava(tcfg, run, phase, init=init, claim=claim)
            runs.append(TowerRun(tower.name, str(tower.path), folders["finetune"], folders["pretrain"]))
        doc = write_comparison(runs, out)
        log.info("comparison of %d towers: %s", len(towers), out / "comparison.md")
        return doc
    finally:
        logging.getLogger("llm2clip_vlm").removeHandler(handler)
        handler.close()
