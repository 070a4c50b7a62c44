"""``build-tower``: stage 1 -> embed -> stage 2 -> export, one command, with stage skipping.

Each stage writes its artifact into its own folder of the run directory and a ``stage.json``
stamp holding a fingerprint of everything the artifact depends on (:func:`stage_inputs`):

- the config sections the stage reads (the export: ``export`` and ``hub``, which the card is
  made from) and the fingerprint of the stage before it;
- the data: every manifest / webdataset shard file and every file of the text-corpus tree (size,
  mtime and sampled hashes, or whole-file hashes with ``reliability.input_identity=full``; see
  :mod:`llm2clip_vlm.identity`); for stage 2 also the images' content (a sample, or all);
- the weights it starts from: the stage-1 base LLM (a folder's tree, or a GGUF file), the
  stage-1 encoder (its identity, checked against its weight files), the stage-2 backbone;
- every upstream artifact as it is on disk: the stores' manifests (which hold each shard's
  sha256) and the stage-2 model's files.

A complete stage's stamp also holds the size, mtime and sha256 of every file of its artifact
(``encoder/``, the stores, ``model/``, the tower). Before an artifact is reused it is checked
against them (:func:`llm2clip_vlm.run_dir.verify_outputs`): one changed since it was written
(flipped bytes in ``stage2/model/vision/model.safetensors``, in the encoder's weights) is never
reused nor shipped; the stage runs again.

The stamp is written as ``complete: false`` when a stage starts and ``true`` when it ends. A later
run skips a complete stage whose fingerprint matches; a stage whose fingerprint changed (edited
data, new weights, another config) has its folder cleared and runs from scratch, and so does
every stage after it; an incomplete stage with the same fingerprint resumes from its
checkpoints (a killed build continues where it stopped). ``--from-stage`` forces a fresh run from
a given stage on.

Layout of ``DIR``::

    config.yaml       the resolved config
    stage1/           stage-1 run (encoder/ = the merged caption embedder; with
                      --without-stage1 the base LLM as pretrained, untrained)
    store/            caption embedding store (train/, heldout-<name>/)
    stage2/           stage-2 run
    tower/            the exported vision tower (backbone's own transformers format)
    model/            the full retrieval model (LLM2CLIP.from_pretrained)
    metrics.json      {"stage1": ..., "stage2": ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2clip_vlm import config_io, run_dir
from llm2clip_vlm.commands import (
    data_files,
    images_of,
    model_identity,
    run_embed,
    run_export,
    run_stage1,
    run_stage2,
    run_without_stage1,
)
from llm2clip_vlm.data import resolve_data
from llm2clip_vlm.data.captions import ensure_demo_data
from llm2clip_vlm.data.config import has_train_data
from llm2clip_vlm.estimate import estimate_build, format_estimate
from llm2clip_vlm.identity import files_identity, tree_files
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.encoder import encoder_identity
from llm2clip_vlm.text.raw import WITHOUT_STAGE1
from llm2clip_vlm.training import dist

log = get_logger(__name__)

STAGES = ("stage1", "embed", "stage2", "export")
# The command each stage's folder belongs to (run.json), so it can also be resumed by hand.
OWNERS = {"stage1": "stage1", "embed": "embed", "stage2": "stage2", "export": "export-tower"}

# The config sections each stage's artifact depends on (besides the previous stage's artifact).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "stage1": ("data", "stage1"),
    "embed": ("data", "embed"),
    "stage2": ("data", "stage2"),
    "export": ("export", "hub"),
}
# What each stage's artifact is, relative to the run directory: checked before it is reused.
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "stage1": ("stage1/encoder",),
    "embed": ("store",),
    "stage2": ("stage2/model",),
    "export": ("tower", "model"),
}
# Files of a stage folder that are bookkeeping, not the artifact.
_BOOKKEEPING = {"stage.json", "run.json", "run.lock", "config.yaml"}


def stage_fingerprint(cfg: RunConfig, stage: str, upstream: str, inputs: dict[str, Any] | None = None) -> str:
    """Hash of the config sections a stage reads, its inputs' identities and the stage before it."""
    payload = {s: config_io.to_dict(getattr(cfg, s)) for s in STAGE_SECTIONS[stage]}
    if stage == "embed":
        # Where the encoder comes from is decided by the pipeline, not by this field.
        payload["embed"].pop("encoder", None)
    blob = json.dumps(
        {"stage": stage, "config": payload, "upstream": upstream, "inputs": inputs or {}}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_inputs(
    cfg: RunConfig, stage: str, dirs: dict[str, Path], images: dict[str, str] | None = None
) -> dict[str, Any]:
    """The identities of what ``stage`` reads besides its config (see the module docstring)."""
    mode = cfg.reliability.input_identity
    inputs: dict[str, Any] = {"data": files_identity(data_files(cfg), mode)}
    if stage == "stage1":
        inputs["base_model"] = model_identity(cfg.stage1.model, mode)
    if stage in ("embed", "stage2"):
        encoder = dirs["stage1"] / "encoder"
        inputs["encoder"] = encoder_identity(encoder) if encoder.is_dir() else "missing"
    if stage == "stage2":
        store = dirs["embed"]
        manifests = sorted(store.glob("*/manifest.json")) if store.is_dir() else []
        inputs["store"] = files_identity(manifests, "full")  # each holds its shards' sha256
        inputs["backbone"] = model_identity(cfg.stage2.backbone.name_or_path, mode)
        inputs["images"] = images or {}
    if stage == "export":
        model = dirs["stage2"] / "model"
        inputs["stage2_model"] = files_identity(tree_files(model), mode)
    # Paths are compared as given; the identities are what matters, keyed by path for messages.
    return inputs


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    stamp = folder / "stage.json"
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return None


def _write_stamp(
    folder: Path,
    stage: str,
    fingerprint: str,
    seconds: float,
    complete: bool = True,
    outputs: dict[str, Any] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "stage.json.tmp"
    doc = {"stage": stage, "fingerprint": fingerprint, "complete": complete, "seconds": seconds}
    if outputs is not None:
        doc["outputs"] = outputs
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(folder / "stage.json")


def _artifact_files(output_dir: Path, stage: str) -> list[str]:
    """The artifact's files, relative to the run directory (bookkeeping files left out)."""
    files = []
    for rel in ARTIFACTS[stage]:
        files += [
            str(p.relative_to(output_dir))
            for p in tree_files(output_dir / rel)
            if not (p.parent == output_dir / rel and p.name in _BOOKKEEPING)
        ]
    return files


def _changed_artifact(output_dir: Path, stage: str, stamp: dict[str, Any], full: bool) -> str | None:
    """Why a complete stage's artifact may not be reused (None: it is as it was written)."""
    recorded = stamp.get("outputs")
    if recorded is None:  # stamped before checksums were recorded: nothing to check against
        return None
    problems = run_dir.verify_outputs(output_dir, recorded, full)
    extra = sorted(set(_artifact_files(output_dir, stage)) - set(recorded))
    problems += [f"{output_dir / f} was added" for f in extra]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _clear(folder: Path) -> None:
    """Empty a stage's folder (its artifact is stale): nothing of the old run may be resumed."""
    import shutil

    if folder.is_dir():
        shutil.rmtree(folder)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_build_tower(
    cfg: RunConfig,
    output_dir: Path,
    from_stage: str | None = None,
    claim: run_dir.Claim | None = None,
    without_stage1: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline into ``output_dir``; returns the combined metrics.

    ``without_stage1``: the paper's ablation of stage 1. ``stage1/encoder`` is the base LLM as
    pretrained (:mod:`llm2clip_vlm.text.raw`), and embed, stage 2 and the export run as usual on
    its caption embeddings. It is part of stage 1's fingerprint, so switching it reruns everything.

    ``claim`` (the CLI's hold on ``output_dir``) is marked started once the settings are accepted:
    a build refused before that leaves no trace.
    """
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}, got {from_stage!r}")
    # Stage 1 and stage 2 train in this process, and accelerate fixes one mixed precision per
    # process: refuse a mismatch now, not after stage 1 has run.
    dist.check_one_precision({"stage1": cfg.stage1.loop.precision, "stage2": cfg.stage2.loop.precision})
    if claim is not None:
        claim.started()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # All stages share one data location, so the demo world is generated once (and up front:
    # the stages' fingerprints include the data files). Set before the config is written, on a
    # copy: config.yaml is exactly the config the stages run with.
    if not has_train_data(cfg.data) and not cfg.data.demo_dir:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, demo_dir=str(output_dir / "demo-data"))
        )
    config_io.dump(cfg, output_dir / "config.yaml")
    if not has_train_data(cfg.data):
        ensure_demo_data(cfg.data, output_dir)

    train, heldout = resolve_data(cfg.data, output_dir / "stage1")
    _log_estimate(cfg, list(train), {k: list(v) for k, v in heldout.items()})
    # Stage 2 reads the images: their content joins its fingerprint (sampled, or all: input_identity).
    images = images_of([train, *heldout.values()], cfg.reliability.input_identity)
    full = cfg.reliability.input_identity == "full"

    dirs = {
        "stage1": output_dir / "stage1",
        "embed": output_dir / "store",
        "stage2": output_dir / "stage2",
        "export": output_dir / "tower",
    }
    encoder_dir = dirs["stage1"] / "encoder"

    def do_stage1() -> None:
        if without_stage1:
            run_without_stage1(cfg, dirs["stage1"])
        else:
            run_stage1(cfg, dirs["stage1"])

    def do_embed() -> None:
        run_embed(cfg, dirs["embed"], stage1_output=dirs["stage1"])

    def do_stage2() -> None:
        run_stage2(cfg, dirs["stage2"], store_dir=dirs["embed"], encoder_dir=encoder_dir)

    def do_export() -> None:
        # The card from this build's config: a changed hub.license reruns the export only.
        run_export(
            dirs["stage2"], dirs["export"], model_dir=output_dir / "model", dtype=cfg.export.dtype, cfg=cfg
        )

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
        inputs = stage_inputs(cfg, stage, dirs, images)
        if stage == "stage1" and without_stage1:
            inputs["without_stage1"] = WITHOUT_STAGE1
        fingerprint = stage_fingerprint(cfg, stage, upstream, inputs)
        stamp = _read_stamp(dirs[stage])
        same = bool(stamp) and stamp.get("fingerprint") == fingerprint  # type: ignore[union-attr]
        complete = same and stamp.get("complete", True)  # type: ignore[union-attr]
        changed = _changed_artifact(output_dir, stage, stamp, full) if complete and not forced else None  # type: ignore[arg-type]
        if not forced and complete and changed is None:
            log.info("%s: artifact in %s matches its config and inputs, skipped", stage, dirs[stage])
            timings[stage] = float(stamp.get("seconds", 0.0))  # type: ignore[union-attr]
        else:
            if stamp and (forced or not complete or changed):
                why = (
                    "forced by --from-stage" if forced
                    else f"its artifact was changed after it was written ({changed}), it is not reused" if changed
                    else "its config or inputs changed" if not same
                    else "an unfinished run with the same inputs: resuming it"
                )  # fmt: skip
                if changed:
                    log.warning("%s: %s; running it again", stage, why)
                if forced or changed or not same:
                    log.info("%s: %s; clearing %s and running it again", stage, why, dirs[stage])
                    _clear(dirs[stage])
            log.info("%s: running into %s", stage, dirs[stage])
            # Each stage folder has its owner and lock, so it can also be resumed by hand.
            claim = run_dir.hold(dirs[stage], OWNERS[stage])
            try:
                # Stamped incomplete first: a killed stage resumes only with the same fingerprint.
                _write_stamp(dirs[stage], stage, fingerprint, 0.0, complete=False)
                start = time.perf_counter()
                actions[stage]()
                timings[stage] = time.perf_counter() - start
                outputs = run_dir.output_checksums(output_dir, _artifact_files(output_dir, stage))
                _write_stamp(dirs[stage], stage, fingerprint, timings[stage], outputs=outputs)
            except BaseException as e:
                claim.close(e)
                raise
            claim.close(None)
        upstream = fingerprint

    # Each stage's own metrics.json (schema 1, training/session.py), and the time each stage took.
    metrics = {
        "stage1": _read_json(dirs["stage1"] / "metrics.json"),
        "stage2": _read_json(dirs["stage2"] / "metrics.json"),
        # Records read and skipped per set (per part of a list of training sets).
        "data": _read_json(dirs["stage2"] / "metrics.json").get("data", {}),
        "seconds": timings,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _log_estimate(cfg: RunConfig, train: list[Any], heldout: dict[str, list[Any]]) -> None:
    """Log how long the whole build should take here (see :mod:`llm2clip_vlm.estimate`)."""
    import torch

    est = estimate_build(cfg, train, heldout)
    if est is not None:
        log.info(format_estimate(est, torch.get_num_threads()))


def print_metrics(metrics: dict[str, Any], output_dir: Path) -> None:
    """A rich table of what the build measured: CRA (stage 1) and retrieval R@k (stage 2)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s1 = metrics.get("stage1", {})
    if s1:
        cra, train = s1.get("eval", {}), s1.get("train", {})
        without = s1.get("details", {}).get("without_stage1")
    if s1 and without:
        console.print(
            f"[bold]stage 1[/bold]: not trained ({without}); its caption retrieval accuracy "
            f"{cra.get('after', float('nan')):.1f} % over {cra.get('captions', '?')} held-out captions"
        )
    elif s1:
        console.print(
            f"[bold]stage 1[/bold]: caption retrieval accuracy {cra.get('before', float('nan')):.1f} -> "
            f"{cra.get('after', float('nan')):.1f} % over {cra.get('captions', '?')} held-out captions "
            f"({train.get('steps', '?')} steps, {train.get('seconds', '?')} s)"
        )
    retrieval = metrics.get("stage2", {}).get("eval", {}).get("after", {})
    before = metrics.get("stage2", {}).get("eval", {}).get("before", {})
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
