"""Assemble a transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5) from a tower and a causal LM.

transformers' LLaVA is exactly LLaVA-1.5's architecture: vision tower -> hidden state of
``vision_feature_layer`` (-2) -> patch tokens (``"default"`` drops CLS) -> projector
Linear-GELU-Linear (``mlp2x_gelu``) -> the LLM, with one ``<image>`` token in the text expanded
to ``image_seq_length`` feature positions. A model built here and saved with ``save_pretrained``
loads in unmodified transformers, lmms-eval and serving engines.

The tower and the LLM keep their pretrained weights (the modules are moved in, not copied); the
projector is freshly initialised, for projector pretraining to train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.modeling import quantization_config, resolve_model_ref
from llm2clip_vlm.tower.formats import (
    TowerFormat,
    detect_tower_format,
    load_tower_model,
    resolve_tower_path,
)
from llm2clip_vlm.weights import check_llm_folder, from_pretrained_kwargs, loading, require_safetensors

log = get_logger(__name__)

PROJECTORS = ("mlp2x_gelu",)
SELECT_STRATEGIES = ("default", "full")


def resolve_select_strategy(fmt: TowerFormat, select_strategy: str, has_cls: bool) -> str:
    """transformers' strategy for LLaVA-1.5's "patch tokens" on this backbone.

    ``"default"`` drops the first token, which is the CLS token of a CLIP tower; a tower without
    CLS (SigLIP) has only patch tokens, so its patch tokens are ``"full"``.

    Raises:
        ValueError: unknown strategy.
    """
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"select_strategy must be one of {', '.join(SELECT_STRATEGIES)}, got {select_strategy!r}"
        )
    if select_strategy == "default" and not has_cls:
        log.info(
            "%s tower has no CLS token: using vision_feature_select_strategy='full' (all patch tokens)",
            fmt.name,
        )
        return "full"
    return select_strategy


def check_feature_layer(vision_config: Any, vision_feature_layer: int) -> None:
    """Raise ValueError when ``vision_feature_layer`` names no hidden state of the tower."""
    n_states = vision_config.num_hidden_layers + 1
    if not -n_states <= vision_feature_layer < n_states:
        raise ValueError(
            f"vision_feature_layer {vision_feature_layer} out of range for {vision_config.num_hidden_layers} layers"
        )


def build_llava_model(
    tower_dir: str | Path,
    llm_name_or_path: str | Path,
    *,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    select_strategy: str = "default",
    dtype: torch.dtype | None = None,
    image_token: str = "<image>",
    quantization: str = "none",
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """A LLaVA-1.5 model and its processor from an exported tower and a causal LM.

    Args:
        tower_dir: an exported tower (a local directory, optionally ``llm2clip:``-prefixed) in a
            transformers format (CLIP, SigLIP).
        llm_name_or_path: a causal LM, loaded with ``AutoModelForCausalLM``: a directory, hub id,
            ``.gguf`` file or ``builtin:`` name (:func:`llm2clip_vlm.text.modeling.resolve_model_ref`).
        projector: only ``"mlp2x_gelu"`` (Linear-GELU-Linear), LLaVA-1.5's projector.
        vision_feature_layer: hidden state fed to the projector (LLaVA-1.5: -2).
        select_strategy: ``"default"`` = patch tokens (CLS dropped; on a tower without CLS, all
            tokens, saved as ``"full"``); ``"full"`` = every token.
        dtype: dtype of the whole model (default: as loaded).
        image_token: the placeholder added to the tokenizer as a special token.
        quantization: ``none``, ``4bit`` (QLoRA) or ``8bit``: the LLM's linear layers through
            bitsandbytes; the tower and the projector stay in ``dtype``.
        allow_pickle: accept an LLM whose weights exist only as pickles (``pytorch_model.bin``);
            refused by default (``reliability.allow_pickle_weights``). Repository code never runs.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)``, ready for ``save_pretrained``.

    Raises:
        ValueError: unknown projector/strategy, a layer out of range, or a tower that is not a
            transformers model (e.g. timm-backed).
    """
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, LlavaProcessor

    if projector not in PROJECTORS:
        raise ValueError(
            f"projector {projector!r} is not supported by transformers' LLaVA; use one of {', '.join(PROJECTORS)}"
        )
    path = resolve_tower_path(str(tower_dir))
    fmt = detect_tower_format(path)
    if fmt.name not in ("clip", "siglip"):
        raise ValueError(
            f"{path}: a {fmt.name} tower is not a transformers vision model; LlavaForConditionalGeneration "
            "needs a CLIP or SigLIP tower (use LLM2CLIPVisionTower in the LLaVA codebase instead)"
        )
    vision = load_tower_model(path, fmt)
    check_feature_layer(vision.config, vision_feature_layer)  # before the (large) LLM loads
    # transformers' LLaVA knows one prefix token at most (CLIP's CLS): "default" drops exactly one.
    has_cls = fmt.num_prefix_tokens(vision.config) == 1
    strategy = resolve_select_strategy(fmt, select_strategy, has_cls)

    ref = resolve_model_ref(str(llm_name_or_path))
    if not ref.gguf_file:
        check_llm_folder(ref.path, allow_pickle)
    with loading(ref.path, "LLM"):
        tokenizer = AutoTokenizer.from_pretrained(ref.path, **ref.kwargs())
    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        # Batched generation and training need a pad token; LLaVA-1.5 pads with unk/eos too.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    lm_kwargs: dict[str, Any] = dict(ref.kwargs(), dtype=dtype or "auto")
    if not ref.gguf_file:  # a GGUF file is no pickle; transformers reads it itself
        require_safetensors(ref.path, allow_pickle, what="LLM")
        lm_kwargs.update(from_pretrained_kwargs(allow_pickle))
    qconfig = quantization_config(quantization, dtype or torch.float32)
    if qconfig is not None:
        if ref.gguf_file:
            raise ValueError(f"{ref.gguf_file}: a GGUF LLM cannot be quantized with bitsandbytes")
        lm_kwargs.update(quantization_config=qconfig, device_map={"": "cpu"})
    with loading(ref.path, "LLM"):
        lm = AutoModelForCausalLM.from_pretrained(ref.path, **lm_kwargs)
    model = assemble_llava(
        vision, lm, has_cls=has_cls, select_strategy=strategy, image_token_id=image_token_id,
        vocab_size=len(tokenizer), vision_feature_layer=vision_feature_layer, dtype=dtype,
        quantized=qconfig is not None,
    )  # fmt: skip
    vcfg = vision.config
    num_tokens = model.config.image_seq_length

    image_processor = fmt.load_image_processor(path)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy,
        image_token=image_token,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=getattr(tokenizer, "chat_template", None),
    )
    log.info(
        "LLaVA assembled: %s tower (%d tokens/image, layer %d, %s) -> mlp2x_gelu %d->%d -> %s",
        fmt.name,
        num_tokens,
        vision_feature_layer,
        strategy,
        vcfg.hidden_size,
        lm.config.hidden_size,
        lm.config.model_type,
    )
    return model, processor


def assemble_llava(
    vision: Any,
    lm: Any,
    *,
    has_cls: bool,
    select_strategy: str,
    image_token_id: int,
    vocab_size: int,
    vision_feature_layer: int = -2,
    dtype: torch.dtype | None = None,
    quantized: bool = False,
) -> Any:
    """``LlavaForConditionalGeneration`` from a loaded vision model and causal LM (modules moved in).

    The part of :func:`build_llava_model` after loading: also what ``plan`` and the full-size
    recipe tests call with a tower and an LLM built on the meta device from their configs.

    Args:
        vision: a transformers vision model (CLIP, SigLIP).
        lm: a causal LM (``AutoModelForCausalLM``); its base model and head are moved in.
        has_cls: the tower's sequence starts with one CLS token.
        select_strategy: the resolved strategy (:func:`resolve_select_strategy`).
        image_token_id: the ``<image>`` token's id; ``vocab_size``: the tokenizer's length (the
            embeddings grow to it).
        quantized: the LLM's linear layers are bitsandbytes' (only the tower and the projector
            move to ``dtype``).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vcfg = vision.config
    check_feature_layer(vcfg, vision_feature_layer)
    n_side = vcfg.image_size // vcfg.patch_size
    # Tokens the LM sees per image: every position of the hidden state, minus CLS for "default".
    num_tokens = n_side**2 + (1 if has_cls else 0) - (1 if select_strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=lm.config,
        image_token_index=image_token_id,
        image_seq_length=num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    # Build the shell without allocating weights, then move the pretrained modules in.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    # The projector is new: built where the LLM lives (the meta device for a planned model).
    with torch.device(model.lm_head.weight.device):
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    on_meta = model.lm_head.weight.is_meta
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover and not on_meta:
        raise RuntimeError(f"LLaVA assembly left weights unset: {leftover[:5]}")
    if vocab_size > model.get_input_embeddings().num_embeddings:
        # Mean resizing draws the new rows from the old ones' statistics: none exist on meta.
        model.resize_token_embeddings(vocab_size, mean_resizing=not on_meta)
    if dtype is not None:
        if not quantized:
            model.to(dtype)
        else:  # quantized weights keep their storage; only the tower and the projector move
            model.model.vision_tower.to(dtype)
            model.model.multi_modal_projector.to(dtype)
    return model.eval()
