"""Which weight files a model directory holds, and refusing pickle-only ones with a clear message.

transformers' ``from_pretrained(..., use_safetensors=True)`` refuses a directory that holds only
``pytorch_model.bin`` with "no file named model.safetensors", which does not say why nor how to
allow it. Every loader of ours calls :func:`require_safetensors` first, which names the pickle,
the risk and the opt-in (``reliability.allow_pickle_weights``), and then passes
``checkpointing.from_pretrained_kwargs`` to ``from_pretrained`` so transformers enforces the same
choice.
"""

from __future__ import annotations

from pathlib import Path

from llm2clip_vlm.errors import HINT_PICKLE, PickleRefusedError

# Weight files that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """``(safetensors files, pickled weight files)`` directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safe = [p for p in files if p.suffix == ".safetensors"]
    # training_args.bin and similar are not weights; transformers' names are (pytorch_)model*.bin.
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and "model" in p.name]
    return safe, pickled


def require_safetensors(folder: str | Path, allow_pickle: bool, what: str = "model") -> None:
    """Refuse ``folder`` when its weights exist only as pickles and pickles are not allowed.

    A hub id or a folder without any weight file is left to the loader (it says what is missing).

    Raises:
        PickleRefusedError: naming the pickle and the opt-in.
    """
    safe, pickled = weight_files(folder)
    if pickled and not safe and not allow_pickle:
        raise PickleRefusedError(
            f"{what} {folder} holds only pickled weights ({pickled[0].name}), which can run code when "
            f"loaded: {HINT_PICKLE}"
        )
