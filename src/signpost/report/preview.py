"""The prepared data's contact sheet: one training image per class, enlarged, a look at what the model will see."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preview_sheet(images: torch.Tensor, labels: torch.Tensor, num_classes: int, tile: int = 48,
                  columns: int = 11) -> Image.Image:
    """The first image of each class in ``images`` (uint8 ``[N, 3, S, S]``, labelled by ``labels``), each resized
    to a ``tile``-pixel square cell, ``columns`` cells a row, in class order; a class without an image leaves its
    cell grey."""
    rows = -(-num_classes // columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), (40, 40, 40))
    present, first = np.unique(labels.numpy(), return_index=True)
    for label, index in zip(present.tolist(), first.tolist(), strict=True):
        array = images[index].permute(1, 2, 0).numpy()
        image = Image.fromarray(array).resize((tile - 2, tile - 2), Image.Resampling.NEAREST)
        sheet.paste(image, ((label % columns) * tile + 1, (label // columns) * tile + 1))
    return sheet
