"""Config sections for the data sets every stage reads (image-caption sets and a text corpus), and
the one :class:`DataPolicy` (bad records, the up-front image check, streaming) that both data
sections embed: ``data`` (stages 1 and 2, ``embed``) and ``llava.<phase>.data``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llm2clip_vlm.config_io import COUNT, FRACTION, RATE, SEED, SIZE, Range


@dataclass
class DataPolicy:
    """How a stage reads its data: what a bad record does, whether images are decoded up front, and
    whether the training set is streamed. Embedded (as a base class: the recipe keys stay
    ``data.skip_bad``, ``llava.finetune.data.skip_bad``, ...) by :class:`DataConfig` and
    ``llava.config.LlavaDataConfig``."""

    # Bad records (unreadable or missing image, malformed record or conversation): False = stop at
    # the first with a message naming it; True = skip, count and report them
    # (``bad_records.json``, ``metrics.json``), but stop if more than ``max_bad_fraction`` is bad.
    skip_bad: bool = False
    max_bad_fraction: float = 0.01
    # Decode every image once before training, so a broken image is found (and stopped at or
    # skipped) up front, not hours into the run; the result is cached by the data set's identity
    # (docs/DATA.md), so a second start decodes nothing. False = find it when it is reached.
    verify_images: bool = True
    # Worker threads of that check.
    check_workers: int = 4
    # Shards (or an indexed manifest for stage 2): stream the training set instead of sampling it
    # at random. Each process and DataLoader worker reads its own shards in order through a
    # shuffle buffer of this many records; the stream position is saved with every checkpoint.
    # Images are then checked while training (under the same skip_bad policy), not up front.
    stream: bool = False
    shuffle_buffer: int = 2000

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "max_bad_fraction": FRACTION,
        "check_workers": COUNT,
        "shuffle_buffer": COUNT,
    }


@dataclass
class CaptionSetConfig:
    """One image-caption data set on disk.

    ``path`` is a manifest (``.json``/``.jsonl``/``.csv``/``.tsv``/``.parquet``) or webdataset tar
    shards (a directory of ``.tar`` files, a glob, or a brace pattern ``shard-{000..009}.tar``), or
    the folder img2dataset writes with ``--output_format files``. Known layouts are recognised by
    their header while the mapping fields keep their defaults (:mod:`llm2clip_vlm.data.layouts`):
    LLM2CLIP's DreamLIP CSV, a text-only ``short_caption,long_caption`` file, LLaVA / ShareGPT4V
    conversation JSON.
    """

    path: str = ""
    # img2dataset-files: img2dataset --output_format files (NNNNN/KEY.jpg + KEY.json/KEY.txt).
    format: Literal["auto", "json", "csv", "parquet", "webdataset", "img2dataset-files"] = "auto"
    # Images are resolved relative to this folder (default: the manifest's folder); paths that
    # would leave it are refused.
    image_root: str = ""
    # "" = a text-only set (captions, no images): enough for stage 1 and ``embed``, refused by stage 2.
    image_column: str = "image"
    # Column holding a stable id per image; empty = the image path (or the tar key).
    key_column: str = ""
    # Column -> caption type. A column may hold one string or a list of strings.
    caption_columns: dict[str, Literal["short", "long"]] = field(
        default_factory=lambda: {"short_captions": "short", "long_captions": "long"}
    )
    # Keep only the first N images (0 = all).
    max_images: int = 0
    # In a list of sets (``data.train: [...]``): the name that prefixes this set's keys
    # (``name/key``: two img2dataset runs both number their keys from 000000000) and names it in
    # messages and metrics.json; "" = the folder or file name. Unused for a single set.
    name: str = ""
    # Sampling weight in a list of sets (open_clip's --train-data-upsampling-factors): each epoch
    # draws ``weight`` x this set's images (2 = every image twice, 0.5 = a fresh half each epoch);
    # streamed, each epoch draws shards with replacement by this weight (docs/DATA.md).
    weight: float = 1.0

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "max_images": COUNT,
        "weight": RATE,
    }


@dataclass
class DataConfig(DataPolicy):
    """Where the data of a run comes from (and, from :class:`DataPolicy`, how it is read). An empty
    ``train.path`` means the synthetic demo world."""

    # Synthetic demo world (``llm2clip-vlm demo-data``): written here when missing; empty = <output>/demo-data.
    demo_dir: str = ""
    demo_seed: int = 0
    demo_train_images: int = 4000
    demo_heldout_images: int = 1000
    # One caption set, or a list of them trained on together (e.g. CC3M + CC12M; see
    # :func:`train_sets`); a list of one set is the same run as that set alone.
    train: CaptionSetConfig | list[CaptionSetConfig] = field(default_factory=CaptionSetConfig)
    # Held-out sets for evaluation, by name (e.g. {"coco": ..., "docci": ...}).
    heldout: dict[str, CaptionSetConfig] = field(default_factory=dict)
    # Plain-text corpus mixed into stage 1 (files, directories of .txt, or globs).
    text_corpus: list[str] = field(default_factory=list)
    # Share of stage-1 MNTP samples drawn from the text corpus (0 = captions only).
    text_corpus_ratio: float = 0.0

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        **DataPolicy.RANGES,
        "demo_seed": SEED,
        "demo_train_images": SIZE,
        "demo_heldout_images": COUNT,
        "text_corpus_ratio": FRACTION,
    }


def train_sets(cfg: DataConfig) -> list[CaptionSetConfig]:
    """``data.train`` as a list (one entry for a single set; empty paths left out)."""
    sets = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    return [s for s in sets if s.path]


def has_train_data(cfg: DataConfig) -> bool:
    """Whether ``data.train`` names data (otherwise the run uses the synthetic demo world)."""
    return bool(train_sets(cfg))
