"""Stage 2: align a vision encoder to the frozen LLM through stored caption embeddings.

Reads like the loop it is, top to bottom:

1. data: training images + the caption-embedding store (refused when it does not match the data
   or the embedder); per sample, a long or a short caption's embedding at random
   (``long_caption_ratio``), decided by ``(seed, epoch, index)`` alone so that every process
   count and every resumed run sees the same samples;
2. model: :class:`LLM2CLIP` (backbone + new image head + text adaptor + logit scale);
3. optimiser: AdamW (0.9, 0.98, eps 1e-6), weight decay except on biases, norms and the logit
   scale, layer-wise lr decay over the ViT blocks, ``head_lr`` for the new parts, cosine schedule;
4. loop: accelerate (DDP, or FSDP through an accelerate config), mixed precision, ``ClipLoss`` /
   ``SigLipLoss`` (local loss, gather with grad), grad clip, logit scale clamped after each step,
   checkpoints every N steps (temp folder + rename) that a killed run resumes from;
5. zero-shot retrieval on every held-out set before and after training -> ``metrics.json``.

[IMPORTANT] The global batch is ``stage2.batch_size`` whatever the number of processes: the
sampler cuts one global batch per step and each rank takes its contiguous slice, in rank order.
With the local-loss formulation the mean of the ranks' losses is then exactly the 1-process loss,
which the 2-process test pins.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from llm2clip_vlm import configuration
from llm2clip_vlm.bad_samples import MidRunBadImages, gather_failures, load_or_replace
from llm2clip_vlm.checkpointing import Checkpointer, GracefulExit, NonFiniteGuard
from llm2clip_vlm.config import RunConfig
from llm2clip_vlm.data.records import ImageCaptions, keep_captions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.losses import ClipLoss, SigLipLoss
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.tracking.tracker import RunTracker
from llm2clip_vlm.vision.backbones import create_backbone
from llm2clip_vlm.vision.config import Stage2Config
from llm2clip_vlm.vision.decay import exempt_from_weight_decay
from llm2clip_vlm.vision.model import LLM2CLIP, LLM2CLIPConfig
from llm2clip_vlm.vision.retrieval import retrieval_metrics

log = get_logger(__name__)

ImageLoader = Callable[[ImageCaptions], Any]  # record -> PIL RGB image
CHECKPOINTS = "checkpoints"


class CaptionEmbeddings(Protocol):
    """What stage 2 needs from the embedding store (rows = captions in data-set order)."""

    @property
    def dim(self) -> int: ...

    def caption_rows(self, image_index: int, kind: str) -> np.ndarray: ...

    def __getitem__(self, rows: Any) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class Stage2TrainData(Dataset):
    """(pixel_values, caption embedding) per ``(epoch, image index)``.

    The caption is drawn from a generator seeded by ``(seed, epoch, index)``: the choice does not
    depend on worker, process count or resume point.
    """

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        embeddings: CaptionEmbeddings,
        image_processor: Any,
        load_image: ImageLoader,
        long_caption_ratio: float,
        seed: int,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.records = records
        # Sampler positions -> record indices (the usable images when bad ones were skipped).
        self.indices = list(indices) if indices is not None else range(len(records))  # no list at 10M
        self.embeddings = embeddings
        self.image_processor = image_processor
        self.load_image = load_image
        self.long_ratio = long_caption_ratio
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def caption_row(self, epoch: int, index: int) -> int:
        rng = np.random.default_rng((self.seed, epoch, index))
        short = self.embeddings.caption_rows(index, "short")
        long = self.embeddings.caption_rows(index, "long")
        if len(short) == 0 and len(long) == 0:
            raise ValueError(f"{self.records[index].source or self.records[index].key}: image has no caption")
        # Draw the coin even when one kind is missing so the stream of draws stays aligned.
        use_long = rng.random() < self.long_ratio
        rows = long if (use_long and len(long)) or not len(short) else short
        return int(rows[rng.integers(len(rows))])

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(pixel_values, caption embedding, failures)``: an unreadable image is replaced by a
        deterministic other one and reported in ``failures`` (see :mod:`llm2clip_vlm.bad_samples`)."""
        epoch, position = item
        image, index, failures = load_or_replace(
            self.load_image, self.records, self.indices, position, epoch, self.seed
        )
        row = self.caption_row(epoch, index)
        emb = torch.from_numpy(np.asarray(self.embeddings[[row]], dtype=np.float32)[0])
        return pixel_values(self.image_processor, image), emb, failures


def pixel_values(image_processor: Any, image: Any) -> torch.Tensor:
    """``[3, H, W]`` float tensor of one PIL image through the backbone's own processor."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class _Images(Dataset):
    def __init__(self, records: Sequence[ImageCaptions], processor: Any, load_image: ImageLoader) -> None:
        self.records, self.processor, self.load_image = records, processor, load_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return pixel_values(self.processor, self.load_image(self.records[i]))


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's slice of global batch ``step`` for ``step in [start_step, total_steps)``.

    Epoch ``e`` is a permutation drawn from ``seed + e``; the last incomplete batch of an epoch is
    dropped (contrastive batches should be full).
    """

    def __init__(
        self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int, total_steps: int
    ) -> None:
        if global_batch % world:
            raise ValueError(f"stage2.batch_size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise ValueError(f"stage2.batch_size {global_batch} is larger than the {n} training images")
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.steps_per_epoch = n // global_batch

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.batch // self.world
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                perm_epoch = epoch
            batch = perm[k * self.batch : (k + 1) * self.batch]
            mine = batch[self.rank * local : (self.rank + 1) * local]
            yield [(epoch, int(i)) for i in mine]


@dataclass
class HeldoutSet:
    """A retrieval set: images, one stage-1 embedding per caption, and each caption's image."""

    records: Sequence[ImageCaptions]
    text_embeddings: torch.Tensor  # [n_captions, text_dim]
    caption_image: torch.Tensor  # [n_captions] long

    def subset(self, images: Sequence[int]) -> HeldoutSet:
        """The set restricted to ``images`` (e.g. without the images that failed to decode)."""
        keep = torch.tensor(list(images), dtype=torch.long)
        new_index = torch.full((len(self.records),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        rows = new_index[self.caption_image] >= 0
        return HeldoutSet(
            [self.records[i] for i in images], self.text_embeddings[rows], new_index[self.caption_image[rows]]
        )


# --------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------
def build_param_groups(model: LLM2CLIP, s: Stage2Config) -> list[dict[str, Any]]:
    """AdamW parameter groups: (layer, decay / no decay), each with its own lr.

    - no weight decay on 0/1-d parameters (biases, norm scales, logit scale/bias) nor on the
      positional and class embeddings (:mod:`llm2clip_vlm.vision.decay`, as the reference);
    - backbone layer ``l`` (0 = stem, ``L + 1`` = after the last block) gets
      ``lr * layer_decay ** (L + 1 - l)``;
    - the new parts (image head, text adaptor, logit scale/bias) get ``head_lr`` (or ``lr``).

    Each group carries ``lr_scale`` (relative to ``lr``) and ``name`` for logs and tests.
    """
    head_lr = s.head_lr or s.lr
    layer_of = model.vision.layer_ids()
    top = model.vision.num_layers + 1
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = exempt_from_weight_decay(name, p)
        if name.startswith("vision."):
            layer = layer_of[name[len("vision.") :]]
            key, lr = f"vision.layer{layer}", s.lr * s.layer_decay ** (top - layer)
        else:
            key, lr = "new", head_lr
        g = groups.setdefault(
            (key, no_decay),
            {
                "name": f"{key}.{'no_decay' if no_decay else 'decay'}",
                "params": [],
                "lr": lr,
                "lr_scale": lr / s.lr if s.lr else 1.0,
                "weight_decay": 0.0 if no_decay else s.weight_decay,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def cosine_lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` (multiplies every group's lr)."""
    if step < warmup:
        # The reference's _warmup_lr: base_lr * (step + 1) / warmup_length (microsoft/LLM2CLIP
        # llm2clip/training/scheduler.py:9-10): full lr at the last warm-up step.
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _total_steps(s: Stage2Config, n_images: int) -> int:
    if s.max_steps > 0:
        return s.max_steps
    return max(1, int(s.epochs * (n_images // s.batch_size)))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    heldout: dict[str, HeldoutSet],
    image_processor: Any,
    load_image: ImageLoader,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast: Callable[[], Any],
    similarities: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float | int]]:
    """Zero-shot retrieval metrics of every held-out set (``model`` may be DDP/FSDP-wrapped).

    Every process runs it (an FSDP model needs all ranks in its forward); only the main one writes.
    ``similarities``, when given, receives each set's ``[images, captions]`` similarity matrix.
    """
    was_training = model.training
    model.eval()
    results = {}
    for name, hs in heldout.items():
        loader = DataLoader(
            _Images(hs.records, image_processor, load_image), batch_size=batch_size, num_workers=num_workers
        )
        image_features = []
        for pv in loader:
            with autocast():
                image_features.append(model(pixel_values=pv.to(device))["image_features"].float())
        text_features = []
        for start in range(0, len(hs.text_embeddings), batch_size):
            emb = hs.text_embeddings[start : start + batch_size].to(device)
            with autocast():
                text_features.append(model(text_embeddings=emb)["text_features"].float())
        sim = torch.cat(image_features) @ torch.cat(text_features).T
        results[name] = retrieval_metrics(sim.cpu(), hs.caption_image)
        if similarities is not None:
            similarities[name] = sim.cpu()
    model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer/scheduler state."""

    step: int = 0
    seconds: float = 0.0
    world_size: int = 1
    losses: list[float] = field(default_factory=list)
    retrieval_before: dict[str, Any] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    # With data.stream: the stream position of every process and worker (data/stream.py).
    data_position: dict[str, Any] = field(default_factory=dict)
    # Images found unreadable mid-run and skipped: [record, reason] (data.verify_images=false).
    bad_images: list[list[str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def run_stage2(
    cfg: RunConfig, output_dir: str | Path, store_dir: str | Path, encoder_dir: str | Path | None = None
) -> dict[str, Any]:
    """``llm2clip-vlm stage2``: resolve data, open the stores, train (see :func:`train_stage2`).

    Args:
        cfg: the run config.
        output_dir: the stage-2 run directory (resumes from its checkpoint).
        store_dir: the ``embed`` output: ``train/`` and one ``heldout-<name>/`` per held-out set.
        encoder_dir: the stage-1 CaptionEncoder (default ``cfg.embed.encoder``); its identity must
            match the stores'. Held-out sets without a store are encoded with it.
    """
    from llm2clip_vlm.data import open_image, resolve_data
    from llm2clip_vlm.store.store import EmbeddingStore
    from llm2clip_vlm.text.encoder import encoder_identity

    out = Path(output_dir)
    store_dir = Path(store_dir)
    encoder_dir = Path(encoder_dir or cfg.embed.encoder) if (encoder_dir or cfg.embed.encoder) else None
    # From the weight files on disk (checked against their save-time hashes), not from the JSON.
    identity = encoder_identity(encoder_dir) if encoder_dir is not None else ""

    train_set, heldout_sets = resolve_data(cfg.data, out)
    # The same captions the store was written from (``embed`` applies the same cut).
    train_records = keep_captions(train_set, cfg.embed.train_captions_per_kind)
    store = EmbeddingStore.open(
        store_dir / "train", captions=train_records, encoder_identity=identity or None
    )
    # The store keeps every record's rows; images that fail to decode are left out of sampling.
    # Streamed: images are checked as they are read (vision/stream.py), not decoded up front.
    usable = (
        None
        if cfg.data.stream
        else _usable_images(cfg, out, "train", train_records, earlier=train_set.skipped)
    )
    heldout: dict[str, HeldoutSet] = {}
    for name, records in heldout_sets.items():
        records = list(records)
        caption_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
        hstore_dir = store_dir / f"heldout-{name}"
        if hstore_dir.exists():
            hstore = EmbeddingStore.open(hstore_dir, captions=records, encoder_identity=identity or None)
            emb = torch.from_numpy(np.asarray(hstore[np.arange(len(caption_image))], dtype=np.float32))
        elif encoder_dir is not None:
            emb = _encode_captions(
                encoder_dir, records, cfg.embed.batch_size, out / "heldout" / f"{name}.safetensors", identity
            )
        else:
            raise FileNotFoundError(
                f"no embedding store for held-out set {name!r} ({hstore_dir}) and no encoder to embed it"
            )
        hs = HeldoutSet(records, emb, caption_image)
        good = _usable_images(cfg, out, name, records, earlier=heldout_sets[name].skipped)
        heldout[name] = hs if good is None else hs.subset(good)
    return train_stage2(
        cfg,
        out,
        train_records,
        store,
        heldout,
        usable=usable,
        load_image=open_image,
        encoder_path=str(encoder_dir.resolve()) if encoder_dir else "",
        encoder_identity=identity,
    )


def _usable_images(
    cfg: RunConfig, out: Path, name: str, records: Sequence[ImageCaptions], earlier: Sequence[Any] = ()
) -> list[int] | None:
    """Decode every image once per data set (``data.verify_images``): good indices, None if all are.

    Bad images stop the run with a message naming them, or with ``data.skip_bad`` are skipped and
    listed in ``<out>/bad_records.json`` (see :mod:`llm2clip_vlm.data.images`).
    """
    from llm2clip_vlm.data.check import check_caption_images
    from llm2clip_vlm.data.images import BadRecords, write_report

    if not cfg.data.verify_images:
        return None
    # The records skipped while reading count too: max_bad_fraction bounds all phases together.
    policy = BadRecords(cfg.data.skip_bad, cfg.data.max_bad_fraction, name=f"{name} images", earlier=earlier)
    # Cached by the data set's identity: decoded once, not at every start (data/check.py).
    good = check_caption_images(
        records, policy, workers=cfg.data.check_workers, description=f"checking {name} images"
    )
    if good is None:
        return None
    if not policy.skipped:
        return None
    write_report(out, name, len(records), policy.skipped)
    return good


def _encode_captions(
    encoder_dir: Path, records: Sequence[ImageCaptions], batch_size: int, cache: Path, identity: str
) -> torch.Tensor:
    """Held-out caption embeddings from the stage-1 encoder, cached per encoder identity."""
    import hashlib

    from llm2clip_vlm.text.encoder import CaptionEncoder

    texts = [c.text for r in records for c in r.captions]
    key = hashlib.sha256(json.dumps([identity, texts]).encode()).hexdigest()
    if cache.is_file():
        cached = load_file(str(cache))
        if "key" in cached and bytes(cached["key"].tolist()).decode() == key:
            return cached["embeddings"]
    emb = CaptionEncoder.from_pretrained(encoder_dir).encode(texts, batch_size=batch_size, show_progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"embeddings": emb.contiguous(), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)},
        str(cache),
    )
    return emb


def train_stage2(
    cfg: RunConfig,
    output_dir: str | Path,
    train_records: Sequence[ImageCaptions],
    embeddings: CaptionEmbeddings,
    heldout: dict[str, HeldoutSet],
    *,
    load_image: ImageLoader,
    encoder_path: str = "",
    encoder_identity: str = "",
    on_step: Callable[[int, float], None] | None = None,
    usable: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Train stage 2 and write ``model/``, ``metrics.json`` and ``config.yaml`` into ``output_dir``.

    Args:
        cfg: the run config (``cfg.stage2`` drives training).
        output_dir: run directory; a checkpoint in it is resumed from.
        train_records: training images (``embeddings`` rows follow their captions' order).
        embeddings: caption embeddings of ``train_records`` (the store, already checked).
        heldout: retrieval sets by name.
        load_image: record -> PIL RGB image.
        encoder_path, encoder_identity: the stage-1 encoder, recorded in the saved model.
        on_step: called as ``on_step(step, loss)`` after every optimizer step (main process).
        usable: indices of the records to train on (default all; bad images left out).

    Returns:
        The metrics written to ``metrics.json`` (``{"stage2": {...}}``).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    s = cfg.stage2
    out = Path(output_dir)
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[s.precision]
    accelerator = _make_accelerator(Accelerator, mixed)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    usable = list(usable) if usable is not None else range(len(train_records))  # no list at 10M
    total_steps = _total_steps(s, len(usable))

    set_seed(s.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = LLM2CLIP(
        LLM2CLIPConfig(
            backbone=s.backbone,
            text_dim=embeddings.dim,
            embed_dim=s.embed_dim,
            adaptor_blocks=s.adaptor_blocks,
            loss=s.loss,
            logit_scale_init=s.logit_scale_init,
            logit_scale_max=s.logit_scale_max,
            logit_bias_init=s.logit_bias_init,
            encoder_path=encoder_path,
            encoder_identity=encoder_identity,
        ),
        backbone=create_backbone(s.backbone, allow_pickle=cfg.reliability.allow_pickle_weights),
    )
    if s.gradient_checkpointing:
        model.vision.set_grad_checkpointing(True)
    processor = model.vision.image_processor
    if main:  # once the inputs (stores, backbone weights) are known to be usable
        out.mkdir(parents=True, exist_ok=True)
        configuration.dump(cfg, out / "config.yaml")

    checkpointer = Checkpointer(out / CHECKPOINTS, accelerator, keep=2)
    # Weights and state now, optimizer and scheduler after prepare; each rank slices the global
    # batch, so only the same number of processes continues the same run.
    resumed = checkpointer.load(same_world_size=True)
    state = TrainState(world_size=world)
    if resumed is not None:
        state = TrainState(**resumed.state)
        model.load_state_dict(resumed.weights)
        log.info("stage 2: resuming from %s at step %d", resumed.path, state.step)

    groups = build_param_groups(model, s)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups],
        lr=s.lr,
        betas=tuple(s.betas),
        eps=s.eps,
        fused=accelerator.device.type == "cuda",  # one kernel for all parameters on a GPU
    )
    # The scheduler is not given to accelerate: it would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(cosine_lr_factor, warmup=s.warmup_steps, total=total_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None:
        checkpointer.load(resumed.path, optimizer=optimizer, scheduler=scheduler, with_weights=False)
    raw = accelerator.unwrap_model(model)
    loss_fn: nn.Module = SigLipLoss() if s.loss == "siglip" else ClipLoss()

    n_params = sum(p.numel() for p in raw.parameters())
    log.info(
        "stage 2: %s backbone (%s), %.1fM parameters all trained, %d images, %d steps of %d (%d per process), "
        "%s, long-caption ratio %.2f",
        s.backbone.kind, s.backbone.name_or_path or "random", n_params / 1e6, len(usable), total_steps,
        s.batch_size, s.batch_size // world, s.precision, s.long_caption_ratio,
    )  # fmt: skip

    def run_eval(similarities: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return evaluate_retrieval(
            model, heldout, processor, load_image, s.eval_batch_size, s.num_workers,
            accelerator.device, accelerator.autocast, similarities,
        )  # fmt: skip

    if resumed is None or not state.retrieval_before:
        state.retrieval_before = run_eval()
        _log_retrieval("before", state.retrieval_before)
    tracker = RunTracker.start(
        out, cfg.tracking, stage="stage2", main=main, resume_step=state.step if resumed else None,
        config=configuration.to_dict(cfg),
    )  # fmt: skip
    tracker.log(0, {"retrieval": state.retrieval_before})

    dataset = Stage2TrainData(
        train_records, embeddings, processor, load_image, s.long_caption_ratio, s.seed, indices=usable
    )
    loader: Any
    if cfg.data.stream:  # each rank reads its own shards (vision/stream.py)
        from llm2clip_vlm.vision.stream import Stage2Stream

        loader = Stage2Stream(
            cfg, train_records, dataset, state.data_position, rank=rank, world=world,
            pin_memory=accelerator.device.type == "cuda",
        )  # fmt: skip
    else:
        sampler = GlobalBatchSampler(len(usable), s.batch_size, rank, world, s.seed, state.step, total_steps)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=s.num_workers,
            persistent_workers=False,
            # Pinned host batches let the copies below overlap with compute on a GPU.
            pin_memory=accelerator.device.type == "cuda",
        )
    model.train()
    start_time = time.perf_counter() - state.seconds
    images_seen, loop_start = 0, time.perf_counter()
    last_scale: float | None = None
    rel = cfg.reliability
    guard = NonFiniteGuard(
        "stage2", rel.skip_nonfinite_steps, rel.max_skipped_steps, list(state.skipped_steps)
    )
    bad_images = MidRunBadImages(
        cfg.data.skip_bad,
        cfg.data.max_bad_fraction,
        out,
        "train",
        len(train_records),
        state.bad_images,
        write=main,
    )
    with make_progress(disable=not main) as progress, GracefulExit() as signals:
        task = progress.add_task("stage 2", total=total_steps, completed=state.step, status="")
        for pv, emb, failures in loader:
            # Stops (one line naming the file) unless data.skip_bad; every rank decides alike.
            bad_images.add(gather_failures(accelerator, failures))
            state.bad_images = [list(x) for x in bad_images.seen]
            if resumed is not None:  # after the loader started: RNG exactly as after the saved step
                resumed.restore_rng()
                resumed = None
            pv = pv.to(accelerator.device, non_blocking=True)
            emb = emb.to(accelerator.device, non_blocking=True)
            with accelerator.autocast():
                feats = model(pixel_values=pv, text_embeddings=emb)
            if s.loss == "siglip":
                loss = loss_fn(
                    feats["image_features"],
                    feats["text_features"],
                    feats["logit_scale"].float(),
                    feats["logit_bias"].float(),
                )
            else:
                loss = loss_fn(feats["image_features"], feats["text_features"], feats["logit_scale"].float())
            accelerator.backward(loss)
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip > 0 else None
            )
            global_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
            if guard.check(global_loss, state.step + 1, grad_norm):
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            raw.clamp_logit_scale()

            # From the forward, not the parameter: under FSDP a rank's own shard of it may be empty.
            last_scale = round(feats["logit_scale"].item(), 4)
            state.step += 1
            state.losses.append(global_loss)
            state.skipped_steps = list(guard.skipped)
            state.seconds = time.perf_counter() - start_time
            images_seen += s.batch_size
            rate = images_seen / max(time.perf_counter() - loop_start, 1e-9)
            progress.update(
                task,
                completed=state.step,
                status=f"loss {global_loss:.4f} scale {last_scale:.1f} {rate:.1f} img/s",
            )
            if on_step is not None and main:
                on_step(state.step, global_loss)
            stop = state.step >= total_steps or _time_up(accelerator, s.max_seconds, state.seconds)
            interrupted = signals.should_stop(accelerator)
            tracker.train_step(
                state.step, loss=global_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                logit_scale=last_scale, samples=s.batch_size, last=stop or interrupted,
            )  # fmt: skip
            if (s.save_every_steps > 0 and state.step % s.save_every_steps == 0) or stop or interrupted:
                weights = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
                if cfg.data.stream:
                    state.data_position = loader.state_dict()  # a collective too
                checkpointer.save(
                    state.step, weights=weights if main else None, optimizer=optimizer,
                    scheduler=scheduler, state=asdict(state),
                )  # fmt: skip
            signals.raise_if_requested(accelerator, checkpointer.latest())
            if stop:
                break

    similarities: dict[str, torch.Tensor] = {}
    after = run_eval(similarities)
    _log_retrieval("after", after)
    tracker.log(state.step, {"retrieval": after})
    if main:  # what the report's retrieval gallery shows
        from llm2clip_vlm.tracking.gallery import write_retrieval_gallery

        write_retrieval_gallery(out, heldout, similarities, load_image)
    metrics = {
        "stage2": {
            "retrieval": after,
            "retrieval_before": state.retrieval_before,
            "train": {
                "steps": state.step,
                "total_steps": total_steps,
                "seconds": round(state.seconds, 2),
                "images_per_second": round(images_seen / max(time.perf_counter() - loop_start, 1e-9), 2),
                "first_loss": state.losses[0] if state.losses else None,
                "final_loss": state.losses[-1] if state.losses else None,
                "losses": state.losses,
                "skipped_steps": state.skipped_steps,
                "bad_images": len(state.bad_images),
                "processes": world,
                "logit_scale": last_scale,
            },
        }
    }
    to_save: LLM2CLIP | None = raw
    if accelerator.distributed_type == DistributedType.FSDP:
        # Sharded parameters: gather the full state (a collective) into a fresh copy on the main rank.
        full = accelerator.get_state_dict(model)
        to_save = LLM2CLIP(raw.config) if main else None
        if to_save is not None:
            to_save.load_state_dict(full)
    if main and to_save is not None:
        to_save.save_pretrained(out / "model")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tracker.finish()
    accelerator.wait_for_everyone()
    return metrics


def _make_accelerator(accelerator_cls: Any, mixed_precision: str) -> Any:
    """An Accelerator with this stage's precision, also after another stage ran in this process.

    accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with
    another ``mixed_precision`` (``build-tower`` runs stage 1 and stage 2 in one process). Resetting
    only the AcceleratorState keeps the process group (PartialState) intact.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and str(shared.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return accelerator_cls(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _time_up(accelerator: Any, max_seconds: float, seconds: float) -> bool:
    """The same stop decision on every rank (clocks differ; a lone rank stopping would hang)."""
    if max_seconds <= 0:
        return False
    flag = torch.tensor([1.0 if seconds >= max_seconds else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _log_retrieval(when: str, results: dict[str, Any]) -> None:
    for name, m in results.items():
        log.info(
            "retrieval %s on %s (%d images, %d captions): I2T R@1/5/10 %.1f/%.1f/%.1f  T2I %.1f/%.1f/%.1f",
            when, name, m["n_images"], m["n_captions"], m["i2t_r1"], m["i2t_r5"], m["i2t_r10"],
            m["t2i_r1"], m["t2i_r5"], m["t2i_r10"],
        )  # fmt: skip
