"""The batch loader and whole-batch augmentation: shapes, sharding, determinism, and what each op does."""

from __future__ import annotations

import pytest
import torch

from signpost.config import AugmentConfig
from signpost.data import loader as loader_module
from signpost.data.loader import BatchLoader, augment_batch, normalize

MEAN = [0.4, 0.5, 0.6]
STD = [0.2, 0.25, 0.3]
OFF = {
    "translate": 0.0,
    "scale_min": 1.0,
    "scale_max": 1.0,
    "rotate_deg": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "blur_prob": 0.0,
}


def only(**strengths: float) -> AugmentConfig:
    """An augmentation config with every op off except the ones named."""
    return AugmentConfig(**{**OFF, **strengths})


def make_data(n: int = 50, side: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return images, torch.arange(n)  # label = index, so batches show which images they hold


def collect(loader: BatchLoader) -> tuple[list[torch.Tensor], torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return list(xs), torch.cat(ys)


def centroid(img: torch.Tensor) -> torch.Tensor:
    """(x, y) intensity centroid of each image of a batch [B, C, H, W], in pixels."""
    mass = img.sum(dim=1)
    h, w = mass.shape[-2:]
    total = mass.sum(dim=(1, 2))
    cx = (mass.sum(dim=1) * torch.arange(w)).sum(dim=1) / total
    cy = (mass.sum(dim=2) * torch.arange(h)).sum(dim=1) / total
    return torch.stack([cx, cy], dim=1)


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between horizontal and vertical neighbours, per image."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean(dim=(1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
    return dx + dy


# --- the batches: shapes, dtypes, normalization ---


def test_batches_have_the_right_shapes_dtypes_and_device() -> None:
    images, labels = make_data(50)
    loader = BatchLoader(images, labels, 16, mean=MEAN, std=STD, augment=AugmentConfig())
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [x.shape[0] for x, _ in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.shape[1:] == (3, 8, 8)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == "cpu" and y.device.type == "cpu"
        assert x.is_contiguous()


def test_channels_last_when_requested() -> None:
    images, labels = make_data(20)
    for augment in (None, AugmentConfig()):
        loader = BatchLoader(images, labels, 8, mean=MEAN, std=STD, augment=augment, channels_last=True)
        for x, _ in loader:
            assert x.is_contiguous(memory_format=torch.channels_last)


def test_normalization_without_augmentation_matches_manual_computation() -> None:
    images, labels = make_data(30)
    for augment in (None, AugmentConfig(enabled=False)):
        loader = BatchLoader(images, labels, 7, mean=MEAN, std=STD, augment=augment, shuffle=False)
        x = torch.cat([xb for xb, _ in loader])
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        expected = (images.float() / 255 - mean) / std
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_normalize_function() -> None:
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, MEAN, STD), expected)


def test_shuffle_false_keeps_order_and_drop_last_drops_the_short_batch() -> None:
    images, labels = make_data(10)
    loader = BatchLoader(images, labels, 4, mean=MEAN, std=STD, shuffle=False)
    assert collect(loader)[1].tolist() == list(range(10))
    dropping = BatchLoader(images, labels, 4, mean=MEAN, std=STD, shuffle=False, drop_last=True)
    assert len(dropping) == 2
    assert collect(dropping)[1].tolist() == list(range(8))


# --- epochs and shards ---


@pytest.mark.parametrize(("n", "batch_size"), [(50, 16), (64, 8), (7, 32)])
def test_every_image_once_per_epoch(n: int, batch_size: int) -> None:
    images, labels = make_data(n)
    loader = BatchLoader(images, labels, batch_size, mean=MEAN, std=STD, augment=AugmentConfig(), seed=3)
    for epoch in range(2):
        loader.set_epoch(epoch)
        xs, ys = collect(loader)
        assert len(xs) == len(loader)
        assert sorted(ys.tolist()) == list(range(n))
    assert ys.tolist() != list(range(n))  # shuffled


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [50, 51, 2])
def test_shards_are_disjoint_apart_from_padding_and_cover_the_dataset(world_size: int, n: int) -> None:
    images, labels = make_data(n)
    shards = []
    lengths = set()
    for rank in range(world_size):
        loader = BatchLoader(
            images, labels, 4, mean=MEAN, std=STD, seed=5, rank=rank, world_size=world_size, augment=AugmentConfig()
        )
        loader.set_epoch(1)
        xs, ys = collect(loader)
        assert len(xs) == len(loader)
        lengths.add(len(loader))
        shards.append(ys.tolist())
    assert len(lengths) == 1  # every rank takes the same number of steps
    per_rank = -(-n // world_size)
    assert all(len(s) == per_rank for s in shards)
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(n))
    padding = per_rank * world_size - n
    assert len(everything) - len(set(everything)) == padding
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert len(set(shards[a]) & set(shards[b])) <= padding


def test_ranks_agree_on_the_permutation() -> None:
    images, labels = make_data(40)
    ranks = [
        collect(BatchLoader(images, labels, 5, mean=MEAN, std=STD, seed=9, rank=r, world_size=2))[1]
        for r in range(2)
    ]
    single = collect(BatchLoader(images, labels, 5, mean=MEAN, std=STD, seed=9))[1]
    interleaved = torch.stack(ranks, dim=1).flatten()
    assert interleaved.tolist() == single.tolist()


# --- determinism ---


def test_same_seed_and_epoch_give_identical_batches() -> None:
    images, labels = make_data(40)

    def run(epoch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = BatchLoader(images, labels, 16, mean=MEAN, std=STD, augment=AugmentConfig(), seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    first, again = run(2), run(2)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = run(3)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other_epoch]))
    other_seed = run(2, seed=2)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other_seed]))


def test_iterating_one_epoch_twice_repeats_it() -> None:
    images, labels = make_data(20)
    loader = BatchLoader(images, labels, 8, mean=MEAN, std=STD, augment=AugmentConfig())
    for (xa, ya), (xb, yb) in zip(loader, loader, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augment_batch_is_deterministic_given_a_generator() -> None:
    x = torch.rand(16, 3, 12, 12)
    a = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(4))
    b = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(4))
    c = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- what the augmentation does ---


def test_augmented_output_stays_in_the_normalized_image_range() -> None:
    images, labels = make_data(64, side=16)
    strong = AugmentConfig(translate=0.3, rotate_deg=30, scale_min=0.7, scale_max=1.5, brightness=1.0,
                           contrast=1.0, saturation=1.0, blur_prob=0.5)  # fmt: skip
    low = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for cfg in (AugmentConfig(), strong):
        for x, _ in BatchLoader(images, labels, 32, mean=MEAN, std=STD, augment=cfg):
            assert torch.all(x >= low - 1e-5) and torch.all(x <= high + 1e-5)


def test_all_strengths_zero_is_the_identity() -> None:
    x = torch.rand(8, 3, 10, 10)
    torch.testing.assert_close(augment_batch(x, only()), x)
    images, labels = make_data(20)
    plain = BatchLoader(images, labels, 8, mean=MEAN, std=STD, augment=None, seed=2)
    zero = BatchLoader(images, labels, 8, mean=MEAN, std=STD, augment=only(), seed=2)
    for (xa, ya), (xb, yb) in zip(plain, zero, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-5)


def test_an_identity_warp_leaves_the_image_unchanged() -> None:
    # Scale drawn from [1, 1 + 1e-6]: the warp runs, but with (almost) the identity transform.
    x = torch.rand(8, 3, 16, 16)
    out = augment_batch(x, only(scale_max=1.000001), torch.Generator().manual_seed(0))
    assert out is not x
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)


def test_translation_moves_a_bright_dot() -> None:
    side, translate = 32, 0.2
    x = torch.zeros(64, 3, side, side)
    x[:, :, 15:17, 15:17] = 1.0  # a 2x2 dot at the centre
    out = augment_batch(x, only(translate=translate), torch.Generator().manual_seed(1))
    shift = centroid(out) - centroid(x)
    # Every image moved (the chance of a shift under 0.5 px on both axes is ~1 %: check most, not all) ...
    assert (shift.abs().max(dim=1).values > 0.5).float().mean() > 0.9
    # ... by at most the configured share of the side, in both directions across the batch.
    assert shift.abs().max() <= translate * side + 0.5
    assert (shift > 1).any(dim=0).all() and (shift < -1).any(dim=0).all()
    # A pure translation keeps the dot's brightness.
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=1e-3, atol=1e-3)


def test_warp_geometry_with_chosen_parameters() -> None:
    # Parameters at the top of their ranges: the dot moves by +translate * side on x, half that on y ...
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 15:17, 15:17] = 1.0
    u = torch.full((1, 8), 0.5)
    u[0, loader_module._TX], u[0, loader_module._TY] = 1.0, 0.75
    out = loader_module._warp(x, only(translate=0.1), loader_module._params(u, only(translate=0.1)))
    torch.testing.assert_close(centroid(out) - centroid(x), torch.tensor([[3.2, 1.6]]), rtol=0, atol=1e-3)
    # ... and a zoom of 1.5 makes a centred square 1.5^2 times larger.
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    u = torch.full((1, 8), 0.5)
    u[0, loader_module._SCALE] = 1.0
    out = loader_module._warp(x, only(scale_max=1.5), loader_module._params(u, only(scale_max=1.5)))
    torch.testing.assert_close(out.sum() / x.sum(), torch.tensor(2.25), rtol=1e-3, atol=0)


def test_fused_color_jitter_equals_the_three_steps_in_turn() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * 0.4 + 0.3  # mid-range, so no intermediate value is clamped
    u = torch.rand(64, 8, generator=g)
    cfg = only(brightness=0.3, contrast=0.3, saturation=0.3)

    def factor(column: int) -> torch.Tensor:
        return (1 + 0.3 * (2 * u[:, column] - 1)).view(-1, 1, 1, 1)

    def gray(y: torch.Tensor) -> torch.Tensor:
        return (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)

    y = x * factor(loader_module._BRIGHT)
    c = factor(loader_module._CONTRAST)
    y = c * y + (1 - c) * gray(y).mean(dim=(1, 2, 3), keepdim=True)
    s = factor(loader_module._SAT)
    y = s * y + (1 - s) * gray(y)
    jittered = loader_module._color_jitter(x, cfg, loader_module._params(u, cfg))
    torch.testing.assert_close(jittered, y.clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_brightness_only_scales_each_image() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 3, 8, 8, generator=g) * 0.5 + 0.1  # far enough from 0 and 1 that nothing is clamped
    out = augment_batch(x, only(brightness=0.3), torch.Generator().manual_seed(3))
    ratio = out / x
    per_image = ratio.flatten(1)
    # One factor per image, the same for every pixel and channel, within 1 +- 0.3 ...
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image), rtol=1e-5, atol=1e-5)
    assert per_image.min() >= 0.7 - 1e-5 and per_image.max() <= 1.3 + 1e-5
    # ... so the mean intensity changes and the structure does not.
    assert not torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-3)


def test_saturation_leaves_a_gray_image_gray_and_contrast_keeps_its_mean() -> None:
    x = torch.rand(16, 1, 8, 8).expand(16, 3, 8, 8).contiguous() * 0.6 + 0.2
    out = augment_batch(x, only(saturation=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    out = augment_batch(x, only(contrast=0.3), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, x, atol=1e-3)


def test_no_flips_the_bright_left_half_stays_left_and_the_top_stays_up() -> None:
    x = torch.full((128, 3, 32, 32), 0.1)
    x[..., :16] = 0.9  # bright left half
    out = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.all(out[..., :16].mean(dim=(1, 2, 3)) > out[..., 16:].mean(dim=(1, 2, 3)) + 0.1)
    x = x.transpose(2, 3).contiguous()  # bright top half
    out = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(1))
    assert torch.all(out[..., :16, :].mean(dim=(1, 2, 3)) > out[..., 16:, :].mean(dim=(1, 2, 3)) + 0.1)


def test_blur_removes_the_high_frequencies_of_a_checkerboard() -> None:
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = ((yy + xx) % 2).float().expand(8, 3, 16, 16).contiguous()
    before = board.clone()
    blurred = augment_batch(board, only(blur_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(board, before)  # the input is left alone
    assert torch.all(high_freq_energy(blurred) < 0.1 * high_freq_energy(board))
    assert torch.all(blurred >= 0) and torch.all(blurred <= 1)
    untouched = augment_batch(board, only(blur_prob=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(untouched, board)


def test_blur_prob_picks_a_share_of_the_batch() -> None:
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    board = ((yy + xx) % 2).float().expand(1000, 3, 8, 8).contiguous()
    out = augment_batch(board, only(blur_prob=0.3), torch.Generator().manual_seed(0))
    blurred = high_freq_energy(out) < 0.5 * high_freq_energy(board)
    assert 0.22 < blurred.float().mean() < 0.38
    assert torch.equal(out[~blurred], board[~blurred])


def test_augment_batch_leaves_its_input_alone_and_accepts_a_generator_free_call() -> None:
    x = torch.rand(4, 3, 8, 8)
    before = x.clone()
    out = augment_batch(x, AugmentConfig())
    assert torch.equal(x, before)
    assert out.shape == x.shape and out is not x


# --- bad inputs ---


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": torch.zeros(4, 3, 8, 8)}, "uint8"),
        ({"images": torch.zeros(4, 8, 8, dtype=torch.uint8)}, "4-D"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, "3 channels"),
        ({"images": torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(0)}, "empty"),
        ({"labels": torch.zeros(4, 1, dtype=torch.int64)}, "1-D"),
        ({"labels": torch.zeros(4)}, "integer"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, "must match"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"mean": [0.5, 0.5]}, "mean must have 3"),
        ({"std": [0.5, 0.5, 0.5, 0.5]}, "std must have 3"),
        ({"std": [0.5, 0.0, 0.5]}, "std must be > 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(change: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {
        "images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        "labels": torch.zeros(4, dtype=torch.int64),
        "batch_size": 2,
        "mean": MEAN,
        "std": STD,
    }
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        BatchLoader(**kwargs)  # type: ignore[arg-type]


def test_bad_arguments_to_the_functions_raise() -> None:
    with pytest.raises(ValueError, match="float tensor"):
        augment_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize(torch.rand(2, 3, 4, 4), MEAN, [1.0, -1.0, 1.0])
    loader = BatchLoader(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 1,
                         mean=MEAN, std=STD)  # fmt: skip
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)


# --- on a GPU ---


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_stay_on_the_device_and_are_deterministic() -> None:
    images, labels = make_data(300, side=32)

    def run() -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = BatchLoader(images, labels, 64, mean=MEAN, std=STD, augment=AugmentConfig(), device="cuda",
                             channels_last=True)  # fmt: skip
        loader.set_epoch(1)
        return list(loader)

    first, again = run(), run()
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert xa.is_cuda and ya.is_cuda
        assert xa.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(300))
    # A CPU generator can drive augmentation of a CUDA batch (its parameters are copied over), and then the GPU
    # path (blur by torch.where) gives what the CPU path (blur of the chosen images only) gives.
    x = torch.rand(64, 3, 16, 16)
    cfg = AugmentConfig(blur_prob=0.5)
    on_cpu = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    on_gpu = augment_batch(x.cuda(), cfg, torch.Generator().manual_seed(0))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_iterate_resumes_mid_epoch_exactly() -> None:
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50) % 5
    loader = BatchLoader(images, labels, 8, mean=[0.5] * 3, std=[0.25] * 3, augment=AugmentConfig(), seed=3)
    loader.set_epoch(2)
    full = list(loader)
    head = loader.iterate()
    first = [next(head) for _ in range(3)]
    state = loader.generator.get_state()
    rest = list(loader.iterate(start=3, generator_state=state))
    for (x, y), (x2, y2) in zip(full, first + rest, strict=True):
        torch.testing.assert_close(x, x2, rtol=0, atol=0)
        assert torch.equal(y, y2)
    with pytest.raises(ValueError, match="start must be"):
        next(loader.iterate(start=len(loader) + 1))
