"""The reference approach the benchmarks measure Signpost against: the tutorial's per-image loading."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from signpost.data.layouts import Sample


class ReferenceDataset(Dataset):
    """The tutorial's loading, step for step: torchvision's GTSRB dataset opens each file with PIL and converts it
    to RGB, then ``Compose([Resize((32, 32)), ToTensor(), Normalize(mean, std)])``. Written out here as torchvision
    does each step, since torchvision cannot be imported on these machines. The tutorial crops no ROI, so neither
    does this.
    """

    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples, self.size = samples, size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        image = Image.open(sample.path).convert("RGB")
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)  # Resize on a PIL image
        # ToTensor: HWC uint8 -> CHW float in [0, 1].
        x = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(image.size[1], image.size[0], 3)
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        # Normalize: builds its mean/std tensors and checks std on every call, then normalizes in place.
        mean = torch.as_tensor(self.mean, dtype=x.dtype)
        std = torch.as_tensor(self.std, dtype=x.dtype)
        if (std == 0).any():
            raise ValueError("std evaluated to zero")
        return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1)), sample.label
