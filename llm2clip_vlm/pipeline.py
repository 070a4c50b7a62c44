"""``build-tower``: stage 1 -> embed -> stage 2 -> export, one command, with stage skipping.

Each stage writes its artifact into its own folder of the run directory and, once complete, a
``stage.json`` stamp holding a fingerprint of everything the artifact depends on: the config
sections the stage reads and the fingerprint of the stage before it. A later run skips a stage
whose stamp matches, reruns it when anything upstream changed, and ``--from-stage`` forces a
restart from a given stage. Each stage is itself resumable (checkpoints), so a killed build
continues where it stopped.

Layout of ``DIR``::

    config.yaml       the resolved config
    stage1/           stage-1 run (encoder/ = the merged caption embedder)
    store/            caption embedding store (train/, heldout-<name>/)
    stage2/           stage-2 run
    tower/            the exported vision tower (backbone's own transformers format)
    model/            the full retrieval model (LLM2CLIP.from_pretrained)
    metrics.json      {"stage1": ..., "stage2": ...}
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2clip_vlm import configuration
from llm2clip_vlm.config import RunConfig
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

STAGES = ("stage1", "embed", "stage2", "export")

# The config sections each stage's artifact depends on (besides the previous stage's artifact).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "stage1": ("data", "stage1"),
    "embed": ("data", "embed"),
    "stage2": ("data", "stage2"),
    "export": ("export",),
}


def stage_fingerprint(cfg: RunConfig, stage: str, upstream: str) -> str:
    """Hash of the config sections a stage reads and the fingerprint of the stage before it."""
    payload = {s: configuration.to_dict(getattr(cfg, s)) for s in STAGE_SECTIONS[stage]}
    if stage == "embed":
        # Where the encoder comes from is decided by the pipeline, not by this field.
        payload["embed"].pop("encoder", None)
    blob = json.dumps({"stage": stage, "config": payload, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    stamp = folder / "stage.json"
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return None


def _write_stamp(folder: Path, stage: str, fingerprint: str, seconds: float) -> None:
    tmp = folder / "stage.json.tmp"
    tmp.write_text(json.dumps({"stage": stage, "fingerprint": fingerprint, "seconds": seconds}, indent=2))
    tmp.replace(folder / "stage.json")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_build_tower(cfg: RunConfig, output_dir: Path, from_stage: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline into ``output_dir``; returns the combined metrics."""
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}, got {from_stage!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configuration.dump(cfg, output_dir / "config.yaml")
    # All stages share one data location, so the demo world is generated once.
    if not cfg.data.train.path and not cfg.data.demo_dir:
        cfg.data.demo_dir = str(output_dir / "demo-data")

    _log_estimate(cfg, output_dir)

    dirs = {
        "stage1": output_dir / "stage1",
        "embed": output_dir / "store",
        "stage2": output_dir / "stage2",
        "export": output_dir / "tower",
    }
    encoder_dir = dirs["stage1"] / "encoder"

    def do_stage1() -> None:
        from llm2clip_vlm.text.train import run_stage1

        run_stage1(cfg, dirs["stage1"])

    def do_embed() -> None:
        from llm2clip_vlm.store.run import run_embed

        run_embed(cfg, dirs["embed"], stage1_output=dirs["stage1"])

    def do_stage2() -> None:
        from llm2clip_vlm.vision.train import run_stage2

        run_stage2(cfg, dirs["stage2"], store_dir=dirs["embed"], encoder_dir=encoder_dir)

    def do_export() -> None:
        from llm2clip_vlm.vision.export import export_tower

        export_tower(dirs["stage2"], dirs["export"], model_dir=output_dir / "model")

    actions: dict[str, Callable[[], None]] = {
        "stage1": do_stage1,
        "embed": do_embed,
        "stage2": do_stage2,
        "export": do_export,
    }
    forced = False
    upstream = ""
    timings: dict[str, float] = {}
    for stage in STAGES:
        forced = forced or stage == from_stage
        fingerprint = stage_fingerprint(cfg, stage, upstream)
        stamp = _read_stamp(dirs[stage])
        if not forced and stamp and stamp.get("fingerprint") == fingerprint:
            log.info("%s: artifact in %s matches its config, skipped", stage, dirs[stage])
            timings[stage] = float(stamp.get("seconds", 0.0))
        else:
            if stamp:  # stale: a restarted stage must not look complete if it dies midway
                (dirs[stage] / "stage.json").unlink()
            log.info("%s: running into %s", stage, dirs[stage])
            start = time.perf_counter()
            actions[stage]()
            timings[stage] = time.perf_counter() - start
            dirs[stage].mkdir(parents=True, exist_ok=True)
            _write_stamp(dirs[stage], stage, fingerprint, timings[stage])
        upstream = fingerprint

    metrics = {
        "stage1": _read_json(dirs["stage1"] / "metrics.json"),
        "stage2": _read_json(dirs["stage2"] / "metrics.json").get("stage2", {}),
        "seconds": timings,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _log_estimate(cfg: RunConfig, output_dir: Path) -> None:
    """Log how long the whole build should take here (see :mod:`llm2clip_vlm.estimate`)."""
    import torch

    from llm2clip_vlm.data import resolve_data
    from llm2clip_vlm.estimate import estimate_build, format_estimate

    train, heldout = resolve_data(cfg.data, output_dir / "stage1")
    est = estimate_build(cfg, list(train), {k: list(v) for k, v in heldout.items()})
    if est is not None:
        log.info(format_estimate(est, torch.get_num_threads()))


def print_metrics(metrics: dict[str, Any], output_dir: Path) -> None:
    """A rich table of what the build measured: CRA (stage 1) and retrieval R@k (stage 2)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s1 = metrics.get("stage1", {})
    if s1:
        console.print(
            f"[bold]stage 1[/bold]: caption retrieval accuracy {s1.get('cra_before', float('nan')):.1f} -> "
            f"{s1.get('cra_after', float('nan')):.1f} % over {s1.get('cra_captions', '?')} held-out captions "
            f"({s1.get('steps', '?')} steps, {s1.get('train_seconds', '?')} s)"
        )
    retrieval = metrics.get("stage2", {}).get("retrieval", {})
    before = metrics.get("stage2", {}).get("retrieval_before", {})
    if retrieval:
        table = Table(title="stage 2: zero-shot retrieval on held-out sets (%)")
        for col in ("set", "when", "images", "captions", "I2T R@1", "R@5", "R@10", "T2I R@1", "R@5", "R@10"):
            table.add_column(col, justify="left" if col in ("set", "when") else "right")
        keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
        for name, m in retrieval.items():
            for when, row in (("before", before.get(name)), ("after", m)):
                if row:
                    counts = (str(row.get("n_images", "")), str(row.get("n_captions", "")))
                    table.add_row(name, when, *counts, *(f"{row[k]:.1f}" for k in keys))
        console.print(table)
    seconds = metrics.get("seconds", {})
    if seconds:
        console.print(
            "time per stage (when it ran): " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        )
    console.print(f"tower: {output_dir / 'tower'}   retrieval model: {output_dir / 'model'}")
