"""The fast training data path: batches from an in-memory uint8 cache, augmented as whole-batch tensor ops.

The prepare stage decodes every image once into a uint8 tensor [N, 3, H, W]. ``BatchLoader`` moves it to the
training device once (all of GTSRB at 32x32 is ~150 MiB, so on a GPU it all stays there); after that a batch
is an index, a uint8 -> float conversion, ``augment_batch`` and a normalization: a fixed handful of tensor ops per
batch, none per image, and no host-device synchronisation inside the epoch.

Augmentation draws one row of random numbers per image, as one tensor, and applies them all at once: one affine
warp (translation, scale, rotation) through ``affine_grid`` + ``grid_sample``, brightness, contrast and saturation
jitter, and a 3x3 Gaussian blur for a random share of the batch. There are no flips, horizontal or vertical: a
mirrored "turn left ahead" sign is a "turn right ahead" sign ("dangerous curve to the left" becomes "... to the
right"), so a flip would teach the model wrong labels.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from signpost.config import AugmentConfig

log = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the grayscale torchvision's colour jitter uses.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Columns of the per-image random draw. All are drawn every time, so the random stream (and with it every other
# op's parameters) does not change when one op is switched off.
_TX, _TY, _SCALE, _ROT, _BRIGHT, _CONTRAST, _SAT, _BLUR = range(8)
_NUM_PARAMS = 8
_MASK64 = (1 << 64) - 1


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a float batch [B,3,H,W] with values in [0,1], all images at once, on x's device.

    Returns a new tensor with values in [0, 1] and leaves ``x`` as it is (when every op is off, ``x`` itself is
    returned). Random numbers come from ``generator`` when given: one on x's device is used directly, a CPU one
    draws the B x 8 parameters on the CPU and copies them over. An op whose strength is 0 is skipped.
    """
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"augment_batch expects a float tensor [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    if not cfg.enabled or x.shape[0] == 0:
        return x
    p = _params(_uniform((x.shape[0], _NUM_PARAMS), generator, x.device, x.dtype), cfg)
    out = x
    if cfg.translate > 0 or cfg.rotate_deg > 0 or cfg.scale_min != 1 or cfg.scale_max != 1:
        out = _warp(out, cfg, p)
    if cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0:
        out = _color_jitter(out, cfg, p)
    if cfg.blur_prob > 0:
        out = _blur_some(out, p[:, _BLUR] < cfg.blur_prob, inplace=out is not x)
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a batch [B,3,H,W]; mean and std in x's units (0..1 for images).

    Builds the two small constant tensors on each call (a host-to-device copy on a GPU); the loader keeps its own.
    """
    _check_stats(mean, std)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize expects a batch [B, 3, H, W], got shape {tuple(x.shape)}")
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class BatchLoader:
    """Batches from an in-memory uint8 cache, augmented and normalized as whole-batch tensor ops on `device`.

    Each epoch the indices are permuted by a generator seeded with (seed, epoch), the same on every rank, padded
    by wrapping around to a multiple of ``world_size`` (as torch's DistributedSampler does), and rank r takes
    every ``world_size``-th index starting at r. ``batch_size`` is per rank. The same seed, epoch and rank give the
    same batches, augmentation included, which an exact resume needs; call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor [N, 3, H, W], got {_describe(images)}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be 4-D [N, 3, H, W] with 3 channels, got {_describe(images)}")
        if images.shape[0] == 0:
            raise ValueError("images is empty: the loader needs at least one image")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor [N], got {_describe(labels)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must hold integer class ids, got {_describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but images has {images.shape[0]}; they must match"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size ({world_size}), got {rank}")
        _check_stats(mean, std)

        # The whole cache goes to the device once, here; batches are then gathered on the device.
        self.images = images.to(device).contiguous()
        self.labels = labels.to(self.images.device, dtype=torch.int64)
        self.device = self.images.device  # "cuda" resolved to "cuda:0", where the generators must live
        self.batch_size = batch_size
        self.augment = augment if augment is not None and augment.enabled else None
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.generator: torch.Generator | None = None  # the augmentation generator of the current iteration
        self.samples_per_rank = math.ceil(self.images.shape[0] / world_size)

        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._mean, self._std = mean_t, std_t
        # Without augmentation, uint8 -> normalized float is one multiply-add: x / (255 std) - mean / std.
        self._u8_scale, self._u8_shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        log.debug(
            "BatchLoader: %d images %s on %s, batch %d per rank, rank %d of %d, %d batches per epoch, augment %s",
            self.images.shape[0], tuple(self.images.shape[1:]), self.device, batch_size, rank, world_size,
            len(self), "on" if self.augment else "off",
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x float32 normalized [B,3,H,W], y int64 [B]), both on the device, for this rank's shard."""
        return self.iterate()

    def iterate(
        self, start: int = 0, generator_state: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch ``start`` on; to resume mid-epoch exactly, pass the augmentation
        generator's state saved (``generator.get_state()``) after batch ``start - 1``.
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in 0..{len(self)}, got {start}")
        indices = self._shard_indices()
        # A fresh generator per iteration: two iterations of one epoch give the same batches.
        self.generator = self._augment_generator() if self.augment is not None else None
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)
        aug_gen = self.generator
        for b in range(start, len(self)):
            # Slicing and gathering stay on the device: no host-device sync in this loop.
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            raw = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            if self.augment is None:
                x = torch.addcmul(self._u8_shift, raw.to(torch.float32), self._u8_scale)
            else:
                x = augment_batch(raw.to(torch.float32).div_(255.0), self.augment, aug_gen)
                x = x.sub_(self._mean).div_(self._std)  # in place: cheaper here than a broadcasting addcmul
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _shard_indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, on the device."""
        n = self.images.shape[0]
        if self.shuffle:
            # A CPU generator: every rank draws the same permutation, whatever its device.
            gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            # Wrap around to the start of the order (several times when n < world_size) so that every rank
            # gets the same number of samples.
            order = order.repeat(math.ceil(total / n))[:total]
        # One small host-to-device copy per epoch (8 bytes per index); the batch loop only slices it.
        return order[self.rank :: self.world_size].to(self.device)

    def _augment_generator(self) -> torch.Generator:
        """A generator for this epoch and rank, on the device so that parameters never cross from the host."""
        seed = _mix(self.seed, self.epoch, self.rank, 1)
        try:
            return torch.Generator(device=self.device).manual_seed(seed)
        except RuntimeError:
            # A device type without generators of its own: augment_batch then draws on the CPU and copies.
            return torch.Generator().manual_seed(seed)


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Uniform [0, 1) numbers on ``device``, drawn from ``generator`` on whichever device it lives."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    # A CPU generator cannot feed a CUDA op: draw where the generator lives, then move (no-op on the same device).
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    return u.to(device, non_blocking=True)


def _params(u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Every op's per-image parameter from uniform draws [B, 8], in one multiply-add: column k is uniform in
    [low_k, low_k + span_k]. Translations are in affine_grid's normalized units (the side spans 2), rotations in
    radians, the jitter factors around 1, and the blur column stays uniform in [0, 1) to compare with blur_prob.
    """
    low, span = _ranges(
        (cfg.translate, cfg.scale_min, cfg.scale_max, cfg.rotate_deg, cfg.brightness, cfg.contrast, cfg.saturation),
        u.device,
        u.dtype,
    )
    return torch.addcmul(low, u, span)


@functools.lru_cache(maxsize=16)
def _ranges(
    strengths: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The low ends and spans of the 8 parameter columns; cached, so a GPU gets them once, not every batch."""
    translate, scale_min, scale_max, rotate_deg, brightness, contrast, saturation = strengths
    rot = math.radians(rotate_deg)
    low = [-2 * translate, -2 * translate, scale_min, -rot, 1 - brightness, 1 - contrast, 1 - saturation, 0.0]
    span = [4 * translate, 4 * translate, scale_max - scale_min, 2 * rot, 2 * brightness, 2 * contrast,
            2 * saturation, 1.0]  # fmt: skip
    return torch.tensor(low, device=device, dtype=dtype), torch.tensor(span, device=device, dtype=dtype)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [B,1,H,W]; Python-scalar weights, so no weight tensor is built (a host-to-device copy on a GPU)."""
    r, g, b = x.unbind(dim=1)
    w = _GRAY_WEIGHTS
    return r.mul(w[0]).add_(g, alpha=w[1]).add_(b, alpha=w[2]).unsqueeze(1)


def _warp(x: torch.Tensor, cfg: AugmentConfig, p: torch.Tensor) -> torch.Tensor:
    """One bilinear affine warp for the whole batch: per-image translation, scale and rotation (``p`` from
    ``_params``; in normalized coordinates the image side spans 2, so a shift of f * side is 2 f)."""
    n, _, h, w = x.shape
    angle, scale, tx, ty = p[:, _ROT], p[:, _SCALE], p[:, _TX], p[:, _TY]
    # affine_grid maps output to input coordinates, so theta inverts "rotate by angle, zoom by scale, move by t":
    # A = R(-angle) / scale (the h/w factors keep the rotation rigid in normalized coordinates when h != w), and
    # the offset is -A t.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a11, a12, a21, a22 = (v.view(n, 1, 1) for v in (cos, sin * (h / w), -sin * (w / h), cos))
    tx, ty = tx.view(n, 1, 1), ty.view(n, 1, 1)
    # The sampling grid affine_grid would build, as broadcast multiply-adds over the pixel centres: affine_grid's
    # [B, H, W, 3] base grid and batched 3x2 matmul cost ~3x more on a 2-core CPU.
    xs = _pixel_centres(w, x.device, x.dtype).view(1, 1, w)
    ys = _pixel_centres(h, x.device, x.dtype).view(1, h, 1)
    dx, dy = xs - tx, ys - ty
    # Built as [B, 2, H, W] and viewed as the [B, H, W, 2] grid_sample wants: interleaving with stack costs more.
    grid = torch.cat([a11 * dx + a12 * dy, a21 * dx + a22 * dy], dim=1).view(n, 2, h, w).permute(0, 2, 3, 1)
    # "border" repeats the edge pixels (the sign's background) into the uncovered corners. "reflection" would
    # mirror the sign's own edge into view, a partial flip of the kind we refuse to train on; "zeros" would add
    # black corners that real crops never have.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pixel_centres(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalized coordinates of n pixel centres, as affine_grid uses them with align_corners=False."""
    return torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=device, dtype=dtype)


def _color_jitter(x: torch.Tensor, cfg: AugmentConfig, p: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each with a per-image factor drawn from 1 ± its strength.

    Brightness multiplies by b; contrast blends with the image's mean gray level m (y -> c y + (1 - c) m);
    saturation blends with the grayscale image g (y -> s y + (1 - s) g). Each step is affine per image and g, m
    are linear in the image, so the three compose exactly into b c s x + (1 - s) b c g(x) + b (1 - c) m(x): one
    pass over the batch instead of three, clamped once at the end (torchvision clamps after each step; the
    results differ only where an intermediate value left [0, 1]). A strength of 0 gives a factor of 1.
    """
    bright, contrast, sat = p[:, _BRIGHT], p[:, _CONTRAST], p[:, _SAT]
    scale = _per_image(bright * contrast * sat)
    if cfg.contrast == 0 and cfg.saturation == 0:
        return (x * scale).clamp_(0, 1)
    gray = _grayscale(x)
    offset = gray * _per_image((1 - sat) * bright * contrast)
    offset += _per_image(bright * (1 - contrast)) * gray.mean(dim=(1, 2, 3), keepdim=True)
    return torch.addcmul(offset, x, scale).clamp_(0, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian ([1, 2, 1] / 4 in each direction) blur of every image; edges replicated, so no dark rim.

    The kernel is separable, so the depthwise 3x3 conv is written as two passes of shifted adds: the same result
    up to rounding, and on a 2-core CPU faster than ``F.conv2d(..., groups=3)`` (~0.9 vs ~1.9 ms at batch 256,
    32x32).
    """
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = torch.add(p[..., :, :-2], p[..., :, 2:]).add_(p[..., :, 1:-1], alpha=2)
    return torch.add(rows[..., :-2, :], rows[..., 2:, :]).add_(rows[..., 1:-1, :], alpha=2).mul_(1 / 16)


def _blur_some(x: torch.Tensor, chosen: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Blur the images where ``chosen`` [B] is true; in x itself when ``inplace`` (and on the CPU)."""
    if x.device.type == "cpu":
        # On the CPU there is no device to wait for, so gather just the chosen images (a tenth of the batch by
        # default): blurring the whole batch and selecting with torch.where made a default-augmented epoch
        # ~1.3-1.5x slower on a 2-core CPU.
        idx = chosen.nonzero().squeeze(1)
        blurred = _blur(x.index_select(0, idx))
        return x.index_copy_(0, idx, blurred) if inplace else x.index_copy(0, idx, blurred)
    # On a GPU the size of the chosen subset would have to come to the host (a sync that stalls the stream);
    # blurring the whole batch and picking per image with torch.where keeps it asynchronous, and costs little there.
    return torch.where(chosen.view(-1, 1, 1, 1), _blur(x), x)


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3:
        raise ValueError(f"mean must have 3 values (one per channel), got {len(mean)}: {list(mean)}")
    if len(std) != 3:
        raise ValueError(f"std must have 3 values (one per channel), got {len(std)}: {list(std)}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be > 0 for every channel, got {list(std)}")


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): unlike seed + epoch, (1, 0) and (0, 1) differ."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1
