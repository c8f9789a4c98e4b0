"""Training speed: Signpost's default recipe against the reference recipe, on the same synthetic data in one run.

- reference (the tutorial): traffic_sign_net, batch size 1, Adam 1e-3, 2 epochs, per-image loading (PIL open,
  resize, ToTensor, Normalize in a DataLoader, decoded every epoch), no augmentation;
- Signpost: the config's model and recipe (configs/demo.yaml: signnet, batch 64, AdamW, warm-up + cosine, label
  smoothing, augmentation) from the prepared uint8 cache, on the reference's budget of 2 epochs; and, to separate
  what the recipe buys from what the model buys, the reference's own network trained with that recipe.

By default the data is GTSRB-sized (39,210 training images in 7-75 tracks of 30 frames per class), where the
reference takes about 6 minutes; `--small` uses the demo's 3,828 images for a quick look. Both recipes train on
the same images and are scored on the same test split. The script prints each recipe's training images/s, the
reference's final test accuracy, the time Signpost takes to reach it (its own per-epoch validation and checkpoints
count; the extra test evaluation this script adds does not), and the ratios.

    .venv/bin/python benchmarks/train_speed.py
    .venv/bin/python benchmarks/train_speed.py --small train.batch_size=128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from signpost.config import load_config
from signpost.data.cache import load_split
from signpost.data.layouts import read_dataset
from signpost.data.loader import BatchLoader
from signpost.models import build_model
from signpost.stages.prepare import prepare
from signpost.training import Recipe

from reference import ReferenceDataset


def reference_recipe(root: Path, size: int) -> tuple[float, float, float]:
    """(training seconds, training images/s, final test accuracy) of the tutorial's recipe."""
    raw = read_dataset(root)
    torch.manual_seed(0)
    model = build_model("traffic_sign_net", raw.num_classes, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(ReferenceDataset(raw.train, size), batch_size=1, shuffle=True)
    seconds, seen = 0.0, 0
    for _ in range(2):
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            seen += 1
        seconds += time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(ReferenceDataset(raw.test, size), batch_size=256):
            correct += (model(x).argmax(1) == y).sum().item()
    return seconds, seen / seconds, correct / len(raw.test)


def signpost_recipe(config_path: str | None, overrides: list[str], work: Path, target: float) -> dict[str, float]:
    """Train with Signpost's recipe until its test accuracy reaches ``target`` (or the epochs run out)."""
    config = load_config(config_path, [*overrides, f"workdir={work}"])
    data = prepare(config, progress=False)
    test = load_split(data.path / "test.safetensors")
    recipe = Recipe(config, data.path, progress=False)
    recipe.setup(resume=False)
    seconds, seen, accuracy = 0.0, 0, 0.0
    while recipe.epoch < config.train.epochs:
        start = time.perf_counter()
        recipe.train_epoch()
        recipe.end_epoch()
        seconds += time.perf_counter() - start
        seen += recipe.steps_per_epoch * recipe.loader.batch_size
        accuracy = _accuracy(recipe, test)
        print(f"  signpost epoch {recipe.epoch}: {seconds:.2f} s, test accuracy {accuracy:.4f}", flush=True)
        if accuracy >= target:
            break
    return {"seconds": seconds, "images_per_s": seen / seconds, "accuracy": accuracy, "epochs": recipe.epoch}


@torch.inference_mode()
def _accuracy(recipe: Recipe, test: object) -> float:
    recipe.model.eval()
    loader = BatchLoader(test.images, test.labels, 512, mean=recipe.dataset["mean"], std=recipe.dataset["std"],
                         shuffle=False, device=recipe.device, channels_last=recipe.cfg.channels_last)
    correct = sum((recipe.model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(test)


# The Signpost recipes compared with the reference, each on the reference's budget of 2 epochs: the config's model
# and recipe, and the reference's architecture with the same recipe (same network, so its ratio is what the recipe
# and the data path buy).
TWO_EPOCHS = ["train.epochs=2", "train.warmup_epochs=0.2"]
VARIANTS: dict[str, list[str]] = {
    "default model and recipe": TWO_EPOCHS,
    "reference's network, Signpost's recipe": ["train.model=traffic_sign_net", *TWO_EPOCHS],
}
# GTSRB's size: 7 to 75 training tracks of 30 frames per class (39,209 images); a 10-track test set per class.
GTSRB_SIZED = ["data.synthetic.min_tracks=7", "data.synthetic.max_tracks=75", "data.synthetic.frames_per_track=30",
               "data.synthetic.test_tracks=10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--small", action="store_true", help="the config's own (demo-sized) data, for a quick look")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if not args.small:
        args.overrides = [*GTSRB_SIZED, *args.overrides]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = {}
    with tempfile.TemporaryDirectory(prefix="signpost-train-bench-") as tmp:
        work = Path(tmp)
        config = load_config(args.config, [*args.overrides, f"workdir={work}"])
        raw_root = prepare(config, progress=False).manifest["inputs"]["root"]
        print(f"reference recipe on {raw_root} ...", flush=True)
        ref_seconds, ref_rate, ref_accuracy = reference_recipe(Path(raw_root), config.data.image_size)
        print(f"  reference: 2 epochs in {ref_seconds:.1f} s, test accuracy {ref_accuracy:.4f}", flush=True)
        for name, extra in VARIANTS.items():
            print(f"signpost, {name} ...", flush=True)
            variant = load_config(args.config, [*extra, *args.overrides])
            results[name] = (variant, signpost_recipe(args.config, [*extra, *args.overrides], work, ref_accuracy))

    print("\n| recipe | training images/s | test accuracy | seconds | vs reference |")
    print("|---|---|---|---|---|")
    print(f"| reference: traffic_sign_net, batch 1, Adam, 2 epochs, per-image loading | {ref_rate:,.0f} | "
          f"{ref_accuracy:.4f} | {ref_seconds:.1f} | 1.0x |")
    for name, (variant, ours) in results.items():
        ratio = f"{ref_seconds / ours['seconds']:.1f}x faster"
        ratio += "" if ours["accuracy"] >= ref_accuracy else " (target NOT reached)"
        print(f"| signpost, {name}: {variant.train.model}, batch {variant.train.batch_size}, stopped after "
              f"{ours['epochs']:.0f} of {variant.train.epochs} epochs | {ours['images_per_s']:,.0f} | "
              f"{ours['accuracy']:.4f} | {ours['seconds']:.1f} | {ratio} |")
    print(f"\nTime to the reference's final test accuracy ({ref_accuracy:.4f}), as a multiple of the reference's time.")


if __name__ == "__main__":
    main()
