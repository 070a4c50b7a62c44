"""Known third-party noise that reaches our users' logs, silenced here where its source is not ours.

Fixed at the source (so not listed here): transformers' ``gradient_checkpointing_enable`` /
``is_gradient_checkpointing`` deprecations in our own calls (we call ``activation_checkpointing_*``),
peft's "Could not find a config file" on every checkpoint (we pass ``save_embedding_layers=False``:
no LoRA targets the embeddings), PIL's ``DecompressionBombWarning`` printed before our own refusal
(:func:`llm2clip_vlm.data.images.load_rgb` refuses every image PIL would warn about).

Filtered here, one precise message each (nothing else from these libraries is hidden):

- bitsandbytes (CPU with avx512_bf16) logs ``Failed to load CPU gemm_4bit_forward from
  kernels-community`` when peft imports it, i.e. on every command: it could not download an optional
  hub kernel and falls back to its own; nothing is wrong and nothing can be done offline.
- peft's ``PeftModel.__init__`` reads transformers' deprecated ``is_gradient_checkpointing``
  property, a ``FutureWarning`` on every LoRA wrap that only peft can fix.

Imports nothing heavy: it touches logger objects and the warnings filter list only.
"""

from __future__ import annotations

import logging
import warnings

BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drop log records whose message template starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_third_party() -> None:
    """Install the filters above (idempotent; before or after the libraries are imported)."""
    bnb = logging.getLogger(BNB_LOGGER)  # the same object bitsandbytes' module will log through
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage(BNB_KERNEL_MESSAGE))
    # filterwarnings de-duplicates an identical filter, so calling this twice adds nothing.
    warnings.filterwarnings("ignore", message=GC_DEPRECATION, category=FutureWarning)
