"""``llm2clip-vlm embed``: one store per split (``train/``, ``heldout-<name>/``) of a run's data.

Runs in one process or under ``accelerate launch`` / ``torchrun`` (each rank writes its own shards
of every store). The stage-1 embedder comes from ``embed.encoder``, or from a stage-1 run's output
when a pipeline (``build-tower``) passes one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.data import resolve_data
from llm2clip_vlm.data.config import DataConfig
from llm2clip_vlm.data.records import ImageCaptions, keep_captions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.store.format import PLAN
from llm2clip_vlm.store.store import EmbeddingStore, write_store
from llm2clip_vlm.text.encoder import ENCODER_FILE, CaptionEncoder
from llm2clip_vlm.training import dist

log = get_logger(__name__)


class MissingEncoderError(ValueError):
    """``embed`` was given no stage-1 encoder (neither ``embed.encoder`` nor a stage-1 output)."""


def resolve_encoder_dir(encoder: str | Path | None, stage1_output: str | Path | None = None) -> Path:
    """The stage-1 encoder directory: ``encoder`` (``embed.encoder``), else ``<stage1_output>/encoder``.

    Either may also name a stage-1 run directory (its ``encoder/`` is used). ``embed`` and
    ``stage2 --encoder`` both resolve their encoder here.

    Raises:
        MissingEncoderError: neither is given.
        FileNotFoundError: the directory holds no CaptionEncoder.
    """

    if encoder:
        path = Path(encoder)
    elif stage1_output:
        path = Path(stage1_output) / "encoder"
    else:
        raise MissingEncoderError(
            "no stage-1 encoder: set embed.encoder to a stage-1 encoder directory "
            "(e.g. --set embed.encoder=runs/stage1/encoder)"
        )
    if not (path / ENCODER_FILE).is_file() and (path / "encoder" / ENCODER_FILE).is_file():
        path = path / "encoder"  # a stage-1 run directory was given
    if not (path / ENCODER_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a stage-1 encoder directory: not a CaptionEncoder directory (no {ENCODER_FILE})"
        )
    return path


def store_names(heldout: Mapping[str, Any]) -> list[str]:
    """Sub-store names in the order they are written: ``train``, then ``heldout-<name>``."""
    return ["train"] + [f"heldout-{name}" for name in heldout]


def embed_splits(
    embed: EmbedConfig,
    data_cfg: DataConfig,
    output_dir: str | Path,
    stage1_output: str | Path | None = None,
    data: tuple[Sequence[ImageCaptions], Mapping[str, Sequence[ImageCaptions]]] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Embed the train split and every held-out set of ``data_cfg`` into ``output_dir``.

    Args:
        embed: the ``embed`` section (the encoder, the store's format).
        data_cfg: the ``data`` section (where the captions come from).
        output_dir: the store root; gets ``train/`` and ``heldout-<name>/``.
        stage1_output: a stage-1 run directory, used when ``embed.encoder`` is empty.
        data: already-resolved ``(train, {name: heldout})`` (a pipeline that has them); default:
            ``llm2clip_vlm.data.resolve_data(data_cfg, output_dir)``.

    Returns:
        Per sub-store: its path, rows, images, dim, dtype, shards and padding share (empty on
        non-main processes).
    """
    out = Path(output_dir)
    encoder_dir = resolve_encoder_dir(embed.encoder, stage1_output)
    state = dist.process_state()  # joins the process group under accelerate launch / torchrun
    rank, world = state.process_index, state.num_processes
    if data is None:
        with state.main_process_first():  # the demo world is generated once, by rank 0
            data = resolve_data(data_cfg, out)
    train, heldout = data
    train = keep_captions(train, embed.train_captions_per_kind)
    encoder = CaptionEncoder.from_pretrained(encoder_dir, device=state.device)
    if rank == 0 and on_ready is not None:  # once the data and the encoder are known to be usable
        on_ready()
    log.info("embed: encoder %s (%s), %d process(es)", encoder_dir, encoder.identity()[:12], world)
    summary: dict[str, dict[str, Any]] = {}
    for name, records in zip(store_names(heldout), [train, *heldout.values()], strict=True):
        if rank == 0:
            _drop_if_other_encoder(out / name, encoder.identity())
        state.wait_for_everyone()
        path = write_store(encoder, records, out / name, embed, rank=rank, world_size=world)
        if rank != 0:
            continue
        # Checksums were verified shard by shard while writing; shapes are enough here.
        store = EmbeddingStore.open(path, verify_checksums=False)
        summary[name] = {
            "path": str(path),
            "rows": store.num_rows,
            "images": store.num_images,
            "dim": store.dim,
            "dtype": store.dtype,
            "shards": len(store.manifest["shards"]),
            "padding_share": store.manifest["tokens"]["padding_share"],
            "cut_captions": store.manifest["tokens"].get("cut_captions", 0),
        }
    return summary


def _drop_if_other_encoder(path: Path, identity: str) -> None:
    """Remove a (partial) store that the same encoder path made with other weights.

    The encoder's identity follows its weight files; when they were replaced, every embedding of
    the old store is stale, so it is embedded again instead of being refused (a different
    ``embed.encoder`` path is a config change, refused before this by the run directory check).
    """
    import shutil

    plan = path / PLAN
    if not plan.is_file():
        return
    try:
        doc = json.loads(plan.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8 or not JSON: the writer reports it
        return
    old = doc.get("encoder_identity") if isinstance(doc, dict) else None
    if old and old != identity:
        log.warning(
            "%s was embedded by encoder %s..., the encoder's weights are now %s...: embedding again",
            path, old[:12], identity[:12],
        )  # fmt: skip
        shutil.rmtree(path)
