"""``CaptionEncoder``: the stage-1 result, a bidirectional LLM that maps captions to vectors.

On disk it is a plain transformers model directory (``config.json`` with ``is_causal: false``,
``model.safetensors``), its tokenizer, and ``llm2clip_encoder.json`` with the pooling and
instruction settings, a content hash (the identity) and the size and sha256 of every weight file.
:meth:`CaptionEncoder.identity` is what the embedding store records, so embeddings made by another
embedder (or other settings) are refused.

The identity follows the weights on disk, not the JSON: on load, :func:`encoder_identity` checks
the weight files against the sizes and hashes recorded at save time (re-hashing only a file whose
size or mtime changed). Weights replaced after saving give another identity, so ``embed`` and
``stage2`` do not take them for the encoder that made a store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llm2clip_vlm.errors import BadInputFileError
from llm2clip_vlm.identity import file_sha256, folder_files
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_causal, load_tokenizer, save_model
from llm2clip_vlm.text.pooling import mean_pool, tokenize

ENCODER_FILE = "llm2clip_encoder.json"
# How the tokens of a caption see each other: stage 1's encoders are bidirectional; ``causal`` is
# the raw LLM as it was pretrained (the stage-1-free control).
ATTENTIONS = ("bidirectional", "causal")


def read_encoder_meta(path: Path) -> dict[str, Any]:
    """The parsed ``llm2clip_encoder.json`` of a CaptionEncoder directory.

    Raises:
        FileNotFoundError: ``path`` holds no CaptionEncoder.
        ValueError: the file is not valid JSON.
    """
    meta_file = Path(path) / ENCODER_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a CaptionEncoder directory (no {ENCODER_FILE})")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise BadInputFileError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise BadInputFileError(f"{meta_file}: not valid JSON (a {type(meta).__name__}, not an object)")
    return meta


FORMAT_VERSION = 1

log = get_logger(__name__)


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of every tensor (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CaptionEncoder(nn.Module):
    """A bidirectional decoder LLM with mean pooling over caption tokens.

    Args:
        model: the decoder stack (``AutoModel``), possibly PEFT-wrapped during training.
        tokenizer: its tokenizer (left padding, pad = eos).
        max_length: truncation length in tokens.
        instructions: ``{"short_query": ..., "long_query": ...}`` used for queries.
        pad_to_multiple_of: pad batches to this multiple (stable, fast kernels on CPU bf16).
        caption_template: wrapping of every text, with one ``{text}`` (e.g. the Llama-3 chat header
            the reference uses for Llama-3 Instruct), or None; stored with the encoder so that
            stage 1 and ``embed`` always wrap alike.
        attention: ``bidirectional`` (stage 1's encoders) or ``causal`` (the raw LLM as pretrained:
            the stage-1-free control of :mod:`llm2clip_vlm.text.raw`); recorded and loaded so.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 512,
        instructions: dict[str, str] | None = None,
        pooling: str = "mean",
        pad_to_multiple_of: int | None = 16,
        caption_template: str | None = None,
        attention: str = "bidirectional",
    ) -> None:
        super().__init__()
        if pooling != "mean":
            raise ValueError(f"unknown pooling {pooling!r} (only 'mean')")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r} (one of {', '.join(ATTENTIONS)})")
        self.attention = attention
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.instructions = dict(instructions or {})
        self.pooling = pooling
        self.pad_to_multiple_of = pad_to_multiple_of
        self.caption_template = caption_template
        # Autocast dtype for encode() on fp32 weights (e.g. bf16 on a CPU); None = weights' dtype.
        self.autocast_dtype: torch.dtype | None = None
        self._identity: str | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Embedding dimension (the LLM's hidden size)."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that changes an embedding."""
        settings: dict[str, Any] = {
            "pooling": self.pooling,
            "instructions": self.instructions,
            "max_length": self.max_length,
            "query_format": "{instruction}; {text}",
            "dim": self.hidden_size,
        }
        if self.caption_template is not None:  # absent = bare text (identities of older encoders kept)
            settings["caption_template"] = self.caption_template
        if self.attention != "bidirectional":  # absent = bidirectional (older identities kept)
            settings["attention"] = self.attention
        return settings

    # -- forward ----------------------------------------------------------------------------
    def tokenize(
        self, texts: list[str], instruction: str | list[str | None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenized batch with ``embed_mask`` (see :func:`llm2clip_vlm.text.pooling.tokenize`)."""
        return dict(
            tokenize(
                self.tokenizer,
                texts,
                instruction,
                self.max_length,
                self.pad_to_multiple_of,
                self.caption_template,
            )
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor
    ) -> torch.Tensor:
        """Pooled embeddings ``[B, d]`` (float32) of a tokenized batch, with gradient."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden.float(), embed_mask.to(hidden.device))

    @torch.no_grad()
    def encode(
        self,
        texts: Iterable[str],
        batch_size: int = 64,
        instruction: str | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Embed captions.

        Args:
            texts: captions (plain strings).
            batch_size: captions per forward pass; batches are length-sorted internally.
            instruction: prepended to every caption (queries); excluded from pooling.
            show_progress: show a progress bar.

        Returns:
            A float32 CPU tensor ``[N, d]`` in the order of ``texts``.
        """
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.hidden_size)
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.hidden_size)
        device = self.device
        autocast = self.autocast_dtype is not None and self.autocast_dtype != self.dtype
        with make_progress(disable=not show_progress) as progress:
            task = progress.add_task("encode", total=len(texts), status="", unit="caption")
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = {
                    k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx], instruction).items()
                }
                with torch.autocast(device.type, dtype=self.autocast_dtype or self.dtype, enabled=autocast):
                    emb = self(**batch)
                out[idx] = emb.float().cpu()
                progress.advance(task, len(idx))
        self.model.train(was_training)
        return out

    # -- persistence ------------------------------------------------------------------------
    def identity(self) -> str:
        """Stable hash of weights + model config + pooling settings (cached; stored at save time)."""
        if self._identity is None:
            config = self.model.config.to_dict()
            for volatile in (
                "_name_or_path",
                "transformers_version",
                "architectures",
                "dtype",
                "torch_dtype",
            ):
                config.pop(volatile, None)
            self._identity = self._combine(hash_state_dict(self.model.state_dict()), config)
        return self._identity

    def _combine(self, weights_sha: str, config: dict[str, Any]) -> str:
        blob = json.dumps(
            {"weights": weights_sha, "config": config, "settings": self.settings(), "format": FORMAT_VERSION},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model (safetensors), tokenizer and ``llm2clip_encoder.json`` to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        if hasattr(model, "merge_and_unload"):  # a PEFT wrapper: the saved embedder is standalone
            raise ValueError("merge the LoRA (merge_and_unload) before saving the CaptionEncoder")
        save_model(model, path)
        self.tokenizer.save_pretrained(path)
        meta = dict(self.settings(), format=FORMAT_VERSION, identity=self.identity())
        # A speed setting, not part of the identity: padding is masked out of every embedding.
        meta["pad_to_multiple_of"] = self.pad_to_multiple_of
        meta["weight_files"] = _weight_records(path)  # hashed once here, checked on every load
        (path / ENCODER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
    ) -> CaptionEncoder:
        """Load a saved encoder.

        Args:
            path: directory written by :meth:`save_pretrained`.
            device: where to put it (default: CUDA if available, else CPU).
            dtype: weight dtype (default: as saved).
            attn_implementation: ``sdpa`` or ``eager``.
        """
        path = Path(path)
        meta_file = path / ENCODER_FILE
        meta = read_encoder_meta(path)
        for key in ("pooling", "instructions", "max_length", "identity"):
            if key not in meta:
                raise BadInputFileError(f"{meta_file}: missing key {key!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ref = ModelRef(str(path))
        attention = meta.get("attention", "bidirectional")
        if attention not in ATTENTIONS:
            raise BadInputFileError(
                f"{meta_file}: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}"
            )
        load = load_causal if attention == "causal" else load_bidirectional
        model = load(ref, attn_implementation=attn_implementation, dtype=dtype or "auto")
        model.to(device)
        template = meta.get("caption_template")
        if template is not None and (not isinstance(template, str) or template.count("{text}") != 1):
            raise ValueError(
                f"{meta_file}: caption_template must be a string with one {{text}}, got {template!r}"
            )
        enc = cls(
            model,
            load_tokenizer(ref),
            int(meta["max_length"]),
            meta["instructions"],
            meta["pooling"],
            # As stage 1 padded (encoders saved before it was recorded: 16, the default then).
            pad_to_multiple_of=meta.get("pad_to_multiple_of", 16),
            caption_template=template,
            attention=attention,
        )
        if int(meta.get("dim", enc.hidden_size)) != enc.hidden_size:
            raise ValueError(f"{meta_file}: dim {meta['dim']} != model hidden size {enc.hidden_size}")
        # The identity of the weights on disk (checked against the save-time record); a weight
        # dtype change on load does change the embeddings, so it is folded in.
        identity = encoder_identity(path)
        enc._identity = (
            identity if dtype is None else hashlib.sha256(f"{identity}|{dtype}".encode()).hexdigest()
        )
        return enc


def _weight_records(path: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for f in folder_files(path, (".safetensors", ".bin", ".gguf")):
        st = f.stat()
        records[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)}
    return records


def encoder_identity(path: str | Path) -> str:
    """The identity of the encoder saved in ``path``, true to the weight files on disk.

    The saved identity when every weight file still has the size and sha256 recorded at save
    time (a file whose size and mtime are unchanged is not re-hashed); otherwise an identity
    derived from the files' actual hashes, with a warning, so stores made with the old weights
    are refused. Encoders saved before the record existed keep their saved identity (warned).

    Raises:
        FileNotFoundError: ``path`` holds no CaptionEncoder.
        ValueError: its ``llm2clip_encoder.json`` is unreadable.
    """

    path = Path(path)
    meta = read_encoder_meta(path)
    recorded: dict[str, dict[str, Any]] = meta.get("weight_files") or {}
    if not recorded:
        # Saved before weight records existed: its stores carry this identity; trust it, once more.
        log.warning("%s: saved without weight hashes; its identity is taken from %s", path, ENCODER_FILE)
        return str(meta["identity"])
    actual = _weight_records_quick(path, recorded)
    if actual == {k: v["sha256"] for k, v in recorded.items()}:
        return str(meta["identity"])
    changed = sorted(
        set(actual) ^ set(recorded) | {k for k in actual if recorded.get(k, {}).get("sha256") != actual[k]}
    )
    log.warning(
        "%s: weight file(s) %s differ from those the encoder was saved with; its identity is "
        "derived from the files now there", path, ", ".join(changed),
    )  # fmt: skip
    settings = {k: meta.get(k) for k in ("pooling", "instructions", "max_length", "dim", "format")}
    blob = json.dumps({"settings": settings, "weights": actual, "config": _config_text(path)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _weight_records_quick(path: Path, recorded: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{file: sha256}`` of the weight files now in ``path``; unchanged size+mtime reuse the record."""
    out = {}
    for f in folder_files(path, (".safetensors", ".bin", ".gguf")):
        st, rec = f.stat(), recorded.get(f.name, {})
        same = rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
        out[f.name] = rec["sha256"] if same and "sha256" in rec else file_sha256(f)
    return out


def _config_text(path: Path) -> str:
    config = path / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else ""
