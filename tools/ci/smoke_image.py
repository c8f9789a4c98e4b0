"""Write one test image for the deploy job's smoke test, and print its class id.

    python tools/ci/smoke_image.py artifacts/data/<run> smoke.png    # prints e.g. 14

The image is the first of the prepared test split (``test.safetensors``), written as PNG exactly as a client sends
it (the same images ``probe.py`` checks an image with before it is pushed); ``signpost deploy --apply
--smoke-image smoke.png --smoke-class 14`` then checks that the deployed service classifies it as that class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import test_images  # the probe's own reader of the test split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a prepared data folder (holds test.safetensors)")
    parser.add_argument("out", type=Path, help="where the PNG goes")
    args = parser.parse_args(argv)
    if not (args.data / "test.safetensors").is_file():
        raise SystemExit(f"smoke_image: {args.data} has no test.safetensors: give a `signpost prepare` folder")
    ((png, label),) = test_images(args.data, 1)
    args.out.write_bytes(png)
    print(label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
