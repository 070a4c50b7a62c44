"""The command layer: turn a resolved :class:`RunConfig` into each stage's own section + inputs.

The CLI and the pipeline call these; trainers below them never see the recipe schema. Each
function writes ``config.yaml`` (the config exactly as run) into its output directory before the
stage starts, resolves the data and inputs the stage needs, and calls the stage's trainer with
its own section (``cfg.stage1``, ``cfg.stage2``, ``cfg.llava``) and explicit arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm import config_io
from llm2clip_vlm.data import open_image, resolve_data
from llm2clip_vlm.data.captions import captions_only
from llm2clip_vlm.data.records import ImageCaptions, keep_captions
from llm2clip_vlm.data.text_corpus import load_text_corpus
from llm2clip_vlm.hub.cards import llava_card, tower_card
from llm2clip_vlm.llava.inputs import phase_data
from llm2clip_vlm.llava.model import check_inputs
from llm2clip_vlm.llava.train import train_llava
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.store.run import embed_splits, resolve_encoder_dir
from llm2clip_vlm.store.store import EmbeddingStore
from llm2clip_vlm.text.cra import choose_cra_source
from llm2clip_vlm.text.encoder import encoder_identity
from llm2clip_vlm.text.train import train_stage1
from llm2clip_vlm.vision.export import export_tower
from llm2clip_vlm.vision.inputs import heldout_sets, usable_images
from llm2clip_vlm.vision.train import train_stage2

log = get_logger(__name__)


def config_writer(cfg: RunConfig, output_dir: Path) -> Callable[[], None]:
    """What a stage calls (main process) once its inputs are usable: write ``config.yaml``, the
    config exactly as run. A refused run leaves no config.yaml (the run directory's owner check
    relies on it)."""
    return lambda: config_io.dump(cfg, output_dir / "config.yaml")


def run_stage1(cfg: RunConfig, output_dir: str | Path) -> dict[str, Any]:
    """``llm2clip-vlm stage1``: resolve the data of ``cfg`` and train (see ``train_stage1``)."""
    out = Path(output_dir)
    train_set, heldout_sets = resolve_data(cfg.data, out)
    # Stage 1 reads captions only: shard records come without their image bytes.
    heldout = {name: captions_only(records) for name, records in heldout_sets.items()}
    source = choose_cra_source(captions_only(train_set), heldout, cfg.stage1.cra_set, cfg.stage1.cra_captions)
    if source.from_training_data:
        log.warning(
            "CRA: no held-out set has two or more short captions per image; holding the last %d "
            "training images out of stage-1 training to measure it (set data.heldout / stage1.cra_set)",
            len(source.records),
        )
    else:
        log.info("CRA on held-out set %r", source.name)
    corpus = (
        load_text_corpus(cfg.data.text_corpus) if cfg.stage1.mntp.enabled and cfg.data.text_corpus else []
    )
    return train_stage1(
        cfg.stage1, out, source.train_records, source.records, text_corpus=corpus,
        text_corpus_ratio=cfg.data.text_corpus_ratio, reliability=cfg.reliability, cra_info=source.describe(), on_ready=config_writer(cfg, out),
        tracking=cfg.tracking, run_config=config_io.to_dict(cfg),
    )  # fmt: skip


def run_embed(
    cfg: RunConfig,
    output_dir: str | Path,
    stage1_output: str | Path | None = None,
    data: tuple[Sequence[ImageCaptions], Mapping[str, Sequence[ImageCaptions]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``llm2clip-vlm embed``: one store per split of ``cfg.data`` (see ``embed_splits``)."""

    resolve_encoder_dir(cfg.embed.encoder, stage1_output)  # a missing encoder is refused before any write
    return embed_splits(
        cfg.embed, cfg.data, output_dir, stage1_output=stage1_output, data=data,
        on_ready=config_writer(cfg, Path(output_dir)),
    )  # fmt: skip


def run_stage2(
    cfg: RunConfig, output_dir: str | Path, store_dir: str | Path, encoder_dir: str | Path | None = None
) -> dict[str, Any]:
    """``llm2clip-vlm stage2``: resolve data, open the stores, train (see ``train_stage2``).

    Args:
        cfg: the run config.
        output_dir: the stage-2 run directory (resumes from its checkpoint).
        store_dir: the ``embed`` output: ``train/`` and one ``heldout-<name>/`` per held-out set.
        encoder_dir: the stage-1 encoder or a stage-1 run directory (default ``cfg.embed.encoder``);
            its identity must match the stores'. Held-out sets without a store are encoded with it.
    """

    out = Path(output_dir)
    store_dir = Path(store_dir)
    wanted = encoder_dir or cfg.embed.encoder
    encoder = resolve_encoder_dir(wanted) if wanted else None
    identity = encoder_identity(encoder) if encoder is not None else ""

    train_set, heldout_records = resolve_data(cfg.data, out)
    # The same captions the store was written from (``embed`` applies the same cut).
    train_records = keep_captions(train_set, cfg.embed.train_captions_per_kind)
    store = EmbeddingStore.open(
        store_dir / "train", captions=train_records, encoder_identity=identity or None
    )

    skipped = {"train": train_set.skipped, **{n: s.skipped for n, s in heldout_records.items()}}

    def usable(name: str, records: Any) -> list[int] | None:
        if not cfg.data.verify_images:
            return None
        # The records skipped while reading count too: max_bad_fraction bounds all phases together.
        return usable_images(
            out, name, records, skip_bad=cfg.data.skip_bad, max_bad_fraction=cfg.data.max_bad_fraction,
            earlier=skipped[name], workers=cfg.data.check_workers,
        )  # fmt: skip

    # The store keeps every record's rows; images that fail to decode are left out of sampling.
    # A streamed training set is checked while it is read (no up-front pass over millions of images).
    train_usable = None if cfg.data.stream else usable("train", train_records)
    heldout = heldout_sets(heldout_records, store_dir, encoder, identity, out / "heldout", cfg.embed, usable)
    return train_stage2(
        cfg.stage2, out, train_records, store, heldout, usable=train_usable, load_image=open_image,
        reliability=cfg.reliability, encoder_path=str(encoder.resolve()) if encoder else "",
        encoder_identity=identity, skip_bad=cfg.data.skip_bad, max_bad_fraction=cfg.data.max_bad_fraction,
        tracking=cfg.tracking, run_config=config_io.to_dict(cfg), on_ready=config_writer(cfg, out),
        shuffle_buffer=cfg.data.shuffle_buffer if cfg.data.stream else 0,
    )  # fmt: skip


def run_export(
    run_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    dtype: str | None = None,
    verify: bool = True,
) -> Path:
    """``export-tower``: the stage-2 run's tower and retrieval model, with the hub card of its config."""
    cfg_file = Path(run_dir) / "config.yaml"
    cfg = config_io.load(RunConfig, cfg_file) if cfg_file.is_file() else RunConfig()
    return export_tower(
        run_dir, out_dir, model_dir=model_dir, dtype=dtype, verify=verify,
        card=lambda provenance: tower_card(provenance, cfg),
    )  # fmt: skip


def run_llava(
    cfg: RunConfig,
    output_dir: str | Path,
    phase: str,
    init: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """``llava-pretrain`` / ``llava-finetune``: resolve the phase's data and train it."""

    out = Path(output_dir)
    check_inputs(cfg.llava, phase, Path(init) if init else None)  # before anything is written
    data = phase_data(cfg.llava, phase, out, demo_dir=cfg.data.demo_dir, demo_seed=cfg.data.demo_seed)
    metrics = train_llava(
        cfg.llava, phase, out, data, init=Path(init) if init else None, reliability=cfg.reliability,
        on_step=on_step, tracking=cfg.tracking, run_config=config_io.to_dict(cfg),
        on_ready=config_writer(cfg, out),
    )  # fmt: skip
    if metrics:  # the main process: the hub model card of model/
        card = llava_card(cfg, phase, metrics, out, Path(init) if init else None, data.records, data.heldout)
        (out / "model" / "README.md").write_text(card)
    return metrics
