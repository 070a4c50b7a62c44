"""MNTP optimizer settings match the reference's HF Trainer defaults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm2clip_vlm.text.config import MNTPConfig
from llm2clip_vlm.text.mntp import mntp_optimizer


def test_mntp_optimizer_is_the_hf_trainer_default() -> None:
    # microsoft/LLM2CLIP llm_caption_contrastive/train_configs/mntp/MetaLlama3_cc3m.json sets no
    # weight_decay / max_grad_norm / lr_scheduler_type, so the HF Trainer defaults apply:
    # 0.0, 1.0, "linear".
    m = MNTPConfig()
    assert (m.weight_decay, m.max_grad_norm, m.lr_schedule) == (0.0, 1.0, "linear")
    p = nn.Parameter(torch.ones(3))
    opt, sched = mntp_optimizer([p], MNTPConfig(lr=1.0, warmup_steps=2, steps=6))
    assert opt.param_groups[0]["weight_decay"] == 0.0
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Warm-up 0, 1/2, then linear decay to 0 at step 6: 1, 3/4, 1/2, 1/4.
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
