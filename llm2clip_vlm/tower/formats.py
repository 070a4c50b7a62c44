"""Which model class loads an exported tower directory: a small registry keyed by ``config.json``.

An exported tower is a directory in its backbone's own format (``config.json``,
``model.safetensors``, ``preprocessor_config.json``). Its ``model_type`` (``clip_vision_model``,
``siglip_vision_model``, or the full-model ``clip``/``siglip``) picks a :class:`TowerFormat`: how to
read the config without weights, how to load the weights, whether the token sequence starts with
a CLS token, and how to load the image processor. Dispatch is on the file's declared type, never
on substrings of the path.

A new family (e.g. a timm-backed tower, whose ``config.json`` carries ``architecture`` and no
``model_type``; it is keyed ``"timm"``) is added with :func:`register_tower_format`. Its loaded
model must behave like a transformers vision model for the tower: ``model(pixel_values,
output_hidden_states=True).hidden_states`` (index 0 = the embeddings, ``i`` = after block ``i``),
``.dtype``, ``.device``, and a ``config`` with ``hidden_size``, ``image_size``, ``patch_size``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.errors import BadInputFileError
from llm2clip_vlm.tower.timm_tower import load_timm_config, load_timm_model
from llm2clip_vlm.weights import check_model_files, loading, require_safetensors, shape_mismatch

PREFIX = "llm2clip:"


@dataclass(frozen=True)
class TowerFormat:
    """How one backbone family's exported directory is loaded.

    Attributes:
        name: short family name (``clip``, ``siglip``, ...), used in messages.
        num_prefix_tokens: ``config -> int``, tokens before the patches (CLS, registers);
            "patch" drops them, "cls_patch" keeps them.
        load_config: ``path -> config`` (no weights): ``hidden_size``, ``image_size``, ``patch_size``.
        load_model: ``(path, device_map) -> model`` with the weights.
        load_image_processor: ``path -> image processor``.
        model_class: ``config -> model`` without weights, to check the file's tensor shapes
            against the config before loading (None: not checked).
    """

    name: str
    num_prefix_tokens: Callable[[Any], int]
    load_config: Callable[[Path], Any]
    load_model: Callable[[Path, Any], nn.Module]
    load_image_processor: Callable[[Path], Any]
    model_class: Callable[[Any], nn.Module] | None = None


_FORMATS: dict[str, TowerFormat] = {}


def register_tower_format(keys: tuple[str, ...], fmt: TowerFormat) -> TowerFormat:
    """Register ``fmt`` for every ``config.json`` type in ``keys`` (``model_type`` or ``"timm"``).

    Raises:
        ValueError: a key is already registered.
    """
    for key in keys:
        if key in _FORMATS:
            raise ValueError(f"tower format for {key!r} is already registered ({_FORMATS[key].name})")
    for key in keys:
        _FORMATS[key] = fmt
    return fmt


def known_tower_types() -> list[str]:
    """The ``config.json`` types a tower can be loaded from."""
    return sorted(_FORMATS)


def tower_format(key: str) -> TowerFormat:
    """The format registered for a ``config.json`` type (``model_type``, or ``"timm"``).

    Raises:
        ValueError: no format is registered for ``key``.
    """
    if key not in _FORMATS:
        raise ValueError(
            f"no tower format for type {key or '(none)'!r}; known: {', '.join(known_tower_types())} "
            "(add one with register_tower_format)"
        )
    return _FORMATS[key]


def resolve_tower_path(name: str) -> Path:
    """A tower name (a local directory, optionally prefixed ``llm2clip:``) -> its directory.

    Raises:
        FileNotFoundError: not a local directory with a ``config.json`` (towers load offline only).
    """
    raw = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    path = Path(raw).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"LLM2CLIP tower {name!r}: {path} is not a local directory with a config.json "
            "(expected an exported tower: config.json, model.safetensors, preprocessor_config.json)"
        )
    return path


def detect_tower_format(path: Path) -> TowerFormat:
    """The registered format of the tower directory ``path`` (from its ``config.json``).

    Raises:
        ValueError: unreadable ``config.json`` or a type no format is registered for.
    """
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputFileError(f"{cfg_file}: not a readable JSON config ({e})") from e
    if not isinstance(cfg, dict):
        raise BadInputFileError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    # timm's hub format has no model_type; it names the timm architecture instead.
    key = cfg.get("model_type") or ("timm" if "architecture" in cfg else "")
    if key not in _FORMATS:
        raise BadInputFileError(
            f"{cfg_file}: no tower format for type {key or '(none)'!r} (is {path} a vision tower?); "
            f"known: {', '.join(known_tower_types())} (add one with register_tower_format)"
        )
    return _FORMATS[key]


def load_tower_model(path: Path, fmt: TowerFormat, device_map: Any = None) -> nn.Module:
    """The tower's weights, after naming a damaged file, a pickle-only folder or a wrong shape.

    Raises:
        PickleRefusedError: the weights exist only as pickles (towers are always safetensors).
        BadInputFileError: a damaged ``config.json``/safetensors file, a tensor whose shape
            differs from what ``config.json`` describes, or any other reason the folder does not
            load, naming the file or folder.
    """
    require_safetensors(
        path,
        allow_pickle=False,
        what="vision tower",
        hint="towers are read as safetensors only: convert the weights",
    )
    check_model_files(path, "vision tower")
    with loading(path, "vision tower"):
        if fmt.model_class is not None:  # compare shapes on the meta device (no memory) first
            with torch.device("meta"):
                skeleton = fmt.model_class(fmt.load_config(path))
            expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
            wrong = shape_mismatch(path, expected, prefixes=("", "vision_model.", "model."))
            if wrong:
                raise BadInputFileError(f"vision tower {path}: {wrong}")
        return fmt.load_model(path, device_map)


# -- transformers families ----------------------------------------------------------------------


def _clip_config(path: Path) -> Any:
    from transformers import CLIPVisionConfig

    # Also reads the vision half of a full CLIP checkpoint (model_type "clip").
    return CLIPVisionConfig.from_pretrained(path, local_files_only=True)


def _clip_model(path: Path, device_map: Any) -> nn.Module:
    from transformers import CLIPVisionModel

    # Exported towers are safetensors: a pickled checkpoint in a tower folder is refused.
    return CLIPVisionModel.from_pretrained(
        path, device_map=device_map, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )


def _siglip_config(path: Path) -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig.from_pretrained(path, local_files_only=True)


def _siglip_model(path: Path, device_map: Any) -> nn.Module:
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(
        path, device_map=device_map, local_files_only=True, use_safetensors=True, trust_remote_code=False
    )


def _clip_skeleton(config: Any) -> nn.Module:
    from transformers import CLIPVisionModel

    return CLIPVisionModel(config)


def _siglip_skeleton(config: Any) -> nn.Module:
    from transformers import SiglipVisionModel

    return SiglipVisionModel(config)


def _auto_image_processor(path: Path) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


register_tower_format(
    ("clip_vision_model", "clip"),
    TowerFormat("clip", lambda config: 1, _clip_config, _clip_model, _auto_image_processor, _clip_skeleton),
)
register_tower_format(
    ("siglip_vision_model", "siglip"),
    TowerFormat(
        "siglip", lambda config: 0, _siglip_config, _siglip_model, _auto_image_processor, _siglip_skeleton
    ),
)


# -- timm (optional): config.json in timm's hub format, keyed "timm" ------------------------------


def _timm_config(path: Path) -> Any:
    return load_timm_config(path)


def _clip_image_processor(path: Path) -> Any:
    from transformers import CLIPImageProcessor

    # Not AutoImageProcessor: it reads timm's config.json as a TimmWrapper model and wants timm's
    # own processor; the stage-2 export writes a CLIP processor for timm towers.
    return CLIPImageProcessor.from_pretrained(path, local_files_only=True)


def _timm_model(path: Path, device_map: Any) -> nn.Module:
    return load_timm_model(path, device_map)


register_tower_format(
    ("timm",),
    TowerFormat(
        "timm", lambda config: config.num_prefix_tokens, _timm_config, _timm_model, _clip_image_processor
    ),
)
