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

Every refusal is a :class:`~llm2clip_vlm.data.captions.DataError` naming the record and the problem.
:class:`BadRecords` applies the policy: stop at the first bad record (default), or with
``data.skip_bad`` skip, count, write ``bad_records.json`` and stop once more than
``data.max_bad_fraction`` is bad.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

REPORT_FILE = "bad_records.json"
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CONVERTIBLE = ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")


def _data_error(message: str) -> Exception:
    from llm2clip_vlm.data.captions import DataError

    return DataError(message)


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

    from llm2clip_vlm.data.captions import DataError

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
                raise _data_error(
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
            raise _data_error(
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


class BadRecords:
    """The bad-input policy: stop at the first bad record, or skip, count and report.

    Args:
        skip_bad: skip bad records instead of stopping (``data.skip_bad``).
        max_bad_fraction: with ``skip_bad``, stop anyway above this share (``data.max_bad_fraction``).
        name: the data set, for messages and the report.
        option: the config key that turns skipping on, named in the error.
        earlier: records of the same data set already skipped by an earlier phase (reading the
            manifest): ``max_bad_fraction`` bounds the total over all phases, not each phase.
    """

    def __init__(
        self,
        skip_bad: bool = False,
        max_bad_fraction: float = 0.01,
        name: str = "",
        option: str = "data.skip_bad",
        earlier: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.skip_bad, self.max_bad_fraction, self.name, self.option = (
            skip_bad,
            max_bad_fraction,
            name,
            option,
        )
        self.skipped: list[tuple[str, str]] = []
        self.earlier = list(earlier)

    def add(self, where: str, error: Exception) -> None:
        """Record a bad record; raises at once unless skipping."""
        if not self.skip_bad:
            raise _data_error(f"{error} (set {self.option}=true to skip bad records)") from error
        self.skipped.append((where, str(error)))

    def check(self, total: int) -> None:
        """After a pass over ``total`` records: log the skips and stop if too many were bad.

        ``total`` counts the records this phase saw; the earlier phases' skips are added to both
        the bad and the total count.
        """
        if not self.skipped:
            return
        bad, total = len(self.skipped) + len(self.earlier), total + len(self.earlier)
        share = bad / max(total, 1)
        log.warning(
            "%s: skipped %d of %d records (%.1f%%); first: %s",
            self.name, len(self.skipped), total, 100 * share, self.skipped[0][1],
        )  # fmt: skip
        if share > self.max_bad_fraction:
            phases = f" ({len(self.earlier)} when reading, {len(self.skipped)} here)" if self.earlier else ""
            first = (self.earlier or self.skipped)[0][1]
            raise _data_error(
                f"{self.name}: {bad} of {total} records are bad{phases} ({100 * share:.1f}% > "
                f"max_bad_fraction {100 * self.max_bad_fraction:.1f}%); first: {first}"
            )


def write_report(
    out_dir: str | Path, name: str, total: int, skipped: Sequence[tuple[str, str]]
) -> Path | None:
    """Add the skipped records of data set ``name`` to ``<out_dir>/bad_records.json`` (merged).

    The report maps each data set to ``{"records": total, "skipped": [{"record", "reason"}, ...]}``.
    Nothing is written when nothing was skipped and there is no report yet.
    """
    path = Path(out_dir) / REPORT_FILE
    if not skipped and not path.is_file():
        return None
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    entry = report.setdefault(name, {"records": total, "skipped": []})
    entry["records"] = max(int(entry.get("records", 0)), total)
    seen = {s["record"] for s in entry["skipped"]}
    entry["skipped"] += [{"record": w, "reason": r} for w, r in skipped if w not in seen]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def find_bad_images(
    records: Sequence[Any],
    policy: BadRecords,
    load: Callable[[Any], Any],
    workers: int = 4,
    description: str = "checking images",
) -> list[int]:
    """Decode every record's image once; return the indices of the usable ones.

    Bad images go through ``policy`` (stop at the first, or skip and count; then
    :meth:`BadRecords.check`). Decoding runs in threads (PIL releases the GIL while decoding).
    """
    from llm2clip_vlm.data.captions import DataError
    from llm2clip_vlm.progress import make_progress

    def probe(i: int) -> Exception | None:
        try:
            load(records[i])
            return None
        except DataError as e:
            return e

    from llm2clip_vlm.checkpointing import GracefulExit

    good: list[int] = []
    # SIGTERM/SIGINT stop the check at the next image with a message (and 128 + signal), rather
    # than killing the process silently; there is nothing to save yet.
    with GracefulExit() as signals, make_progress() as progress:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            task = progress.add_task(description, total=len(records), status="", unit="image")
            for i, error in enumerate(pool.map(probe, range(len(records)))):
                if signals.requested is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                    break
                if error is None:
                    good.append(i)
                else:
                    r = records[i]
                    policy.add(getattr(r, "source", "") or getattr(r, "key", str(i)), error)
                progress.advance(task)
        if signals.requested is not None:
            raise _interrupted_check(signals.requested, description)
    policy.check(len(records))
    return good


def _interrupted_check(signum: int, description: str) -> Exception:
    import signal

    from llm2clip_vlm.checkpointing import TrainingInterrupted

    e = TrainingInterrupted(signum, None)
    name = signal.Signals(signum).name
    e.args = (f"stopped by {name} while {description} (nothing to save yet); run the same command again",)
    return e
