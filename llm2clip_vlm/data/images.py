"""Opening images safely, and the one bad-input policy every stage applies (stop, or skip + report).

Image policy (:func:`load_rgb`), the same for stage 2, the held-out sets and LLaVA data:

- ``RGB``: used as is. ``L``, ``1``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``:
  converted to RGB by PIL.
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour): composited on **white**.
  White, not the processor mean: transparent areas of logos, icons and product shots are meant to
  be seen on a light page, and white is what a browser shows; the processor mean is only the
  LLaVA ``pad`` colour for the padding *around* an image.
- 16-bit / 32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I``): scaled from 0..65535 to
  0..255 (``>> 8``), then grey -> RGB. Float images (``F``) and anything else are refused: their
  range is unknown, a guess would train on silently wrong pixels.
- More than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's decompression-bomb limit, ~89 M): refused
  *before* decoding, from the header alone, so a bomb never allocates its pixels.
- Unreadable, truncated (``LOAD_TRUNCATED_IMAGES`` stays off) or missing files: refused.

Every refusal is a :class:`~llm2clip_vlm.data.errors.DataError` naming the record and the problem.
:class:`~llm2clip_vlm.data.errors.BadRecords` applies the policy: stop at the first bad record (default), or with
``data.skip_bad`` skip, count, write ``bad_records.json`` and stop once more than
``data.max_bad_fraction`` is bad.
"""

from __future__ import annotations

import functools
import io
import signal
from pathlib import Path

from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.signals import TrainingInterrupted

log = get_logger(__name__)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CONVERTIBLE = ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")


def load_rgb(source: str | Path | bytes, where: str = ""):  # -> PIL.Image.Image
    """Open an image (a path or encoded bytes) as an RGB ``PIL.Image`` under the policy above.

    Args:
        source: file path or the encoded bytes (webdataset members).
        where: the record, for messages (``file:line``, ``shard.tar:key``).

    Raises:
        DataError: naming ``where``, the file and the problem.
    """
    import numpy as np
    from PIL import Image, ImageFile

    # Truncated files are bad data. Some libraries (lmms-eval's task module, at import) switch
    # PIL to padding truncated images with grey process-wide; training must not inherit that.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    _quiet_bomb_warning()
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    prefix = f"{where}: image {name}" if where else f"image {name}"
    try:
        src = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(src) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise DataError(
                    f"{prefix} is {img.width}x{img.height} = {img.width * img.height} pixels, above the "
                    f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS): a possible decompression bomb, refused"
                )
            img.load()
            mode = img.mode
            if mode == "RGB":
                return img.copy()
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGB", rgba.size, (255, 255, 255))
                white.paste(rgba, mask=rgba.getchannel("A"))
                return white
            if mode in _SIXTEEN_BIT:
                arr = np.asarray(img, dtype=np.int64)
                grey = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
                return Image.fromarray(grey, mode="L").convert("RGB")
            if mode in _CONVERTIBLE:
                return img.convert("RGB")
            raise DataError(
                f"{prefix} has unsupported mode {mode!r} (RGB, grey, palette, CMYK, alpha, 16-bit)"
            )
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{prefix}: {e} (a possible decompression bomb, refused)") from e
    except FileNotFoundError as e:
        raise DataError(f"{prefix} does not exist") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated, bad header
        lead = f"{where}: cannot read image {name}" if where else f"cannot read image {name}"
        raise DataError(f"{lead}: {type(e).__name__}: {e}") from e


@functools.cache
def _quiet_bomb_warning() -> None:
    """Silence PIL's ``DecompressionBombWarning`` (once per process).

    PIL warns in ``Image.open`` for images above ``MAX_IMAGE_PIXELS`` and raises above twice that;
    :func:`load_rgb` refuses everything above ``MAX_IMAGE_PIXELS`` itself, with a message naming
    the record, so the raw warning was only noise printed before that refusal. A process-wide
    filter rather than ``warnings.catch_warnings``: images are opened from several threads, and
    catch_warnings is not thread-safe.
    """
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def interrupted_check(signum: int, description: str) -> Exception:
    e = TrainingInterrupted(signum, None)
    name = signal.Signals(signum).name
    e.args = (f"stopped by {name} while {description} (nothing to save yet); run the same command again",)
    return e
