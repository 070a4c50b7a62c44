"""One LLaVA optimizer step: micro batches, gradient accumulation, DDP or DeepSpeed, token-mean loss.

[IMPORTANT] By default (``loss_mean: tokens``) the loss of a step is the mean over every
supervised token of the *global* batch: each micro batch adds ``sum of its token losses / global
token count``, times the number of processes because DDP averages gradients. So the loss and the
update do not depend on the micro-batch size or the process count (a 2-process test pins it).
``loss_mean: micro_batch`` is LLaVA-1.5's (the HF Trainer's): each micro batch's own token mean
(the model's ``labels`` loss), divided by the accumulation steps, and averaged over processes by
DDP: a long answer then weighs less than in the token mean.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from llm2clip_vlm.llava.config import LlavaPhaseConfig
from llm2clip_vlm.llava.data import Batch
from llm2clip_vlm.llava.templates import IGNORE_INDEX
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.loop import StepOutput


def shared_prefix_length(batch: Batch, image_token_id: int) -> int:
    """How many leading tokens every row of ``batch`` has in common, before any image token (the
    BOS, the system prompt and ``USER:`` of a vicuna_v1 batch; 0 for a single row)."""
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & mask.all(0) & (ids[0] != image_token_id)
    return int(same.int().cumprod(0).sum())


@functools.cache
def _cache_kwarg() -> str:
    """transformers' name of the KV-cache argument (``cache`` from 5.2x, ``past_key_values`` before);
    read once, not on every micro batch."""
    from transformers import LlavaForConditionalGeneration

    params = inspect.signature(LlavaForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def token_loss_sum(
    model: Any, batch: Batch, device: torch.device, prefix: int = 0, head: torch.nn.Module | None = None
) -> torch.Tensor:
    """Sum of next-token cross-entropies over the supervised tokens of a micro batch.

    Only positions that predict a supervised token in some row go through the LM head
    (``logits_to_keep``): image tokens, prompts and padding never need the vocabulary-wide logits,
    which are the largest activation of a step (``[B, T, vocab]``). The loss is unchanged.

    ``prefix`` (:func:`shared_prefix_length`): the first ``prefix`` tokens are the same in every
    row, so the LLM reads them once, as one row, and the rows continue from its KV cache
    (repeated over the batch; its gradient is the rows' sum, as when every row computed it). In a
    causal LM the prefix's states do not depend on what follows, so the loss and the gradients are
    the full batch's (up to float rounding): the system prompt of a vicuna_v1 batch (~30 tokens a
    row) is computed once per micro batch instead of once per row. Positions that predict a
    supervised token are never in the prefix (it is cut before the first).

    ``head`` (the model's LM head module): only the (row, position) pairs with a target go
    through it, not every row at every kept position (the demo's batches of 8: ~300 kept
    (row, position) pairs a step for ~64 targets): a pre-hook gathers them from the head's input.
    The other pairs' logits only ever met ``ignore_index``, so the loss and gradients are the same.
    """
    targets = batch.labels[:, 1:]
    # Position p predicts token p + 1; keep the positions where any row has a target.
    keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing supervised (all truncated away): a zero loss still in the graph
        keep = torch.zeros(1, dtype=torch.long)
    prefix = min(prefix, int(keep.min()))
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    kwargs: dict[str, Any] = {"attention_mask": mask}
    if prefix >= 2:
        first = model(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True,
                     logits_to_keep=1)  # fmt: skip
        cache = getattr(first, "cache", None) or first.past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        kwargs[_cache_kwarg()] = cache
        ids, keep_at = ids[:, prefix:], keep - prefix
    else:
        keep_at = keep
    kwargs.update(input_ids=ids, logits_to_keep=keep_at.to(device))
    if batch.pixel_values is not None:
        kwargs["pixel_values"] = batch.pixel_values.to(device)
    labels = targets[:, keep].to(device)  # [B, len(keep)]
    hook = None
    pairs = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    if head is not None and pairs[0].numel():

        def supervised_only(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0][pairs].unsqueeze(0), *args[1:])  # [B, len(keep), D] -> [1, n, D]

        hook = head.register_forward_pre_hook(supervised_only)
        labels = labels[pairs].unsqueeze(0)
    try:
        logits = model(**kwargs).logits  # [B, len(keep), vocab], or [1, n, vocab] with the head's hook
    finally:
        if hook is not None:
            hook.remove()
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def setup_deepspeed(accelerator: Any, p: LlavaPhaseConfig, phase: str) -> bool:
    """Fill the DeepSpeed config from the phase (micro batch, accumulation, clipping); False if
    DeepSpeed is not in use.

    DeepSpeed needs a fixed number of micro batches per step, so ``batch_size`` must split into
    ``micro_batch_size`` x processes x an integer; a non-finite step cannot be skipped there (the
    update happens inside ``backward``), only stopped.
    """
    if not dist.uses(accelerator, "DEEPSPEED"):
        return False
    local = p.batch_size // accelerator.num_processes
    if local % p.micro_batch_size:
        raise ValueError(
            f"llava.{phase}: under DeepSpeed batch_size/processes ({local}) must be a multiple of "
            f"micro_batch_size ({p.micro_batch_size})"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = p.micro_batch_size
    ds["gradient_accumulation_steps"] = local // p.micro_batch_size
    ds["train_batch_size"] = p.batch_size
    ds["gradient_clipping"] = p.loop.grad_clip if p.loop.grad_clip > 0 else 0.0
    return True


class LlavaStep:
    """``step(batch)`` for the loop: the global batch's token-mean loss, accumulated over micro
    batches; under DeepSpeed the engine accumulates, clips and updates inside ``backward``."""

    def __init__(
        self, accelerator: Any, model: Any, micro_batch_size: int, deepspeed: bool, counts: dict[str, Any],
        loss_mean: str = "tokens", fsdp2: bool = False, *, sort_micro_batches: bool = False,
        share_prefix_before: int | None = None, head: torch.nn.Module | None = None,
        image_weights: list[torch.nn.Parameter] | None = None, ddp: bool = False,
    ) -> None:  # fmt: skip
        """``sort_micro_batches``: cut the micro batches from the batch sorted by length (token mean
        only: there the grouping does not change the loss); ``share_prefix_before``: the image token
        id to compute each micro batch's common prefix once (:func:`token_loss_sum`; one process,
        no DeepSpeed / FSDP2, no gradient checkpointing: the caller checks that), None = off;
        ``head``: the LM head, to feed it only the supervised (row, position) pairs;
        ``image_weights``: the trainable weights only an image reaches (the projector): a step
        without any image leaves them a zero gradient, not None, in every set-up (``ddp``: backed
        by a zero in the loss of a micro batch without images, for DDP's reducer)."""
        if loss_mean not in ("tokens", "micro_batch"):
            raise ValueError(f"loss_mean must be 'tokens' or 'micro_batch', not {loss_mean!r}")
        self.accelerator, self.model = accelerator, model
        self.micro, self.deepspeed, self.fsdp2 = micro_batch_size, deepspeed, fsdp2
        self.per_micro = loss_mean == "micro_batch"
        self.sort = sort_micro_batches and not self.per_micro
        self.prefix_stop, self.head = share_prefix_before, head
        self.image_weights, self.ddp = list(image_weights or []), ddp
        # Truncated / dropped samples so far: the run's state (checkpointed with it).
        self.counts = counts
        counts.setdefault("truncated", 0)
        counts.setdefault("dropped", 0)

    def __call__(self, batch: Batch) -> StepOutput:
        acc, world = self.accelerator, self.accelerator.num_processes
        self.counts["truncated"] += batch.truncated
        self.counts["dropped"] += batch.dropped
        # Supervised tokens of the whole global batch: the loss's denominator (module docstring);
        # and all input tokens, for the tokens/s a tracker logs.
        counts = [batch.num_supervised, int(batch.attention_mask.sum())]
        n_tokens = acc.reduce(torch.tensor(counts, device=acc.device), "sum")
        denom = max(1.0, float(n_tokens[0].item()))
        step_loss = torch.zeros((), device=acc.device)
        micro = (batch.by_length() if self.sort else batch).split(self.micro) if len(batch) else []
        for k, mb in enumerate(micro):
            sync = k == len(micro) - 1
            if self.deepspeed:
                # DeepSpeed accumulates itself and steps at the boundary we mark; it divides the
                # loss by its accumulation count, which the scale below undoes.
                acc.sync_gradients = sync
                scale = world * acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
                ctx: Any = nullcontext()
            elif self.fsdp2:
                scale = world  # FSDP2 averages gradients over processes too
                # Reduce-scatter only after the last micro batch (FSDP2's no_sync).
                self.model.set_requires_gradient_sync(sync)
                ctx = nullcontext()
            else:
                scale = world  # DDP averages gradients over processes
                ctx = acc.no_sync(self.model) if not sync and world > 1 else nullcontext()
            prefix = 0 if self.prefix_stop is None else shared_prefix_length(mb, self.prefix_stop)
            with ctx, acc.autocast():
                if self.per_micro:  # this micro batch's mean, a 1/len(micro) share of the rank's loss
                    loss = (
                        token_loss_sum(self.model, mb, acc.device, prefix, self.head)
                        / max(1, mb.num_supervised)
                        / len(micro)
                    )
                    # DeepSpeed divides by its accumulation count (= len(micro)) itself.
                    scale = len(micro) if self.deepspeed else 1
                else:
                    loss = token_loss_sum(self.model, mb, acc.device, prefix, self.head) / denom
            if mb.pixel_values is None and self.ddp and self.image_weights:
                # Text-only rows never run the projector. DDP wants a gradient for every trainable
                # weight from every rank (its reducer fails in the next forward otherwise: a rank
                # whose micro batch held only text-only rows), so a zero backs the projector.
                loss = loss + sum(0.0 * t.sum() for t in self.image_weights)
            if not loss.requires_grad:
                # Only text-only rows while only the projector trains (sorting by length can group
                # them): nothing trainable was used. A zero on the trainable weights keeps backward
                # (and DDP's gradient hooks) the same on every micro batch and rank.
                loss = loss + sum(0.0 * t.sum() for t in self.model.parameters() if t.requires_grad)
            acc.backward(loss * scale)
            step_loss += loss.detach()
        for t in self.image_weights:
            # A step of text-only rows: a zero gradient, as DDP (above) and DeepSpeed (LLaVA's
            # set-up) give it, so AdamW treats the projector the same in one process, DDP and
            # FSDP2 (with None it would skip it; with a zero it moves it by its momentum).
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        # Token mean: the ranks' shares add up to the global loss; micro-batch mean: DDP's average.
        total = dist.reduce_float(acc, step_loss, "mean" if self.per_micro else "sum")
        return StepOutput(total, metrics={"tokens": int(n_tokens[1].item())})
