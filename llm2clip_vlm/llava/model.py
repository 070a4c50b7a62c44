"""The LLaVA model of a phase: build it on a tower with the right parts frozen, the projector in
LLaVA's format, and saving in transformers' LLaVA format (LoRA merged).

The tower is always frozen; the projector always trains; the LLM is frozen (``projector``), fully
trained (``full``), or gets LoRA adapters (``lora``, ``qlora`` on a 4-bit base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llm2clip_vlm import resources
from llm2clip_vlm.errors import BadInputFileError, PickleRefusedError
from llm2clip_vlm.llava.assemble import build_llava_model
from llm2clip_vlm.llava.config import LlavaConfig, LlavaPhaseConfig
from llm2clip_vlm.llava.templates import TEMPLATE_FILE, get_template, saved_chat_template
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.training.session import METRICS_FILE, read_metrics
from llm2clip_vlm.weights import check_safetensors_file

log = get_logger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
# transformers' projector names -> LLaVA's (``model.mm_projector.{0,2}``, mlp2x_gelu).
LLAVA_PROJECTOR_KEYS = {
    "linear_1.weight": "model.mm_projector.0.weight",
    "linear_1.bias": "model.mm_projector.0.bias",
    "linear_2.weight": "model.mm_projector.2.weight",
    "linear_2.bias": "model.mm_projector.2.bias",
}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# A projector given as a pickle (LLaVA's own mm_projector.bin): never torch.load'ed.
PICKLED_PROJECTOR = (
    "{path}: only a mm_projector.safetensors projector is read (a .bin is a pickle, which can run "
    "code when loaded): pass --from the llava-pretrain output directory, or convert the file with "
    "safetensors if you trust it"
)


class MissingInputError(FileNotFoundError):
    """A required input (tower, pretrained projector) is not where the config says."""


def projector_state_for_llava(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's weights under LLaVA's names (usable as ``pretrain_mm_mlp_adapter``)."""
    return {
        LLAVA_PROJECTOR_KEYS[k]: v.detach().float().cpu().contiguous()
        for k, v in projector.state_dict().items()
    }


def save_projector(projector: torch.nn.Module, out: Path) -> None:
    """The projector alone under LLaVA's names, as safetensors and as LLaVA's ``mm_projector.bin``."""
    state = projector_state_for_llava(projector)
    with resources.writing(out / PROJECTOR_FILE, 2 * sum(t.nbytes for t in state.values())):
        save_file(state, str(out / PROJECTOR_FILE))
        # LLaVA's `--pretrain_mm_mlp_adapter` reads a torch.save file: a plain dict of tensors,
        # which `torch.load(weights_only=True)` loads without unpickling any code.
        torch.save(state, out / "mm_projector.bin")


def load_projector(projector: torch.nn.Module, path: Path) -> None:
    """Load a projector from a ``mm_projector.safetensors`` (our names or LLaVA's), or a run directory.

    Only safetensors are read: a ``.bin`` is a pickle and is refused (load it yourself with
    ``torch.load(..., weights_only=True)`` and save it with safetensors if you trust it).
    """
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise MissingInputError(
            f"pretrained projector {path} does not exist: run `llm2clip-vlm llava-pretrain` first "
            "or set llava.finetune init with --from"
        )
    if path.suffix != ".safetensors":
        raise PickleRefusedError(PICKLED_PROJECTOR.format(path=path))
    check_safetensors_file(path, "pretrained projector")
    state = load_file(str(path))
    inverse = {v: k for k, v in LLAVA_PROJECTOR_KEYS.items()}
    state = {inverse.get(k, k): v for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise BadInputFileError(
            f"pretrained projector {path}: not a projector of this model "
            f"(missing {missing[:2]}, unexpected {unknown[:2]}): pass --from the llava-pretrain output"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise BadInputFileError(
                f"pretrained projector {path}: {k} has shape {list(state[k].shape)}, this tower and LLM "
                f"need {list(shape)}: it was pretrained with another tower or LLM (check --tower / llava.llm)"
            )
    projector.load_state_dict(state)


def check_inputs(llava: LlavaConfig, phase: str, init: Path | None) -> None:
    """Fail before any loading when the tower or (finetuning) the pretrained projector is missing."""
    tower = llava.tower
    if not tower:
        raise MissingInputError(
            "llava.tower is not set: pass --tower DIR (an exported tower, e.g. the `tower/` folder "
            "that `llm2clip-vlm build-tower` writes) or set llava.tower in the recipe"
        )
    if not Path(tower.removeprefix("llm2clip:")).is_dir():
        raise MissingInputError(
            f"tower {tower} does not exist: build one with `llm2clip-vlm build-tower --output DIR` "
            "and pass --tower DIR/tower"
        )
    if phase == "finetune":
        if init is None:
            raise MissingInputError(
                "llava-finetune starts from a pretrained projector: pass --from DIR (a llava-pretrain "
                "output) or a mm_projector.safetensors file"
            )
        path = init / PROJECTOR_FILE if init.is_dir() else init
        if path.is_file() and path.suffix != ".safetensors":
            raise PickleRefusedError(PICKLED_PROJECTOR.format(path=path))
        if not path.is_file():
            raise MissingInputError(
                f"pretrained projector {path} does not exist: run `llm2clip-vlm llava-pretrain` first "
                "or pass --from a mm_projector.safetensors file"
            )


def build_model(
    llava: LlavaConfig, phase: str, init: Path | None, compute_dtype: torch.dtype, allow_pickle: bool = False
) -> tuple[Any, Any]:
    """The LLaVA model for ``phase`` with the right parts frozen, and its processor."""
    p: LlavaPhaseConfig = getattr(llava, phase)
    tower = llava.tower
    check_inputs(llava, phase, init)
    quant = "4bit" if p.tune == "qlora" else "none"
    model, processor = build_llava_model(
        tower,
        llava.llm,
        vision_feature_layer=llava.vision_feature_layer,
        select_strategy=llava.select_strategy,
        dtype=torch.float32,
        quantization=quant,
        allow_pickle=allow_pickle,
    )
    if init is not None:
        load_projector(model.model.multi_modal_projector, init)
        log.info("projector loaded from %s", init)
        trained_llm = pretrained_llm_dir(init)
        if trained_llm is not None:
            load_pretrained_llm(model, trained_llm)
    return prepare_phase(model, p, compute_dtype), processor


def pretrained_llm_dir(init: Path) -> Path | None:
    """The saved model of a ``llava-pretrain`` output whose pretraining also trained the LLM
    (``llava.pretrain.tune`` full / lora / qlora, as ShareGPT4V's pretraining does:
    ShareGPT4Omni/ShareGPT4V scripts/sharegpt4v/slurm_pretrain_7b.sh, ``TUNE_ENTIRE_MODEL=true``,
    and its finetune starts from that whole checkpoint), else None: LLaVA-1.5's pretraining trains
    the projector alone, and its finetune starts from the base LLM plus that projector."""
    if not init.is_dir():
        return None  # a bare mm_projector.safetensors: the projector only
    try:
        tune = read_metrics(init / METRICS_FILE)["details"]["tune"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a finished llava-pretrain output: its projector file says what there is
    model_dir = init / "model"
    if tune == "projector" or not (model_dir / "config.json").is_file():
        return None
    return model_dir


# transformers writes a LLaVA under its older names and renames them when it loads one
# (transformers/conversion_mapping.py, "llava": ^language_model.lm_head -> lm_head, ^language_model
# -> model.language_model, with LlavaModel's ^language_model.model -> language_model).
SAVED_LLAVA_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def loaded_llava_name(saved: str) -> str:
    """A saved LLaVA weight's name in the loaded model (names already in that form pass)."""
    for old, new in SAVED_LLAVA_PREFIXES:
        if saved.startswith(old):
            return new + saved[len(old) :]
    return saved


def load_pretrained_llm(model: Any, model_dir: Path) -> None:
    """Load the LLM (its blocks, embeddings and LM head) of a saved LLaVA into ``model``, which was
    assembled from the base LLM: the finetune continues the LLM its pretraining trained.

    Raises:
        BadInputFileError: a weight file is damaged, or the saved LLM is not this model's LLM
            (another ``llava.llm``: names or shapes differ).
    """
    from safetensors import safe_open

    prefixes = ("model.language_model.", "lm_head.")
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    files = sorted(model_dir.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        check_safetensors_file(f, "pretrained LLaVA")
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                name = loaded_llava_name(k)
                if name in expected:
                    state[name] = fh.get_tensor(k)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or bool(
        getattr(model.config.text_config, "tie_word_embeddings", False)
    )
    missing = sorted(k for k in expected if k not in state and not (tied and k.startswith("lm_head.")))
    if not files or missing:
        raise BadInputFileError(
            f"pretrained LLaVA {model_dir}: its LLM lacks {missing[:2] or 'every weight'} of this model's "
            "LLM: it was pretrained with another llava.llm (pass the same llava.llm, or --from its "
            "mm_projector.safetensors to start from the base LLM)"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise BadInputFileError(
                f"pretrained LLaVA {model_dir}: {k} has shape {list(v.shape)}, this model's LLM needs "
                f"{list(expected[k].shape)}: it was pretrained with another llava.llm"
            )
    model.load_state_dict(state, strict=False)
    log.info("LLM loaded from %s (its pretraining trained the LLM)", model_dir)


def prepare_phase(model: Any, p: LlavaPhaseConfig, compute_dtype: torch.dtype) -> Any:
    """Freeze, cast and wrap an assembled LLaVA model for phase ``p`` (what :func:`build_model`
    does after loading; ``plan`` applies it to a model built on the meta device).

    The tower is frozen in ``compute_dtype``; the projector trains in fp32; the LLM is frozen in
    ``compute_dtype`` (``projector``), trains in fp32 (``full``), or gets LoRA adapters on its
    seven projections (``lora``, ``qlora``: its base stays 4-bit). Gradient checkpointing as the
    phase says.
    """
    model.requires_grad_(False)
    # Frozen parts need no fp32 master copy: keep them in the compute dtype (memory, speed).
    model.model.vision_tower.to(compute_dtype)
    if p.tune == "projector":
        model.model.language_model.to(compute_dtype)
        model.lm_head.to(compute_dtype)
    elif p.tune == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    else:  # lora / qlora
        from peft import LoraConfig, get_peft_model

        if p.tune == "lora":
            model.model.language_model.to(compute_dtype)
            model.lm_head.to(compute_dtype)
        lora = LoraConfig(
            r=p.lora_r,
            lora_alpha=p.lora_alpha,
            lora_dropout=p.lora_dropout,
            target_modules=LORA_TARGETS,
            bias="none",
        )
        model = get_peft_model(model, lora)
    projector = projector_of(model)
    projector.to(torch.float32).requires_grad_(True)
    if p.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # The LLM's first layer input comes from frozen embeddings: its output must require grad
        # for non-reentrant checkpointing to build a graph back to the projector.
        base_model(model).enable_input_require_grads()
    return model


def base_model(model: Any) -> Any:
    """The LlavaForConditionalGeneration under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fsdp_blocks(model: Any) -> list[torch.nn.Module]:
    """The FSDP wrapping policy of a LLaVA model: the blocks transformers declares unsplittable
    (``_no_split_modules``: ``LlamaDecoderLayer``, ``CLIPEncoderLayer``, ``CLIPVisionEmbeddings``, ...)
    of the LLM and of the tower, each one unit; the root keeps the rest (projector, token
    embeddings, LM head, the tower's norms).

    [IMPORTANT] Not the tower itself: ``fully_shard`` on a transformers ``PreTrainedModel`` that
    records hidden states (the tower's ``output_hidden_states``, which LLaVA's layer -2 needs) makes
    them come back as None (transformers 5.x output capturing).
    """
    base = base_model(model)
    blocks: list[torch.nn.Module] = []
    for part in (base.model.language_model, base.model.vision_tower):
        names = set(getattr(part, "_no_split_modules", None) or ())
        blocks += [m for m in part.modules() if m is not part and type(m).__name__ in names]
    return blocks


def projector_of(model: Any) -> torch.nn.Module:
    return base_model(model).model.multi_modal_projector


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name (what a checkpoint stores)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def merged_model(llava: LlavaConfig, p: LlavaPhaseConfig, model: Any, allow_pickle: bool = False) -> Any:
    """A plain LlavaForConditionalGeneration with the LoRA merged (full precision for QLoRA)."""
    if p.tune in ("projector", "full"):
        return model
    if p.tune == "lora":
        return model.merge_and_unload()
    # QLoRA: merging into 4-bit weights would re-quantize them; rebuild the base in full precision,
    # load the adapters and the projector into it, merge there.
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapters = get_peft_model_state_dict(model, save_embedding_layers=False)  # no embedding LoRA
    projector = {k: v.detach().clone() for k, v in projector_of(model).state_dict().items()}
    base, _ = build_llava_model(
        llava.tower, llava.llm, vision_feature_layer=llava.vision_feature_layer,
        select_strategy=llava.select_strategy, dtype=torch.float32, allow_pickle=allow_pickle,
    )  # fmt: skip
    fresh = get_peft_model(base, model.peft_config["default"])
    set_peft_model_state_dict(fresh, adapters)
    merged = fresh.merge_and_unload()
    merged.model.multi_modal_projector.load_state_dict(projector)
    return merged


def _bytes_of(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_llava(
    model: Any, processor: Any, out: Path, template: str, system: str | None, dtype: torch.dtype
) -> None:
    """``out``: the model in transformers' LLaVA format + processor + which template it learnt."""
    model = model.to(dtype)
    model.eval()
    with resources.writing(out, lambda: _bytes_of(model)):  # a full disk: one line naming out
        model.save_pretrained(out, safe_serialization=True)
    learnt = get_template(template)
    chat = saved_chat_template(template, processor.tokenizer)
    if chat is not None:
        # transformers (lmms-eval, serving engines) then build the prompt the model was trained on.
        processor.chat_template = chat
    processor.save_pretrained(out)
    info = {"template": template, "system": learnt.system(system)}
    (out / TEMPLATE_FILE).write_text(json.dumps(info, indent=2) + "\n")
