"""LoRA on stage 1's decoder: wrap (optionally on a k-bit base), read/write the adapter, merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.imports.encoder import merge_lora as merge_adapter
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.modeling import ModelRef, decoder_of, load_bidirectional

log = get_logger(__name__)


def merge_adapters(model: nn.Module, adapters: Sequence[str]) -> nn.Module:
    """Merge PEFT LoRA adapter directories into ``model`` in order, as the reference's
    ``extra_model_name_or_path`` (llm_caption_contrastive/run_mntp.py:720-728,
    llm2vec_wrapper.py:70-91); an adapter of the bare decoder also merges into a ``*ForCausalLM``."""
    for adapter in adapters:
        n = merge_adapter(model, adapter_dir(adapter))
        log.info("stage 1: merged %d LoRA modules of %s into the base", n, adapter)
    return model


def adapter_dir(name: str) -> Path:
    """A local adapter directory, or a hub id (``owner/name``) fetched to the hub cache (the adapter
    files only: ``adapter_config.json``, ``adapter_model.safetensors``)."""
    path = Path(name)
    if path.is_dir():
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"stage1.adapters: {name} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
        )
    except Exception as e:  # offline, unknown repo, gated: one line naming the adapter
        raise FileNotFoundError(
            f"stage1.adapters: {name} is neither a directory nor a reachable hub repo ({e})"
        ) from e


def wrap_lora(decoder: nn.Module, s: Stage1Config) -> nn.Module:
    """``decoder`` with LoRA adapters on ``s.lora.target_modules`` (the base frozen)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # non-reentrant: works with DDP and several forwards per step
    if s.lora.quantization != "none":
        # Checkpointing is switched on below for both bases: peft's own switch calls transformers'
        # deprecated gradient_checkpointing_enable (a FutureWarning on every QLoRA run).
        decoder = prepare_model_for_kbit_training(decoder, use_gradient_checkpointing=False)
    if s.gradient_checkpointing:
        decoder.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    lora = LoraConfig(
        r=s.lora.r,
        lora_alpha=s.lora.alpha,
        lora_dropout=s.lora.dropout,
        target_modules=lora_targets(decoder, s.lora.target_modules, s.lora.top_layers),
    )
    model = get_peft_model(decoder, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d on %s%s: %d trainable of %d parameters (base frozen)",
        s.lora.r,
        s.lora.target_modules,
        f" of the last {s.lora.top_layers} layers" if s.lora.top_layers > 0 else "",
        n_train,
        n_all,
    )
    return model


def lora_targets(decoder: nn.Module, targets: Sequence[str], top_layers: int) -> list[str]:
    """The LoRA target modules: ``targets`` by name, or (``top_layers`` > 0) the full names of
    those modules in the last ``top_layers`` decoder layers, so the backward pass stops below them
    (peft matches names by suffix, and its ``layers_to_transform`` does not find the layers of a
    bare decoder)."""
    n = int(decoder.config.num_hidden_layers)
    if top_layers >= n:
        # A recipe written for a deep LLM (the demo's 8 of 30) used on a shallower one (a test
        # model, another --set stage1.model): every layer is among "the last N".
        log.info("stage1.lora.top_layers=%d >= the model's %d layers: LoRA on every layer", top_layers, n)
    if top_layers <= 0 or top_layers >= n:
        return list(targets)
    keep = {str(i) for i in range(n - top_layers, n)}
    names = []
    for name, _ in decoder.named_modules():
        parts = name.split(".")
        # ...layers.<i>.<block>.<target>, e.g. layers.29.self_attn.q_proj
        if parts[-1] in targets and "layers" in parts and parts[parts.index("layers") + 1] in keep:
            names.append(name)
    if not names:
        raise ValueError(f"stage1.lora.top_layers={top_layers}: no {list(targets)} found in the last layers")
    return names


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter's tensors (CPU), what a stage-1 checkpoint stores."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: no LoRA targets the embeddings and the vocabulary is unchanged;
    # "auto" would look for the base's config.json (absent for GGUF bases) and warn on every save.
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().cpu() for k, v in state.items()}


def load_adapter(peft_model: nn.Module, weights: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, weights)


def merge_lora(peft_model: nn.Module, ref: ModelRef, s: Stage1Config, weight_dtype: torch.dtype) -> nn.Module:
    """Merge the LoRA into a full-precision base (a quantized base is reloaded unquantized first)."""
    if s.lora.quantization != "none":
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        base = decoder_of(
            load_bidirectional(ref, attn_implementation=s.attn_implementation, dtype=weight_dtype)
        )
        peft_model = wrap_lora(base, s)
        set_peft_model_state_dict(peft_model, adapter)
    merged = peft_model.merge_and_unload()
    merged.eval()
    if getattr(merged, "is_activation_checkpointing", False):
        merged.activation_checkpointing_disable()
    return merged
