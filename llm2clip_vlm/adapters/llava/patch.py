"""The smallest shim that lets LLaVA-1.5 / LLaVA-NeXT build ``llm2clip:`` towers.

Both codebases create their vision tower through
``llava.model.multimodal_encoder.builder.build_vision_tower``, and ``llava.model.llava_arch``
imports that function *by name* (``from .multimodal_encoder.builder import build_vision_tower``),
so both module attributes must be replaced. The replacement routes names that start with
``llm2clip:`` to :class:`LLM2CLIPVisionTower` and everything else to the original builder,
unchanged. A CLIP-format tower needs none of this: pass its directory as ``--vision_tower PATH``.

Use it either from code, before the model is built::

    from llm2clip_vlm.adapters.llava.patch import patch_llava
    patch_llava()

or as a launcher that patches and then runs a LLaVA script or module unchanged::

    python -m llm2clip_vlm.adapters.llava.patch llava/train/train_mem.py --vision_tower llm2clip:/towers/t ...
    python -m llm2clip_vlm.adapters.llava.patch -m llava.eval.model_vqa_loader --model-path ...
    deepspeed --module llm2clip_vlm.adapters.llava.patch llava/train/train_mem.py --deepspeed ... # (1)

(1) deepspeed puts ``--local_rank=N`` before the script path; the launcher hands it on to the script.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2clip_vlm.adapters.llava.tower import LLM2CLIPVisionTower
from llm2clip_vlm.tower.formats import PREFIX

BUILDER_MODULE = "llava.model.multimodal_encoder.builder"
ARCH_MODULE = "llava.model.llava_arch"
FUNCTION = "build_vision_tower"


def tower_name(vision_tower_cfg: Any) -> Any:
    """The tower name LLaVA's builder reads: ``mm_vision_tower``, else ``vision_tower``."""
    return getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))


def make_builder(original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``build_vision_tower`` that builds ``llm2clip:`` names itself and defers the rest to ``original``."""

    def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> Any:
        name = tower_name(vision_tower_cfg)
        if isinstance(name, str) and name.startswith(PREFIX):
            return LLM2CLIPVisionTower(name, args=vision_tower_cfg, **kwargs)
        return original(vision_tower_cfg, **kwargs)

    build_vision_tower._llm2clip_original = original  # type: ignore[attr-defined]
    build_vision_tower.__doc__ = (original.__doc__ or "") + "\n(llm2clip_vlm: routes 'llm2clip:' names.)"
    return build_vision_tower


def patch_llava(package: str = "llava") -> Callable[..., Any]:
    """Replace ``build_vision_tower`` in LLaVA's builder and arch modules; calling it twice is harmless.

    Args:
        package: the top-level package of the LLaVA codebase (``llava`` for LLaVA-1.5 and LLaVA-NeXT).

    Returns:
        The installed builder.

    Raises:
        ImportError: the LLaVA codebase is not importable (run from its checkout or install it).
    """
    builder_name = BUILDER_MODULE.replace("llava", package, 1)
    arch_name = ARCH_MODULE.replace("llava", package, 1)
    try:
        builder = importlib.import_module(builder_name)
        arch = importlib.import_module(arch_name)
    except ImportError as e:
        raise ImportError(
            f"cannot patch LLaVA: {e}. Run from the LLaVA / LLaVA-NeXT checkout (or pip install -e it)."
        ) from e
    current = getattr(builder, FUNCTION)
    if hasattr(current, "_llm2clip_original"):
        installed = current
    else:
        installed = make_builder(current)
        setattr(builder, FUNCTION, installed)
    # llava_arch holds its own reference, taken at its import time.
    setattr(arch, FUNCTION, installed)
    return installed


def split_launcher_args(argv: list[str]) -> tuple[list[str], str, bool, list[str]]:
    """``[--local_rank=N ...] (SCRIPT | -m MODULE) [ARGS...]`` -> (leading flags, target, is_module, args)."""
    leading: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("--local_rank"):
        leading.append(argv[i])
        # deepspeed writes "--local_rank=N"; torch.distributed.launch may write "--local_rank N".
        if "=" not in argv[i] and i + 1 < len(argv):
            leading.append(argv[i + 1])
            i += 1
        i += 1
    rest = argv[i:]
    if rest[:1] == ["-m"] and len(rest) >= 2:
        return leading, rest[1], True, rest[2:]
    if not rest or rest[0].startswith("-"):
        raise SystemExit(
            "usage: python -m llm2clip_vlm.adapters.llava.patch (SCRIPT.py | -m MODULE) [ARGS...]\n"
            "patches LLaVA's build_vision_tower for 'llm2clip:' towers, then runs SCRIPT/MODULE with ARGS"
        )
    return leading, rest[0], False, rest[1:]


def main(argv: list[str] | None = None) -> None:
    """Patch LLaVA, then run a script or module as ``__main__`` with the remaining arguments."""
    leading, target, is_module, args = split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not is_module:
        # A script's own folder is first on sys.path when Python runs it; keep that behaviour.
        sys.path.insert(0, str(Path(target).resolve().parent))
    patch_llava()
    sys.argv = [target, *leading, *args]
    if is_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
