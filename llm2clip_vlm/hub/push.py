"""``--push-to-hub REPO``: upload a model directory as it is, with the user's own credentials.

Only the files a model page needs go up (:func:`files_to_upload`): weights as safetensors, configs,
processor/tokenizer files and the card; never pickles, temporary files, hidden files or
checkpoints. Nothing here runs unless the user asks for it.
"""

from __future__ import annotations

from pathlib import Path

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

# Pickle formats (a hub page should carry safetensors only) and write-in-progress leftovers.
EXCLUDED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tmp", ".lock")
EXCLUDED_DIRS = ("checkpoints", "__pycache__")


class PushError(ValueError):
    """A directory that is not ready to upload (the message says why)."""


def files_to_upload(folder: str | Path) -> list[str]:
    """The relative paths (sorted) that ``push_to_hub`` uploads from ``folder``.

    Raises:
        PushError: no such directory, no ``README.md`` card, or no safetensors weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such directory to upload")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or path.suffix in EXCLUDED_SUFFIXES:
            continue
        files.append(rel.as_posix())
    if "README.md" not in files:
        raise PushError(f"{folder}: no README.md model card (export or train into it first)")
    if not any(f.endswith(".safetensors") for f in files):
        raise PushError(f"{folder}: no .safetensors weights to upload")
    return files


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, api: object | None = None) -> str:
    """Create ``repo_id`` if needed and upload :func:`files_to_upload` of ``folder`` in one commit.

    Credentials are the user's (``hf auth login`` or ``HF_TOKEN``); returns the commit URL.
    """
    from huggingface_hub import HfApi

    files = files_to_upload(folder)
    hub = api if api is not None else HfApi()
    hub.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)  # type: ignore[attr-defined]
    log.info("uploading %d files from %s to %s", len(files), folder, repo_id)
    info = hub.upload_folder(  # type: ignore[attr-defined]
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        allow_patterns=files,
        commit_message=f"Upload {Path(folder).name} (llm2clip-vlm)",
    )
    return str(getattr(info, "commit_url", info))
