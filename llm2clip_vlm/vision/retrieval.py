"""Zero-shot image-text retrieval metrics (R@1/5/10, both directions).

One similarity matrix ``[n_images, n_captions]`` and, per caption, the index of its image. That
covers multi-caption sets (COCO/Flickr: 5 captions per image; image -> text is a hit when *any*
of the image's captions ranks within k) and 1:1 long-caption sets (ShareGPT4V-1k, Urban-1k,
DOCCI) alike.

[IMPORTANT] Ties count against the model: a competitor with a score equal to the best true
match ranks ahead of it. A collapsed model (all features equal) therefore scores chance or less,
never 100%.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


def retrieval_ranks(
    similarity: torch.Tensor, caption_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the true match, per image (I2T) and per caption (T2I).

    Args:
        similarity: ``[n_images, n_captions]`` scores (higher = more similar).
        caption_image: ``[n_captions]`` index of each caption's image.
        chunk: rows/columns processed at a time (bounds memory on large sets).

    Returns:
        ``(i2t_rank [n_images], t2i_rank [n_captions])``.
    """
    n_images, n_captions = similarity.shape
    caption_image = caption_image.to(similarity.device).long()
    if caption_image.shape != (n_captions,):
        raise ValueError(f"caption_image has shape {tuple(caption_image.shape)}, expected ({n_captions},)")
    if n_captions and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError("caption_image holds an image index outside the similarity matrix")
    has_caption = torch.zeros(n_images, dtype=torch.bool, device=similarity.device)
    has_caption[caption_image] = True
    if not bool(has_caption.all()):
        raise ValueError(f"{int((~has_caption).sum())} images have no caption; they cannot be retrieved")

    i2t = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        sim = similarity[start : start + chunk]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        positive = caption_image[None, :] == rows[:, None]
        best = sim.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        # Only captions of other images compete; the image's other captions never hurt it.
        i2t[start : start + sim.shape[0]] = ((sim >= best) & ~positive).sum(dim=1).cpu()

    t2i = torch.empty(n_captions, dtype=torch.long)
    for start in range(0, n_captions, chunk):
        sim = similarity[:, start : start + chunk]
        owners = caption_image[start : start + sim.shape[1]]
        cols = torch.arange(sim.shape[1], device=sim.device)
        true = sim[owners, cols]
        beaten = sim >= true[None, :]
        beaten[owners, cols] = False
        t2i[start : start + sim.shape[1]] = beaten.sum(dim=0).cpu()
    return i2t, t2i


def retrieval_metrics(similarity: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float | int]:
    """``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10`` (percent), ``n_images``, ``n_captions``."""
    i2t, t2i = retrieval_ranks(similarity.float(), caption_image)
    out: dict[str, float | int] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = round(100.0 * float((ranks < k).float().mean()), 4)
    out["n_images"] = int(similarity.shape[0])
    out["n_captions"] = int(similarity.shape[1])
    return out
