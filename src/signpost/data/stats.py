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
    # Pixel units (0..255) throughout, scaled once at the end. Variances are E[v²] - E[v]²: on CPU, torch.var over
    # two dims and torch.aminmax are ~10x slower than the plain means, amax and amin used here.
    x = chunk.float()
    r, g, b = x.unbind(1)
    luma = r.mul(0.299).add_(g, alpha=0.587).add_(b, alpha=0.114)
    # 4-neighbour Laplacian by shifted slices: cheaper than a 1-channel conv2d on small images.
    lap = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4 * luma[:, 1:-1, 1:-1]
    top, bottom = x.amax(1), x.amin(1)
    # (max - min) / max, and 0 for black pixels, where max = min = 0 and the clamp keeps the division defined.
    saturation = (top - bottom).div_(top.clamp_min(1)).mean((1, 2))
    channels = x.mean((2, 3)) / 255
    return torch.stack(
        [
            luma.mean((1, 2)) / 255,
            _std(luma) / 255,
            _std(lap) ** 2 / 255**2,
            channels[:, 0],
            channels[:, 1],
            channels[:, 2],
            saturation,
        ],
        dim=1,
    )


def _std(v: torch.Tensor) -> torch.Tensor:
    """Per-image population standard deviation of ``v`` [B, H, W]; the difference is taken in float64."""
    mean = v.mean((1, 2)).double()
    mean_sq = (v * v).mean((1, 2)).double()
    return (mean_sq - mean * mean).clamp_min(0).sqrt().float()


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
