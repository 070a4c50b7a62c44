"""Where a LLaVA phase's data comes from (the configured files, or the demo world's LLaVA splits),
and its records, read and checked under the phase's :class:`~llm2clip_vlm.data.config.DataPolicy`:
what the command layer hands ``train_llava`` (a stage sees records, never files)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from llm2clip_vlm.data.conversations import LlavaRecord, LlavaRecords, load_llava_records
from llm2clip_vlm.data.errors import BadRecords
from llm2clip_vlm.data.synthetic_llava import SPEC_VERSION, write_llava_demo
from llm2clip_vlm.llava.config import LlavaConfig, LlavaPhaseConfig
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)


class PhaseData(NamedTuple):
    """A phase's records file, the folder its image paths are relative to, and its held-out file."""

    records: Path
    image_folder: str
    heldout: Path | None


def demo_llava_dir(demo_dir: str, demo_seed: int, output_dir: Path) -> Path:
    """The demo world's LLaVA splits (written once, next to the run, when missing)."""

    root = Path(demo_dir) / "llava" if demo_dir else output_dir / "demo-llava"
    info = root / "llava_dataset.json"
    if info.is_file():
        spec = json.loads(info.read_text())
        if spec.get("seed") == demo_seed and spec.get("version") == SPEC_VERSION:
            return root
    log.info("writing the synthetic LLaVA demo data to %s", root)
    write_llava_demo(root, seed=demo_seed)
    return root


def phase_data(
    llava: LlavaConfig, phase: str, output_dir: Path, demo_dir: str = "", demo_seed: int = 0
) -> PhaseData:
    """The data of ``phase`` (``pretrain`` / ``finetune``); the demo world's when none is set."""
    p: LlavaPhaseConfig = getattr(llava, phase)
    held = Path(p.data.heldout_path) if p.data.heldout_path else None
    if p.data.path:
        return PhaseData(Path(p.data.path), p.data.image_folder, held)
    root = demo_llava_dir(demo_dir, demo_seed, output_dir)
    if phase == "pretrain":
        # A caption-trained model is not asked questions: the demo's held-out questions measure
        # finetuning (their "before" is the pretrained model).
        return PhaseData(root / "llava_pretrain.json", "", held)
    return PhaseData(root / "llava_instruct.json", "", held or root / "llava_heldout.json")


class PhaseRecords(NamedTuple):
    """A phase's checked records, its held-out questions (empty: none), and the ledger of the
    records skipped while reading them (``bad.skipped``; ``name`` is the set in the report)."""

    records: LlavaRecords
    heldout: Sequence[LlavaRecord]
    bad: BadRecords
    name: str


def read_phase(llava: LlavaConfig, phase: str, data: PhaseData) -> PhaseRecords:
    """Read and check ``data`` under ``llava.<phase>.data``'s policy (see
    :func:`~llm2clip_vlm.data.conversations.load_llava_records`). A streamed set's images are
    checked while training, not here.

    Raises:
        FileNotFoundError: a data file does not exist.
        DataError: a bad record (unless skipped), or too many of them.
    """
    d = getattr(llava, phase).data
    bad = BadRecords(
        d.skip_bad, d.max_bad_fraction, name=data.records.name, option=f"llava.{phase}.data.skip_bad"
    )
    records = load_llava_records(
        data.records,
        data.image_folder,
        max_samples=d.max_samples,
        skip_bad=d.skip_bad,
        max_bad_fraction=d.max_bad_fraction,
        bad=bad,
        check_workers=d.check_workers,
        verify_images=d.verify_images and not d.stream,  # a stream checks while reading
    )
    heldout: Sequence[LlavaRecord] = []
    if data.heldout is not None and data.heldout.is_file():
        heldout = load_llava_records(
            data.heldout,
            max_samples=d.heldout_max_samples,
            skip_bad=d.skip_bad,
            max_bad_fraction=d.max_bad_fraction,
            verify_images=d.verify_images,
            check_workers=d.check_workers,
        )
    return PhaseRecords(records, heldout, bad, data.records.name)
