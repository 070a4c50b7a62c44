"""The command layer: turn a resolved :class:`RunConfig` into each stage's own section + inputs.

The CLI and the pipeline call these; trainers below them never see the recipe schema. Each
function writes ``config.yaml`` (the config exactly as run) into its output directory before the
stage starts, resolves the data and inputs the stage needs, and calls the stage's trainer with
its own section (``cfg.stage1``, ``cfg.stage2``, ``cfg.llava``) and explicit arguments.

Given the CLI's :class:`~llm2clip_vlm.run_dir.Claim` of the output folder, each function also
hands it the identity of every input once the data is resolved (:func:`stage1_inputs`,
:func:`stage2_inputs`, :func:`llava_inputs`: data files, the text-corpus tree, image content,
model files or GGUF file, tower, projector, store, encoder), before anything is written: a
rerun into the same folder resumes only from work made from the same inputs.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from llm2clip_vlm import config_io
from llm2clip_vlm.data import open_image, resolve_data
from llm2clip_vlm.data.captions import (
    CaptionSet,
    caption_counts,
    captions_only,
    data_counts,
    demo_dir_for,
    demo_set_configs,
    expand_braces,
    is_text_only,
)
from llm2clip_vlm.data.config import DataConfig, train_sets
from llm2clip_vlm.data.conversations import load_llava_records
from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.records import ImageCaptions, keep_captions
from llm2clip_vlm.data.text_corpus import load_text_corpus
from llm2clip_vlm.hub.cards import llava_card, tower_card
from llm2clip_vlm.identity import Mode, files_identity, images_identity, path_identity, tree_files
from llm2clip_vlm.imports.sidecar import offer_sidecars
from llm2clip_vlm.llava.inputs import PhaseData, phase_data, read_phase
from llm2clip_vlm.llava.model import check_inputs
from llm2clip_vlm.llava.train import train_llava
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.plan.known import is_timm_name, load_config
from llm2clip_vlm.plan.memory import DEFAULT, Distributed, named_config, read_accelerate
from llm2clip_vlm.plan.stages import Cluster, StagePlan, plan_embed, plan_llava, plan_stage1, plan_stage2
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.run_dir import Claim, checked_outputs
from llm2clip_vlm.store.run import embed_splits, resolve_encoder_dir
from llm2clip_vlm.store.store import EmbeddingStore
from llm2clip_vlm.text.cra import choose_cra_source
from llm2clip_vlm.text.encoder import encoder_identity
from llm2clip_vlm.text.modeling import resolve_model_ref
from llm2clip_vlm.text.raw import write_raw_encoder
from llm2clip_vlm.text.train import train_stage1
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.session import RunInputs
from llm2clip_vlm.vision.export import export_tower
from llm2clip_vlm.vision.inputs import heldout_sets, usable_images
from llm2clip_vlm.vision.train import Stage2Data, train_stage2

log = get_logger(__name__)


def config_writer(cfg: RunConfig, output_dir: Path, claim: Claim | None = None) -> Callable[[], None]:
    """What a stage calls (main process) once its inputs are usable: write ``config.yaml``, the
    config exactly as run, and mark the claimed run started. A refused run leaves no config.yaml
    (the run directory's owner check relies on it)."""

    def ready() -> None:
        config_io.dump(cfg, output_dir / "config.yaml")
        if claim is not None:
            claim.started()

    return ready


# -- the identity of each command's inputs ------------------------------------------------------
def data_files(cfg: RunConfig, output_dir: Path | None = None) -> list[str]:
    """Every data file the run reads: manifests, webdataset shards, every text-corpus file.

    The demo world counts when it exists (``data.demo_dir``, or the run's own ``demo-data``).
    Folders are listed recursively (stage 1 reads a text-corpus folder's whole tree). Image files
    named by a manifest are identified by :func:`images_of` instead.
    """
    d = cfg.data
    sets = [*train_sets(d), *d.heldout.values()]
    if not train_sets(d):
        root = Path(d.demo_dir) if d.demo_dir else demo_dir_for(d, output_dir) if output_dir else None
        if root is not None and root.is_dir():
            train, heldout = demo_set_configs(root)
            sets = [train, *heldout.values(), *d.heldout.values()]
    return _expand([c.path for c in sets] + list(d.text_corpus))


def _expand(paths: Sequence[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        if not path:
            continue
        if Path(path).is_dir():
            files += [str(p) for p in tree_files(path)]
        else:
            files += [f for pattern in expand_braces(path) for f in sorted(glob.glob(pattern))] or [path]
    return files


def model_identity(ref: str, mode: Mode) -> dict[str, str]:
    """The identity of a model reference's files: a folder's tree, a ``.gguf`` file (also behind
    ``builtin:``), a tower (``llm2clip:`` prefix); a hub id is identified by its name."""
    if not ref:
        return {}
    ref = ref.removeprefix("llm2clip:")
    if ref.startswith("builtin:") or ref.endswith(".gguf"):
        found = resolve_model_ref(ref, convert_gguf=False)
        return path_identity(Path(found.path) / (found.gguf_file or ""), mode)
    if Path(ref).expanduser().exists():
        return path_identity(Path(ref).expanduser(), mode)
    return {ref: "hub id"}


class _ImagePaths(Sequence[str]):
    """The image file paths of records, built on access ("" for an image inside a shard)."""

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        image = self.records[i].image
        return str(image) if isinstance(image, (str, Path)) else ""


def images_of(record_sets: Sequence[Sequence[Any]], mode: Mode) -> dict[str, str]:
    """The content identity of the image files of each record set (shard images come with their
    shard's identity); see :func:`llm2clip_vlm.identity.images_identity`."""
    return {str(i): images_identity(_ImagePaths(captions_only(r)), mode) for i, r in enumerate(record_sets)}


def stage1_inputs(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """What stage 1's result depends on besides its config: the data (captions, text corpus tree)
    and the base LLM's files (a folder or a GGUF file)."""
    mode = cfg.reliability.input_identity
    return {
        "data": files_identity(data_files(cfg, out), mode),
        "base_model": model_identity(cfg.stage1.model, mode),
    }


def stage2_inputs(
    cfg: RunConfig, out: Path, records: Sequence[Sequence[Any]], store: Path, encoder: str
) -> dict[str, Any]:
    """Stage 2's inputs: data files, image content, the store's manifests (each holds its shards'
    sha256), the encoder's identity and the backbone's files."""
    mode = cfg.reliability.input_identity
    return {
        "data": files_identity(data_files(cfg, out), mode),
        "images": images_of(records, mode),
        "store": files_identity(sorted(store.glob("*/manifest.json")), "full"),
        "encoder": encoder,
        "backbone": model_identity(cfg.stage2.backbone.name_or_path, mode),
    }


def llava_inputs(cfg: RunConfig, phase: str, data: PhaseData, init: Path | None) -> dict[str, Any]:
    """A LLaVA phase's inputs: its records (and held-out) files, image content, the tower, the LLM
    (folder or GGUF file) and, for finetuning, the pretrained projector (``--from``)."""
    mode = cfg.reliability.input_identity
    p = getattr(cfg.llava, phase)
    records = load_llava_records(
        data.records, data.image_folder, max_samples=p.data.max_samples, skip_bad=True,
        max_bad_fraction=1.0, verify_images=False,
    )  # fmt: skip
    inputs: dict[str, Any] = {
        "data": files_identity(_expand([str(data.records), str(data.heldout or "")]), mode),
        "images": images_identity(_ImagePaths(records), mode),
        "tower": model_identity(cfg.llava.tower, mode),
        "llm": model_identity(cfg.llava.llm, mode),
    }
    if init is not None:
        inputs["projector"] = path_identity(
            init / "mm_projector.safetensors" if init.is_dir() else init, mode
        )
    return inputs


def run_stage1(cfg: RunConfig, output_dir: str | Path, claim: Claim | None = None) -> dict[str, Any]:
    """``llm2clip-vlm stage1``: resolve the data of ``cfg`` and train (see ``train_stage1``)."""
    out = Path(output_dir)
    train_set, heldout_sets = resolve_data(cfg.data, out)
    check_caption_pairs(train_set, heldout_sets, cfg.data)
    if claim is not None and claim.main:
        claim.inputs(stage1_inputs(cfg, out))
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
    metrics = train_stage1(
        cfg.stage1,
        out,
        source.train_records,
        source.records,
        text_corpus=corpus,
        text_corpus_ratio=cfg.data.text_corpus_ratio,
        cra_info=source.describe(),
        inputs=run_inputs(cfg, out, claim),
    )
    return _with_data_counts(out, metrics, train_set, heldout_sets)


def run_without_stage1(cfg: RunConfig, output_dir: str | Path) -> dict[str, Any]:
    """``build-tower --without-stage1``: the base LLM, untrained, as the stage-1 encoder.

    The stage-1 folder gets the raw LLM as a CaptionEncoder (:mod:`llm2clip_vlm.text.raw`) and
    its CRA on the same held-out pairs stage 1 would use.
    """
    out = Path(output_dir)
    train_set, heldout_sets = resolve_data(cfg.data, out)
    check_caption_pairs(train_set, heldout_sets, cfg.data)
    heldout = {name: captions_only(records) for name, records in heldout_sets.items()}
    source = choose_cra_source(captions_only(train_set), heldout, cfg.stage1.cra_set, cfg.stage1.cra_captions)
    metrics = write_raw_encoder(
        cfg.stage1, out, source.records, cra_info=source.describe(),
        allow_pickle=cfg.reliability.allow_pickle_weights,
    )  # fmt: skip
    return _with_data_counts(out, metrics, train_set, heldout_sets)


def run_inputs(
    cfg: RunConfig, out: Path, claim: Claim | None, on_step: Callable[[int, float], None] | None = None
) -> RunInputs:
    """What every trainer gets from the recipe besides its section: the reliability policy, the
    tracking section with the resolved config it records, and the config.yaml writer."""
    return RunInputs(
        reliability=cfg.reliability,
        tracking=cfg.tracking,
        run_config=config_io.to_dict(cfg),
        on_ready=config_writer(cfg, out, claim),
        on_step=on_step,
    )


def _with_data_counts(
    out: Path, metrics: dict[str, Any], train: CaptionSet, heldout: dict[str, CaptionSet]
) -> dict[str, Any]:
    """Add the records read and skipped per set (per part of a list of sets) to ``metrics.json``."""
    path = out / "metrics.json"
    if not metrics or not path.is_file():  # not the main process (nothing was written)
        return metrics
    import json
    import os
    import tempfile

    metrics = {**metrics, "data": data_counts(train, heldout)}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".metrics-")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
    return metrics


def check_caption_pairs(train: CaptionSet, heldout: Mapping[str, CaptionSet], data: DataConfig) -> None:
    """Stop stage 1 early, naming the fix, when the training set has one caption per image.

    SimCSE pairs two captions of one image: a set read with one caption column (img2dataset's
    ``KEY.txt`` only, a one-column manifest) gives it nothing to learn from.
    """
    counts = caption_counts(train)
    paired = int((counts >= 2).sum())
    if paired >= 2:
        return
    columns = {i: c.caption_columns for i, c in enumerate(train_sets(data))} or {"demo": "default"}
    raise DataError(
        f"stage 1 needs two or more captions per image (a short and a long, or two short) and "
        f"{paired} of {len(counts)} training images have them; map a second caption column in "
        f"data.train.caption_columns (now {columns if len(columns) > 1 else next(iter(columns.values()))}; "
        "DreamLIP / img2dataset --save_additional_columns: {shortSV_captions: short, "
        "longSV_captions: long}), or train stage 1 on a caption-pair file (short_caption,long_caption); "
        "CRA also needs a data.heldout set with two short captions per image (COCO, Flickr30k)"
    )


def run_embed(
    cfg: RunConfig,
    output_dir: str | Path,
    stage1_output: str | Path | None = None,
    data: tuple[Sequence[ImageCaptions], Mapping[str, Sequence[ImageCaptions]]] | None = None,
    claim: Claim | None = None,
) -> dict[str, dict[str, Any]]:
    """``llm2clip-vlm embed``: one store per split of ``cfg.data`` (see ``embed_splits``).

    Its inputs are recorded in the claim but not compared: each store compares its own (the
    captions and the encoder identity) and embeds again what changed.
    """

    encoder = resolve_encoder_dir(
        cfg.embed.encoder, stage1_output
    )  # a missing one is refused before any write
    if claim is not None and claim.main:
        mode = cfg.reliability.input_identity
        claim.inputs(
            {
                "data": files_identity(data_files(cfg, Path(output_dir)), mode),
                "encoder": encoder_identity(encoder),
            },
            compare=False,
        )
    return embed_splits(
        cfg.embed, cfg.data, output_dir, stage1_output=stage1_output, data=data,
        on_ready=config_writer(cfg, Path(output_dir), claim),
    )  # fmt: skip


def run_stage2(
    cfg: RunConfig,
    output_dir: str | Path,
    store_dir: str | Path,
    encoder_dir: str | Path | None = None,
    claim: Claim | None = None,
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
    text_only = is_text_only(train_set)
    if text_only:
        raise DataError(
            f"stage 2 needs images, and data.train set(s) {', '.join(text_only)} hold captions only "
            '(a caption-pair file or image_column: ""); give stage 2 an image-caption set '
            "(stage 1 and embed may keep the text-only one)"
        )
    # The same captions the store was written from (``embed`` applies the same cut).
    train_records = keep_captions(train_set, cfg.embed.train_captions_per_kind)
    if not (store_dir / "train").exists():
        # LLM2CLIP's own route: extract_embedding.py's side-cars beside the shards are the store
        # when the encoder reproduces them (one line either way; see offer_sidecars).
        state = dist.process_state()
        with state.main_process_first():
            # A list of sets imports every set's side-cars into one store, keys namespaced per set
            # as the joined training set names them (a list of one set is that set).
            if state.is_main_process:
                offer_sidecars(train_sets(cfg.data), store_dir, encoder)
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
    if claim is not None and claim.main:  # before the images are checked: nothing written yet
        records = [train_records, *heldout_records.values()]
        claim.inputs(stage2_inputs(cfg, out, records, store_dir, identity))
    heldout = heldout_sets(heldout_records, store_dir, encoder, identity, out / "heldout", cfg.embed, usable)
    data = Stage2Data(
        train_records,
        store,
        heldout,
        open_image,
        usable=train_usable,
        encoder_path=str(encoder.resolve()) if encoder else "",
        encoder_identity=identity,
        policy=cfg.data,  # the recipe's data section is a DataPolicy
    )
    metrics = train_stage2(cfg.stage2, out, data, run_inputs(cfg, out, claim))
    return _with_data_counts(out, metrics, train_set, heldout_records)


def run_export(
    run_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    dtype: str | None = None,
    verify: bool = True,
    cfg: RunConfig | None = None,
) -> Path:
    """``export-tower``: the stage-2 run's tower and retrieval model, with the hub card of its config.

    The run's ``model/`` is checked first against the checksums it was written with (its
    ``run.json``): a model changed since is refused, never exported. ``cfg`` (``build-tower``:
    its current config) makes the card; default: the run's ``config.yaml``.
    """
    checked_outputs(Path(run_dir), "stage-2 run")
    cfg_file = Path(run_dir) / "config.yaml"
    if cfg is None:
        cfg = config_io.load(RunConfig, cfg_file) if cfg_file.is_file() else RunConfig()
    datasets = [s.path for s in (*train_sets(cfg.data), *cfg.data.heldout.values())]
    return export_tower(
        run_dir, out_dir, model_dir=model_dir, dtype=dtype, verify=verify,
        card=lambda provenance: tower_card(provenance, cfg.hub, datasets),
    )  # fmt: skip


def run_llava(
    cfg: RunConfig,
    output_dir: str | Path,
    phase: str,
    init: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    claim: Claim | None = None,
) -> dict[str, Any]:
    """``llava-pretrain`` / ``llava-finetune``: resolve the phase's data, read its records and train
    it (see ``train_llava``)."""

    out = Path(output_dir)
    check_inputs(cfg.llava, phase, Path(init) if init else None)  # before anything is written
    data = phase_data(cfg.llava, phase, out, demo_dir=cfg.data.demo_dir, demo_seed=cfg.data.demo_seed)
    if claim is not None and claim.main:
        claim.inputs(llava_inputs(cfg, phase, data, Path(init) if init else None))
    records = read_phase(cfg.llava, phase, data)
    inputs = run_inputs(cfg, out, claim, on_step)
    metrics = train_llava(cfg.llava, phase, out, records, init=Path(init) if init else None, inputs=inputs)
    if metrics:  # the main process: the hub model card of model/
        card = llava_card(
            cfg.llava, cfg.hub, phase, metrics, out, Path(init) if init else None, data.records, data.heldout
        )
        (out / "model" / "README.md").write_text(card)
    return metrics


PLAN_STAGES = ("stage1", "embed", "stage2", "llava-pretrain", "llava-finetune")
# Width of the reference stage-1 LLM (Llama-3-8B): a stage-2 recipe's caption embeddings.
REFERENCE_TEXT_DIM = 4096


def recipe_stages(recipe: Path) -> list[str]:
    """The stages a recipe file is about: the sections it sets (all of them for one that sets none)."""
    raw = yaml.safe_load(recipe.read_text()) or {}
    stages = []
    if "stage1" in raw:
        stages += ["stage1", "embed"]
    if "stage2" in raw:
        stages.append("stage2")
    llava = raw.get("llava") or {}
    if llava:
        phases = [ph for ph in ("pretrain", "finetune") if ph in llava] or ["pretrain", "finetune"]
        stages += [f"llava-{ph}" for ph in phases]
    return stages or list(PLAN_STAGES)


def run_plan(
    cfg: RunConfig,
    recipe: Path | None,
    cluster: Cluster,
    *,
    accelerate: Path | None = None,
    tower: str | None = None,
    records: int | None = None,
    stages: Sequence[str] | None = None,
) -> tuple[list[StagePlan], Distributed]:
    """``plan``: every stage of the recipe built on the meta device and planned per GPU.

    The distributed strategy is ``accelerate`` (a config file), else the one the recipe's own run
    line names (``--config_file recipes/accelerate/...``), else DDP (accelerate's default); its
    ``num_processes`` is not used: the GPUs are ``cluster.gpus``.
    """
    text = recipe.read_text() if recipe else ""
    chosen = accelerate or (named_config(text, recipe.parent) if recipe else None)
    dist = read_accelerate(chosen) if chosen else DEFAULT
    if stages:
        todo = list(stages)
    elif recipe:
        todo = recipe_stages(recipe)
    else:  # the demo: build-tower's stages, and LLaVA's once its tower exists
        has_tower = bool(tower) or Path(cfg.llava.tower.removeprefix("llm2clip:"), "config.json").is_file()
        todo = list(PLAN_STAGES) if has_tower else ["stage1", "embed", "stage2"]
    plans: list[StagePlan] = []
    asked = records
    if records is None:  # the recipe's data where it says its size: the demo world, a cap
        sets = train_sets(cfg.data)
        if not sets:
            records = cfg.data.demo_train_images
        elif all(t.max_images for t in sets):  # every set capped: their sum (weights aside)
            records = sum(t.max_images for t in sets)
    llm_config = None
    if {"stage1", "embed"} & set(todo):
        llm_config = load_config(cfg.stage1.model)
    if "stage1" in todo:
        plans.append(plan_stage1(cfg.stage1, llm_config, dist, cluster, records))
    if "embed" in todo:
        plans.append(
            plan_embed(cfg.embed, cfg.stage1.model, llm_config, cluster, records, cfg.stage1.max_length)
        )
    if "stage2" in todo:
        b = cfg.stage2.backbone
        if b.kind == "timm" or is_timm_name(b.name_or_path):
            vision: Any = b.name_or_path
        elif b.name_or_path:
            vision = load_config(b.name_or_path, vision=True)
        else:  # the random demo ViT: the config the package builds it from
            vision = None
        text_dim = llm_config.hidden_size if llm_config is not None else REFERENCE_TEXT_DIM
        plans.append(plan_stage2(cfg.stage2, vision, text_dim, dist, cluster, records, cfg.data.stream))
    phases = [s.removeprefix("llava-") for s in todo if s.startswith("llava-")]
    if phases:
        vision_config = load_config(tower or cfg.llava.tower.removeprefix("llm2clip:"), vision=True)
        lm_config = load_config(cfg.llava.llm)
        for phase in phases:
            n = asked or getattr(cfg.llava, phase).data.max_samples or None
            plans.append(plan_llava(cfg.llava, phase, vision_config, lm_config, dist, cluster, n))
    return plans, dist
