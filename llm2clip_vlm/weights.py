"""Which weight files a model directory holds, and refusing pickle-only ones with a clear message.

transformers' ``from_pretrained(..., use_safetensors=True)`` refuses a directory that holds only
``pytorch_model.bin`` with "no file named model.safetensors", which does not say why nor how to
allow it. Every loader of ours calls :func:`require_safetensors` first, which names the pickle,
the risk and the opt-in (``reliability.allow_pickle_weights``), and then passes
:func:`from_pretrained_kwargs` to ``from_pretrained`` so transformers enforces the same choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llm2clip_vlm.errors import HINT_PICKLE, BadInputFileError, PickleRefusedError, UserError
from llm2clip_vlm.resources import ResourceError

# Bytes per element of the safetensors dtypes (the format's spec; 8-bit floats included).
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

# Weight files that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def from_pretrained_kwargs(allow_pickle: bool = False) -> dict[str, Any]:
    """Keyword arguments for transformers' ``from_pretrained`` that keep loading safe.

    ``trust_remote_code=False`` (never run a model repository's Python) and, unless pickles are
    explicitly allowed, ``use_safetensors=True`` (refuse ``pytorch_model.bin``).
    """
    kw: dict[str, Any] = {"trust_remote_code": False}
    if not allow_pickle:
        kw["use_safetensors"] = True
    return kw


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


def require_safetensors(
    folder: str | Path, allow_pickle: bool, what: str = "model", hint: str = HINT_PICKLE
) -> None:
    """Refuse ``folder`` when its weights exist only as pickles and pickles are not allowed.

    A hub id or a folder without any weight file is left to the loader (it says what is missing).

    Raises:
        PickleRefusedError: naming the pickle and the opt-in.
    """
    safe, pickled = weight_files(folder)
    if pickled and not safe and not allow_pickle:
        raise PickleRefusedError(
            f"{what} {folder} holds only pickled weights ({pickled[0].name}), which can run code when "
            f"loaded: {hint}"
        )


# -- damaged or mismatched model folders -------------------------------------------------------
def check_model_files(folder: str | Path, what: str = "model") -> None:
    """Name a damaged ``config.json`` or safetensors file of ``folder`` before a loader trips on it.

    Reads only the small parts: the JSON configs and each safetensors header, and checks that
    each file is as long as its header says (a truncated copy is named, not mapped and crashed on).

    Raises:
        BadInputFileError: naming the file and what is wrong with it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id or a single file: the loader says what is missing
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            try:
                doc = json.loads(f.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadInputFileError(f"{what} {folder}: {f.name} is not valid UTF-8 JSON ({e})") from e
            if not isinstance(doc, dict):
                raise BadInputFileError(
                    f"{what} {folder}: {f.name} holds a {type(doc).__name__}, not an object"
                )
    for f in weight_files(folder)[0]:
        check_safetensors_file(f, what)


def check_safetensors_file(f: Path, what: str = "model") -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype)}`` from the header of ``f``, refusing a damaged or truncated file.

    Raises:
        BadInputFileError: the header is not safetensors, or the file is shorter or longer than
            the tensors its header lists (a partial copy, or bytes appended).
    """
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or n > size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        info = {k: (list(v["shape"]), str(v["dtype"])) for k, v in tensors.items()}
        for k, v in tensors.items():  # a header that lies about a tensor's bytes
            start, stop = (int(x) for x in v["data_offsets"])
            numel = math.prod(int(d) for d in v["shape"])
            size_of = _DTYPE_BYTES.get(str(v["dtype"]))
            if size_of is not None and stop - start != numel * size_of:
                raise ValueError(
                    f"tensor {k}: the header gives {stop - start} bytes for shape {v['shape']} of "
                    f"{v['dtype']} ({numel * size_of} needed)"
                )
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise BadInputFileError(f"{what}: {f} is not a readable safetensors file ({e})") from e
    if 8 + n + end != size:
        raise BadInputFileError(
            f"{what}: {f} is damaged: its header lists {8 + n + end} bytes, the file has {size} "
            "(a partial copy or a corrupt file: copy it again)"
        )
    return info


def shape_mismatch(
    folder: str | Path, expected: dict[str, tuple[int, ...]], prefixes: tuple[str, ...] = ("",)
) -> str | None:
    """The first tensor of ``folder``'s safetensors whose shape differs from ``expected``, in words.

    Args:
        expected: ``{state-dict key: shape}`` of the model the config describes (built on the
            meta device: no memory).
        prefixes: prefixes a file's keys may carry before the model's own keys.
    """
    for f in weight_files(folder)[0]:
        for key, (shape, _) in check_safetensors_file(f).items():
            for p in prefixes:
                name = key[len(p) :] if key.startswith(p) else None
                if name is not None and name in expected and tuple(shape) != tuple(expected[name]):
                    return (
                        f"{f}: tensor {key} has shape {list(shape)}, but config.json describes "
                        f"{list(expected[name])}"
                    )
    return None


@contextmanager
def loading(folder: str | Path, what: str) -> Iterator[None]:
    """Context: what a loader raises on a folder it cannot use becomes one line naming the folder.

    By type: safetensors' ``SafetensorError``, JSON/Unicode errors, and the ``OSError``,
    ``ValueError``, ``RuntimeError`` and ``KeyError`` that transformers raises for a folder whose
    files do not form the expected model. Errors that already name their problem for the user
    (a refused pickle, a missing file, a full disk) pass through.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (UserError, FileNotFoundError, ResourceError):
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputFileError(f"{what} {folder} cannot be loaded ({type(e).__name__}: {first})") from e


def check_llm_folder(folder: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a folder that cannot be a causal LM before transformers loads it (one line each).

    Pickle-only weights (unless allowed), a damaged ``config.json`` or safetensors file, and a
    ``config.json`` whose ``model_type`` is no causal language model (a vision tower given as
    the LLM) are named. A hub id or a GGUF file is left to the loader.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return
    require_safetensors(folder, allow_pickle, what="LLM")
    check_model_files(folder, "LLM")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadInputFileError(
            f"LLM {folder}: its config.json has model_type {model_type!r}, which is not a causal "
            "language model (a vision tower goes to --tower / llava.tower, the LLM to llava.llm)"
        )
