"""Cheap per-image statistics, the same at prepare time and at serving time, for input-drift checks.

Computed on the preprocessed uint8 images (the pixels the model sees), as whole-batch tensor ops.
"""

from __future__ import annotations

import torch

STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "sharpness", "red", "green", "blue", "saturation")
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def image_stats(images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Statistics of uint8 images ``[N, 3, H, W]`` as float32 ``[N, len(STAT_NAMES)]``, values in 0..1 units.

    brightness: mean luma; contrast: std of luma; sharpness: variance of the luma Laplacian (blur lowers it);
    red/green/blue: channel means; saturation: mean of (max - min) / max over channels.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    out = [_stats(images[i : i + batch]) for i in range(0, images.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, len(STAT_NAMES))


def _stats(chunk: torch.Tensor) -> torch.Tensor:
    x = chunk.float().div_(255.0)
    luma = (x * _LUMA).sum(1)
    # 4-neighbour Laplacian by shifted slices: cheaper than a 1-channel conv2d on small images.
    lap = (
        luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4 * luma[:, 1:-1, 1:-1]
    )
    top = x.amax(1)
    saturation = torch.where(top > 0, (top - x.amin(1)) / top.clamp_min(1e-6), torch.zeros_like(top))
    return torch.stack(
        [
            luma.mean((1, 2)),
            luma.std((1, 2)),
            lap.var((1, 2)),
            x[:, 0].mean((1, 2)),
            x[:, 1].mean((1, 2)),
            x[:, 2].mean((1, 2)),
            saturation.mean((1, 2)),
        ],
        dim=1,
    )


def reference_summary(values: torch.Tensor, names: tuple[str, ...], bins: int = 20) -> dict[str, dict]:
    """Mean, std, quantiles and a fixed-edge histogram per column: what a later drift check compares against."""
    summary: dict[str, dict] = {}
    for j, name in enumerate(names):
        col = values[:, j].double()
        lo, hi = float(col.min()), float(col.max())
        if hi <= lo:
            hi = lo + 1e-6
        counts = torch.histc(col, bins=bins, min=lo, max=hi)
        summary[name] = {
            "mean": float(col.mean()),
            "std": float(col.std()) if col.numel() > 1 else 0.0,
            "quantiles": dict(zip((f"p{round(q * 100)}" for q in QUANTILES), _quantiles(col), strict=True)),
            "histogram": {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": counts.long().tolist()},
        }
    return summary


def _quantiles(col: torch.Tensor) -> list[float]:
    return torch.quantile(col, torch.tensor(QUANTILES, dtype=col.dtype)).tolist()
