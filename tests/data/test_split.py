"""Validation split by track: no track on both sides, stratified by class, seeded."""

import numpy as np

from signpost.data.split import split_by_track


def _dataset(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    labels, tracks = [], []
    for label in range(6):
        for track in range(int(rng.integers(2, 9))):
            frames = int(rng.integers(5, 31))
            labels += [label] * frames
            tracks += [f"{label}/{track}"] * frames
    return np.array(labels), tracks


def test_no_track_on_both_sides_and_every_class_held_out() -> None:
    labels, tracks = _dataset(np.random.default_rng(0))
    held = split_by_track(labels, tracks, 0.2, seed=0)
    tracks_arr = np.array(tracks)
    assert not set(tracks_arr[held]) & set(tracks_arr[~held])
    for label in np.unique(labels):
        in_class = labels == label
        assert held[in_class].any(), f"class {label} has no held-out images"
        assert (~held[in_class]).any(), f"class {label} kept nothing for training"


def test_fraction_is_approximately_met_overall() -> None:
    labels, tracks = _dataset(np.random.default_rng(1))
    for fraction in (0.1, 0.3):
        share = split_by_track(labels, tracks, fraction, seed=0).mean()
        assert abs(share - fraction) < 0.12


def test_seeded() -> None:
    labels, tracks = _dataset(np.random.default_rng(2))
    first = split_by_track(labels, tracks, 0.25, seed=3)
    assert np.array_equal(first, split_by_track(labels, tracks, 0.25, seed=3))
    assert any(not np.array_equal(first, split_by_track(labels, tracks, 0.25, seed=s)) for s in range(4, 10))


def test_single_track_class_stays_in_training() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    tracks = ["0/a"] * 10 + ["1/a"] * 5 + ["1/b"] * 5
    held = split_by_track(labels, tracks, 0.5, seed=0)
    assert not held[:10].any()
    assert held[10:].sum() == 5
