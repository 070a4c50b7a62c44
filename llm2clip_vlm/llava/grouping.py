"""LLaVA-1.5's length-grouped batches (``group_by_length``), step by step as LLaVA cuts them.

LLaVA's ``LengthGroupedSampler`` (haotian-liu/LLaVA ``llava/train/llava_trainer.py``) orders the
records so that every "megabatch" of ``world x accumulation x micro`` records (one optimizer step)
holds records of one modality (image / text-only, the sign of ``modality_lengths``) and similar
length (words of the conversation), split into per-device chunks of balanced total length; the HF
Trainer's dataloader then hands the k-th chunk of a megabatch to process ``k % world`` as its
micro batch ``k // world``. :class:`LengthGroupedBatchSampler` computes that order with the same
draws (``torch.randperm`` on the global generator, seeded here with ``seed + epoch`` so the order
is a function of (seed, epoch) alone and a resumed run continues it), cuts it into global batches
and gives each process its chunks in micro-batch order: our step's micro batches are LLaVA's.
``tests/test_llava_reference.py`` checks the order against a copy of LLaVA's functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

LLAVA_IMAGE_TOKENS = 128  # LLaVA's `lengths` counts an image as 128 words (train.py:676-681)


def modality_lengths(words: Sequence[int], has_image: Sequence[bool]) -> list[int]:
    """LLaVA's ``modality_lengths``: the conversation's word count, negative for text-only records."""
    return [w if img else -w for w, img in zip(words, has_image, strict=True)]


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """``num_chunks`` chunks of equal size and balanced total length (longest first, greedily)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals: list[float] = [0 for _ in range(num_chunks)]
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int) -> list[int]:
    """A random order, sorted by length (longest first) within megabatches of ``world_size x
    batch_size``, each split into even chunks; draws from torch's global generator."""
    indices = torch.randperm(len(lengths))
    mega = world_size * batch_size
    megabatches = [indices[i : i + mega].tolist() for i in range(0, len(lengths), mega)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    chunked = [split_to_even_chunks(m, lengths, world_size) for m in megabatches]
    return [i for m in chunked for chunk in m for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int) -> list[int]:
    """Image and text-only records length-grouped apart, their megabatches shuffled together; the
    last megabatch of each modality goes last, together (sorted by index)."""
    if any(length == 0 for length in lengths):
        raise ValueError("a LLaVA record with no words cannot be length-grouped (LLaVA asserts this too)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size)
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    mm_order = [mm[i][0] for i in length_grouped_indices([n for _, n in mm], batch_size, world_size)]
    lang_order = [lang[i][0] for i in length_grouped_indices([n for _, n in lang], batch_size, world_size)]
    mega = world_size * batch_size
    mm_mega = [mm_order[i : i + mega] for i in range(0, len(mm_order), mega)]
    lang_mega = [lang_order[i : i + mega] for i in range(0, len(lang_order), mega)]
    additional = mm_mega[-1] + lang_mega[-1]
    megabatches = mm_mega[:-1] + lang_mega[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches))]
    if additional:
        megabatches.append(sorted(additional))
    return [i for m in megabatches for i in m]


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's slice of global batch ``step`` for ``step in [start, total)``.

    A subclass sets ``start``, ``total``, ``rank``, ``world`` and ``steps_per_epoch`` and draws an
    epoch's global batches in ``epoch_batches(epoch)`` (a function of the seed and the epoch only,
    so a resumed run continues the exact sequence for any process count).
    """

    start: int
    total: int
    rank: int
    world: int
    steps_per_epoch: int

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        cached, batches = -1, []
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != cached:
                batches, cached = self.epoch_batches(epoch), epoch
            batch = batches[k]
            local = len(batch) // self.world
            yield batch[self.rank * local : (self.rank + 1) * local]


class LengthGroupedBatchSampler(StepBatchSampler):
    """This process's part of global batch ``step`` in LLaVA's length-grouped order.

    Args:
        lengths: ``modality_lengths`` (``group_by_modality``) or plain lengths per record.
        global_batch, micro_batch: records per optimizer step, and per process and micro batch.
        rank, world: this process and the process count.
        seed: the order of epoch ``e`` is drawn with torch's generator seeded ``seed + e``.
        start_step, total_steps: the steps to yield.
        group_by_modality: LLaVA's ``group_by_modality_length`` (else length only).
        full_batches_only: drop a last global batch smaller than ``global_batch`` (DeepSpeed).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        start_step: int,
        total_steps: int,
        group_by_modality: bool = True,
        full_batches_only: bool = False,
    ) -> None:
        if global_batch % (world * micro_batch):
            raise ValueError(
                f"group_by_length: batch_size {global_batch} must be a multiple of micro_batch_size "
                f"{micro_batch} x {world} processes (LLaVA's megabatch)"
            )
        self.lengths = list(lengths)
        self.batch, self.micro, self.rank, self.world = global_batch, micro_batch, rank, world
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.group, self.full_only = group_by_modality, full_batches_only
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.lengths)} records make no batch of {global_batch}")

    def order(self, epoch: int) -> list[int]:
        """LLaVA's flat record order of ``epoch`` (device chunks of ``micro_batch``, in turn)."""
        chunks = self.batch // self.micro  # LLaVA's world_size x gradient_accumulation_steps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + epoch)
            if self.group:
                return modality_length_grouped_indices(self.lengths, self.micro, chunks)
            return length_grouped_indices([abs(n) for n in self.lengths], self.micro, chunks)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches of ``epoch``, each ordered so that process r's contiguous slice is its
        micro batches in turn: chunk ``j * world + r`` of the megabatch is r's micro batch j."""
        flat = self.order(epoch)
        out = []
        for s in range(0, len(flat), self.batch):
            batch = flat[s : s + self.batch]
            if len(batch) == self.batch:
                per_rank = self.batch // self.world
                micro = [
                    batch[c * self.micro : (c + 1) * self.micro] for c in range(self.batch // self.micro)
                ]
                out.append(
                    [i for r in range(self.world) for c in micro[r :: self.world] for i in c][
                        : per_rank * self.world
                    ]
                )
            elif not self.full_only and len(batch) >= self.world:
                out.append(batch[: len(batch) // self.world * self.world])
        return out
