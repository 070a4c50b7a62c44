"""Supervised SimCSE batches for caption-contrastive training (LLM2CLIP "CC").

Per optimizer step the global batch holds B queries from B distinct images. For each image a
query and a positive are two different captions of it: of different kinds (short <-> long) whenever
the image has both kinds, as the reference pairs them (``pairing="cross_kind"``); any two
(``"any"``); or two of the same kind (``"same_kind"``: short with short, long with long). The hard
negative is a caption of another
image, of the positive's type, drawn from the image's most similar images (bag-of-words cosine
over its captions) when that is cheap to compute, else from a random image. Queries carry the
instruction of their type; positives and negatives are embedded bare, as the store embeds them.

[IMPORTANT] A step's global batch is a pure function of (seed, step): every process draws the same
global batch and keeps its own slice, so N processes see exactly what one process sees, and a
resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from llm2clip_vlm.data.records import Caption, ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.pooling import mean_pool, resolve_caption_template, tokenize

log = get_logger(__name__)

# Above this many images, similar-image negatives are skipped (the n x n similarity gets costly).
MAX_IMAGES_FOR_SIMILAR = 50_000
NEIGHBOURS = 8
VOCAB = 4096
_WORD = re.compile(r"[a-z0-9]+")
PAIRINGS = ("cross_kind", "any", "same_kind")


@dataclass(frozen=True)
class Triplet:
    """One SimCSE example: a query (with its instruction), its positive and a hard negative."""

    query: str
    instruction: str | None
    positive: str
    negative: str | None


def similar_images(records: Sequence[ImageCaptions], k: int = NEIGHBOURS, chunk: int = 1024) -> np.ndarray:
    """Indices ``[n, k]`` of each image's most similar other images (cosine of word-presence vectors)."""
    words = [set(_WORD.findall(" ".join(c.text for c in r.captions).lower())) for r in records]
    counts = Counter(w for ws in words for w in ws)
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(VOCAB))}
    x = torch.zeros(len(records), len(vocab))
    for row, ws in enumerate(words):
        cols = [vocab[w] for w in ws if w in vocab]
        x[row, cols] = 1.0
    x = torch.nn.functional.normalize(x, dim=1)
    k = min(k, len(records) - 1)
    out = np.empty((len(records), k), dtype=np.int64)
    for start in range(0, len(records), chunk):
        sim = x[start : start + chunk] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -2.0  # never the image itself
        out[start : start + chunk] = sim.topk(k, dim=1).indices.numpy()
    return out


class SimCSEBatches:
    """Deterministic SimCSE global batches over a list of images.

    Args:
        records: training images (images with fewer than two captions are skipped).
        instructions: ``{"short": ..., "long": ...}`` instruction per query caption type.
        seed: the batches are a function of ``(seed, step)``.
        hard_negatives: add one hard negative per query.
        similar_negatives: draw hard negatives from similar images (if the set is small enough).
        neighbours: how many of the most similar images a hard negative is drawn from.
        pairing: ``"cross_kind"`` (short with long when an image has both), ``"any"`` (any two
            captions) or ``"same_kind"`` (two of one kind; the kind a fair coin among the kinds
            the image has two or more of; an image with at most one caption per kind pairs
            across kinds, its only pair).
    """

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        instructions: dict[str, str],
        seed: int = 0,
        hard_negatives: bool = True,
        similar_negatives: bool = True,
        neighbours: int = NEIGHBOURS,
        pairing: str = "cross_kind",
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(map(repr, PAIRINGS))}, not {pairing!r}")
        self.pairing = pairing
        self.records = [r for r in records if len(r.captions) >= 2]
        if len(self.records) < 2:
            raise ValueError(
                f"SimCSE needs at least 2 images with 2+ captions each; got {len(self.records)} of {len(records)}"
            )
        skipped = len(records) - len(self.records)
        if skipped:
            log.warning("SimCSE: skipped %d images with fewer than 2 captions", skipped)
        self.instructions = instructions
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.neighbours: np.ndarray | None = None
        if hard_negatives and similar_negatives and len(self.records) <= MAX_IMAGES_FOR_SIMILAR:
            self.neighbours = similar_images(self.records, k=neighbours)

    def __len__(self) -> int:
        return len(self.records)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one pass over the images (B distinct images per step)."""
        if batch_size > len(self.records):
            raise ValueError(
                f"batch size {batch_size} exceeds the {len(self.records)} usable training images"
            )
        return len(self.records) // batch_size

    def batch(self, step: int, batch_size: int) -> list[Triplet]:
        """The global batch of ``step``: ``batch_size`` triplets from distinct images."""
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, within = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        images = order[within * batch_size : (within + 1) * batch_size]
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        return [self._triplet(int(i), rng) for i in images]

    def _triplet(self, i: int, rng: np.random.Generator) -> Triplet:
        # The reference (microsoft/LLM2CLIP llm_caption_contrastive/dataset/E5_cc3m.py:72-96,
        # :121-124) flips a coin for the query's kind, takes the positive from the other kind and
        # the instruction from the query's kind (E5_EMBEDDING_PROMPTS["cc3m"][rand_num]). With
        # several captions per kind we draw uniformly within a kind. Only an image with a single
        # kind pairs two captions of that kind; ``pairing="any"`` draws any two captions.
        # ``"same_kind"`` departs from it the other way: a pair keeps what two captions of one
        # kind share (a long caption's colours and ground survive, which its short partner would
        # not name), see Stage1Config.pairing.
        captions = self.records[i].captions
        kinds = sorted({c.kind for c in captions})
        if self.pairing == "same_kind":
            pairable = same_kind_pairable(captions)
            if pairable:
                kind = pairable[int(rng.integers(len(pairable)))]
                pool = [c for c in captions if c.kind == kind]
                qi, pi = rng.choice(len(pool), size=2, replace=False)
                query, positive = pool[qi], pool[pi]
            else:  # one short and one long caption: the only pair the image has
                query, positive = captions[0], captions[1]
                if rng.integers(2):
                    query, positive = positive, query
        elif len(kinds) == 2 and self.pairing == "cross_kind":
            q_kind = kinds[int(rng.integers(2))]
            queries = [c for c in captions if c.kind == q_kind]
            positives = [c for c in captions if c.kind != q_kind]
            query = queries[int(rng.integers(len(queries)))]
            positive = positives[int(rng.integers(len(positives)))]
        else:
            qi, pi = rng.choice(len(captions), size=2, replace=False)
            query, positive = captions[qi], captions[pi]
        negative = self._negative(i, positive, rng) if self.hard_negatives else None
        return Triplet(query.text, self.instructions.get(query.kind), positive.text, negative)

    def _negative(self, i: int, positive: Caption, rng: np.random.Generator) -> str:
        for _ in range(8):
            if self.neighbours is not None and rng.random() < 0.9:
                j = int(self.neighbours[i, rng.integers(self.neighbours.shape[1])])
            else:
                j = int(rng.integers(len(self.records) - 1))
                j += j >= i  # any image but i
            same_kind = [c.text for c in self.records[j].captions if c.kind == positive.kind]
            pool = same_kind or [c.text for c in self.records[j].captions]
            text = pool[int(rng.integers(len(pool)))]
            if text != positive.text:  # an identical caption elsewhere is no negative
                return text
        return text


def same_kind_pairable(captions: Sequence[Caption]) -> list[str]:
    """The kinds (sorted) an image has two or more captions of: a ``same_kind`` pair is two
    captions of one of them, the kind a fair coin among them (none: the image pairs across kinds)."""
    kinds = sorted({c.kind for c in captions})
    return [k for k in kinds if sum(c.kind == k for c in captions) >= 2]


def embed_triplets(
    model: nn.Module, tokenizer: Any, triplets: list[Triplet], s: Stage1Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Embed queries (with instructions), positives and negatives, with gradient.

    All sequences of the step are sorted by length and embedded in chunks of ``s.chunk_size``
    (0 = one chunk), each padded to a multiple of ``s.pad_to_multiple_of``: little padding, and
    stable shapes (on a CPU, bf16 steps were erratic without it).
    """
    items: list[tuple[str, str | None]] = [(t.query, t.instruction) for t in triplets]
    items += [(t.positive, None) for t in triplets]
    if triplets[0].negative is not None:
        items += [(t.negative, None) for t in triplets if t.negative is not None]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1] or ""))
    chunk = s.chunk_size or len(items)
    pooled: list[torch.Tensor | None] = [None] * len(items)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        enc = tokenize(
            tokenizer,
            [items[i][0] for i in idx],
            [items[i][1] for i in idx],
            s.max_length,
            s.pad_to_multiple_of,
            resolve_caption_template(s.caption_template, tokenizer),
        )
        hidden = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        emb = mean_pool(hidden.last_hidden_state.float(), enc["embed_mask"].to(device))
        for row, i in enumerate(idx):
            pooled[i] = emb[row]
    stacked = torch.stack(pooled)  # type: ignore[arg-type]
    n = len(triplets)
    negatives = stacked[2 * n :] if len(items) > 2 * n else None
    return stacked[:n], stacked[n : 2 * n], negatives
