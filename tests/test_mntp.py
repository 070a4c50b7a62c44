"""MNTP optimizer settings match the reference's HF Trainer defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.mntp import mntp_loop
from llm2clip_vlm.training.optim import adamw, make_scheduler


def test_mntp_optimizer_is_the_hf_trainer_default() -> None:
    # microsoft/LLM2CLIP llm_caption_contrastive/train_configs/mntp/MetaLlama3_cc3m.json sets no
    # weight_decay / max_grad_norm / lr_scheduler_type, so the HF Trainer defaults apply:
    # 0.0, 1.0, "linear".
    s = RunConfig().stage1
    m = s.mntp
    assert (m.weight_decay, m.loop.grad_clip, m.loop.schedule) == (0.0, 1.0, "linear")
    s.mntp.lr, s.mntp.loop.warmup_steps, s.mntp.loop.max_steps = 1.0, 2, 6
    loop = mntp_loop(s)
    assert (loop.max_steps, loop.grad_clip, loop.max_seconds) == (6, 1.0, 0.0)
    assert (loop.precision, loop.distributed) == (s.loop.precision, s.loop.distributed)  # one accelerator
    p = nn.Parameter(torch.ones(3))
    opt = adamw([p], m.lr, torch.device("cpu"), weight_decay=m.weight_decay, fused=None)
    sched = make_scheduler(opt, loop, loop.max_steps)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Warm-up 0, 1/2 (transformers' step / warmup), then linear decay to 0 at step 6: 1, 3/4, 1/2, 1/4.
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_mntp_has_no_time_budget() -> None:
    s = RunConfig().stage1
    s.mntp.loop.max_seconds = 60.0
    with pytest.raises(ValueError, match="stage1.mntp.loop.max_seconds must be 0"):
        mntp_loop(s)
