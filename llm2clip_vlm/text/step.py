"""One stage-1 SimCSE step: embed this rank's triplets, the supervised SimCSE loss, backward.

:class:`SimCSEStep` is what the trainer (:mod:`llm2clip_vlm.text.train`) hands the one loop as
``Stage.step``, and what ``bench stage1`` times: a change here moves both.

Each rank embeds ``batch_size / world`` queries of the step's global batch; the loss gathers
positives and hard negatives from all ranks with gradient (:class:`SupervisedSimCSELoss`), and
each rank's loss is the mean over its rows, so their mean is the global-batch loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.simcse import Triplet, embed_triplets
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.loop import StepOutput, TrainState
from llm2clip_vlm.training.losses import SupervisedSimCSELoss


class SimCSEStep:
    """``step(triplets)`` for the loop.

    Args:
        accelerator: the run's accelerator (autocast, backward, the loss reduced over ranks).
        model: the prepared LoRA-wrapped decoder.
        tokenizer: the LLM's tokenizer.
        s: the ``stage1`` section (lengths, chunks, pooling, the loss scale).
        scheduler: for the lr shown in the progress line.
        state: the run's state (the step whose tokens a tracker counts); None in a benchmark.
        count_tokens: ``count_tokens(step)``: tokens of that step's global batch, counted only when
            the tracker logs the step; None = not reported.
    """

    def __init__(
        self,
        accelerator: Any,
        model: Any,
        tokenizer: Any,
        s: Stage1Config,
        scheduler: Any,
        state: TrainState | None = None,
        count_tokens: Callable[[int], int] | None = None,
    ) -> None:
        self.accelerator, self.model, self.tokenizer, self.s = accelerator, model, tokenizer, s
        self.scheduler, self.state, self.count_tokens = scheduler, state, count_tokens
        self.loss_fn = SupervisedSimCSELoss(scale=s.scale)

    def __call__(self, triplets: list[Triplet]) -> StepOutput:
        acc = self.accelerator
        k = self.state.step if self.state is not None else 0
        with acc.autocast():
            q, p, n = embed_triplets(self.model, self.tokenizer, triplets, self.s, acc.device)
        loss = self.loss_fn(q, p, n)
        acc.backward(loss)
        metrics: dict[str, Any] = {}
        if self.count_tokens is not None:
            count = self.count_tokens
            metrics["tokens"] = lambda: count(k)
        return StepOutput(
            round(dist.reduce_float(acc, loss), 6), f"lr {self.scheduler.get_last_lr()[0]:.2e}", metrics
        )


def step_token_count(tokenizer: Any, triplets: list[Triplet], max_length: int) -> int:
    """Tokens the step embedded over all processes (queries with instructions, positives, negatives)."""
    texts = [(t.instruction or "") + t.query for t in triplets] + [t.positive for t in triplets]
    texts += [t.negative for t in triplets if t.negative is not None]
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])
