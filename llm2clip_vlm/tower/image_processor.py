"""A CLIPImageProcessor-compatible view of a tower's image processor, for LLaVA's data code.

LLaVA-1.5/-NeXT read ``image_processor.crop_size['height']``, ``size['shortest_edge']`` and
``image_mean`` (pad-to-square colour, placeholder images for text-only samples, anyres tiling) and
call ``preprocess(image, return_tensors="pt")["pixel_values"]``. A CLIP processor has all of that.
A SigLIP processor resizes straight to ``size = {height, width}`` and has no ``crop_size``, so
LLaVA's code would fail on it; :func:`llava_image_processor` wraps such a processor in
:class:`SquareResizeProcessorView`, which adds the two fields and leaves preprocessing untouched.
"""

from __future__ import annotations

from typing import Any


def _field(size: Any, key: str) -> Any:
    # transformers 5 stores sizes as SizeDict (missing keys -> None); older ones as plain dicts.
    try:
        return size[key]
    except (KeyError, TypeError):
        return None


def is_llava_compatible(processor: Any) -> bool:
    """Whether LLaVA's data code can use ``processor`` as it is."""
    crop = getattr(processor, "crop_size", None)
    size = getattr(processor, "size", None)
    return (
        crop is not None
        and _field(crop, "height") is not None
        and _field(crop, "width") is not None
        and _field(size, "shortest_edge") is not None
        and getattr(processor, "image_mean", None) is not None
    )


class SquareResizeProcessorView:
    """Wraps a processor that resizes to a fixed ``(height, width)`` (SigLIP) for LLaVA's code.

    ``crop_size`` is the output size and ``size["shortest_edge"]`` its shorter side, which is what
    LLaVA assumes of a CLIP processor (resize the short side, centre-crop). ``preprocess`` and
    every other attribute are the wrapped processor's, so pixel values are bit-identical to it.
    """

    def __init__(self, processor: Any) -> None:
        height, width = _field(processor.size, "height"), _field(processor.size, "width")
        if height is None or width is None:
            raise ValueError(
                f"{type(processor).__name__}: size {processor.size!r} has no height/width and no "
                "crop_size; cannot present it as a CLIP image processor"
            )
        self._processor = processor
        self.crop_size = {"height": int(height), "width": int(width)}
        self.size = {"shortest_edge": int(min(height, width)), "height": int(height), "width": int(width)}

    @property
    def wrapped(self) -> Any:
        """The original image processor (save this one: it is what transformers reloads)."""
        return self._processor

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        """The wrapped processor's ``preprocess`` (same arguments, same output)."""
        return self._processor.preprocess(images, *args, **kwargs)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        return self._processor(images, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set here; guard against recursion during copy/unpickle.
        if name == "_processor":
            raise AttributeError(name)
        return getattr(self._processor, name)

    def __repr__(self) -> str:
        return f"SquareResizeProcessorView({self._processor!r})"


def llava_image_processor(processor: Any) -> Any:
    """``processor`` itself when LLaVA can use it, else a :class:`SquareResizeProcessorView` of it."""
    return processor if is_llava_compatible(processor) else SquareResizeProcessorView(processor)
