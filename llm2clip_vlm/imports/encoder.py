"""Import a released stage-1 LLM (llm2vec layout) as our ``CaptionEncoder`` directory.

Two layouts, both read as JSON + safetensors only:

- **merged**: ``config.json`` + ``model.safetensors`` (or shards) + tokenizer, as
  ``microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`` ships it (upstream loaded with
  ``trust_remote_code`` through an ``auto_map`` to ``modeling_bidirectional_llama_encoder.py``, a
  ``LlamaModel`` without the causal mask). Tensors are named like the bare decoder
  (``layers.0.self_attn.q_proj.weight``) or with a ``model.`` prefix (a ``*ForCausalLM`` save);
  ``lm_head.weight`` is not used by an embedder and is dropped.
- **base + adapters**: a base model directory and PEFT LoRA adapter directories
  (``adapter_config.json`` + ``adapter_model.safetensors``), merged in the given order, as
  llm2vec's ``from_pretrained`` merges ``McGill-NLP/LLM2Vec-*-mntp`` then ``-supervised``
  (microsoft/LLM2CLIP ``llm_caption_contrastive/llm2vec_wrapper.py:60-95``,
  ``train_configs/mntp/MetaLlama3_cc3m.json``: ``extra_model_name_or_path``).

The LoRA merge is done here, tensor by tensor (``W += B @ A * alpha / r``, as peft's
``merge_and_unload``), so an adapter tensor that matches no module is refused by name instead of
being skipped with a warning.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.imports.checkpoint import ImportRefused, load_tensors, read_json, safetensors_files
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, load_tokenizer
from llm2clip_vlm.text.pooling import resolve_caption_template

log = get_logger(__name__)

_DROP_CONFIG = ("auto_map", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
_LORA = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _decoder(src: Path) -> nn.Module:
    """The bare decoder stack (bidirectional) with the tensors of ``src``."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_file = src / "config.json"
    raw = read_json(cfg_file)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ImportRefused(f"{cfg_file}: model_type {model_type!r} is not a transformers architecture")
    settings = {k: v for k, v in raw.items() if k not in _DROP_CONFIG and k != "model_type"}
    config = AutoConfig.for_model(model_type, **settings)
    config.is_causal = False  # llm2vec's bidirectional encoder (see llm2clip_vlm.text.modeling)
    files = safetensors_files(src)
    state = load_tensors(files)
    where = files[0] if len(files) == 1 else src
    state.pop("lm_head.weight", None)
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    model = AutoModel.from_config(config, dtype=next(iter(state.values())).dtype if state else torch.float32)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ImportRefused(
            f"{where}: tensor {unexpected[0]!r} has no place in a {type(model).__name__} ({len(unexpected)} unknown)"
        )
    # Tied / derived buffers (e.g. rotary inv_freq) are rebuilt from the config; weights are not.
    missing_params = [k for k in missing if k in dict(model.named_parameters())]
    if missing_params:
        raise ImportRefused(
            f"{where}: tensor {missing_params[0]!r} is missing ({len(missing_params)} missing)"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ImportRefused(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return model.eval()


def merge_lora(model: nn.Module, adapter_dir: Path) -> int:
    """Merge one PEFT LoRA adapter into ``model`` in place; returns the number of merged modules."""
    cfg_file = adapter_dir / "adapter_config.json"
    cfg = read_json(cfg_file)
    if cfg.get("peft_type") != "LORA":
        raise ImportRefused(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are merged")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise ImportRefused(f"{cfg_file}: {unsupported}=true is not supported")
    if cfg.get("modules_to_save"):
        raise ImportRefused(f"{cfg_file}: modules_to_save {cfg['modules_to_save']!r} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ImportRefused(f"{cfg_file}: per-module rank/alpha patterns are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    files = safetensors_files(adapter_dir, stem="adapter_model")
    tensors = load_tensors(files)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    modules = dict(model.named_modules())
    for name, t in tensors.items():
        m = _LORA.match(name)
        if not m:
            raise ImportRefused(f"{files[0]}: tensor {name!r} is not a LoRA A/B weight")
        module = m["module"]
        if module.startswith("model.") and module not in modules:
            module = module[len("model.") :]  # an adapter trained on a *ForCausalLM
        elif module not in modules and f"model.{module}" in modules:
            module = f"model.{module}"  # an adapter of the bare decoder, merged into a *ForCausalLM
        pairs.setdefault(module, {})[m["ab"]] = t
    with torch.no_grad():
        for module, ab in sorted(pairs.items()):
            target = modules.get(module)
            if not isinstance(target, nn.Linear):
                raise ImportRefused(
                    f"{files[0]}: LoRA for {module!r}, which is not a Linear of the base model"
                )
            if set(ab) != {"A", "B"}:
                raise ImportRefused(f"{files[0]}: LoRA for {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
            a, b = ab["A"].float(), ab["B"].float()
            if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
                raise ImportRefused(
                    f"{files[0]}: LoRA for {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"expected ({r}, {target.in_features}) and ({target.out_features}, {r})"
                )
            w = target.weight
            w.copy_((w.float() + (b @ a) * scaling).to(w.dtype))
    return len(pairs)


def import_encoder(
    src: str | Path,
    out: str | Path,
    adapters: list[str | Path] | None = None,
    caption_template: str = "auto",
    max_length: int = 512,
) -> dict[str, Any]:
    """Convert a released llm2vec-style LLM into a ``CaptionEncoder`` directory at ``out``.

    Args:
        src: merged checkpoint directory, or the base model when ``adapters`` are given (its
            tokenizer is used either way).
        out: the encoder directory to write.
        adapters: PEFT LoRA directories merged onto ``src`` in order.
        caption_template: ``auto``/``none``/a ``{text}`` template (see ``Stage1Config``); ``auto``
            gives Llama-3 Instruct models the reference's chat header.
        max_length: token limit (the reference embeds with 512).

    Returns:
        ``{"path", "identity", "hidden_size", "caption_template", "adapters"}``.
    """
    src, out = Path(src), Path(out)
    l2v = src / "llm2vec_config.json"
    if l2v.is_file():
        pooling = read_json(l2v).get("pooling_mode", "mean")
        if pooling != "mean":
            raise ImportRefused(f"{l2v}: pooling_mode {pooling!r}; LLM2CLIP embeds with mean pooling")
    model = _decoder(src)
    merged = []
    for adapter in adapters or []:
        n = merge_lora(model, Path(adapter))
        merged.append({"path": str(adapter), "modules": n})
        log.info("merged %d LoRA modules from %s", n, adapter)
    try:
        tokenizer = load_tokenizer(ModelRef(str(src)))
    except (OSError, ValueError) as e:
        raise ImportRefused(f"{src}: no usable tokenizer ({e})") from e
    s = Stage1Config()
    template = resolve_caption_template(caption_template, tokenizer)
    encoder = CaptionEncoder(
        model,
        tokenizer,
        max_length,
        {"short_query": s.instruction_short_query, "long_query": s.instruction_long_query},
        caption_template=template,
    )
    encoder.save_pretrained(out)
    log.info(
        "caption encoder %s (identity %s, captions wrapped as %r)", out, encoder.identity()[:12], template
    )
    return {
        "path": str(out),
        "identity": encoder.identity(),
        "hidden_size": encoder.hidden_size,
        "caption_template": template,
        "adapters": merged,
    }
