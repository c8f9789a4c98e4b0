"""Hold-out splits by track: every frame of one physical sign lands on the same side.

GTSRB has ~30 frames per sign; splitting frames at random puts near-copies on both sides and reports a validation
accuracy that the test set will not confirm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def split_by_track(labels: np.ndarray, tracks: Sequence[str] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the images held out: about ``fraction`` of each class, whole tracks only, seeded.

    Each class keeps at least one track on the training side; a class with a single track is not held out.
    """
    labels = np.asarray(labels)
    track_arr = np.asarray(tracks)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        in_class = np.flatnonzero(labels == label)
        names, inverse, sizes = np.unique(track_arr[in_class], return_inverse=True, return_counts=True)
        if len(names) < 2:
            log.warning("class %d has a single track: none of it is held out", label)
            continue
        target = fraction * len(in_class)
        order = np.random.default_rng([seed, int(label)]).permutation(len(names))
        chosen, count = [], 0
        for t in order:
            if len(chosen) == len(names) - 1:
                break
            # Take a track when it brings the held-out count closer to the target (tracks vary in length).
            if abs(count + sizes[t] - target) < abs(count - target) or not chosen:
                chosen.append(t)
                count += sizes[t]
        held[in_class[np.isin(inverse, chosen)]] = True
    return held
