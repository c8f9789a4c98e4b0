"""Probe a started Signpost image before it is pushed: ready, serving the model it is labelled with, and right.

    python tools/ci/probe.py http://127.0.0.1:8000 --version MODEL_VERSION --data artifacts/data/<run>

Waits (at most --timeout seconds) for ``/readyz`` to answer 200 with the expected model version, then sends
``--images`` images of the prepared test split, one request each, to ``/v1/predict`` and checks every answer's model
version and class. A model past the evaluation gate classifies far more than 80% of the test split correctly, so at
most one wrong class in five is allowed; an image that serves the wrong weights, the wrong normalization or the wrong
class order gets about one in 43 right. Exit 0 when the image passes, 1 with a one-line reason when it does not.

The images come from the prepared data (``test.safetensors``, read with Signpost's own cache loader), written as PNG
exactly as a client would send them; everything else is the standard library.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

POLL_S = 1.0  # seconds between readiness polls
REQUEST_TIMEOUT_S = 30.0  # one request, seconds


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def wait_ready(url: str, version: str, timeout_s: float) -> None:
    """Poll ``/readyz`` until it answers 200 for ``version``; ``SystemExit`` naming what was seen at the deadline."""
    deadline = time.monotonic() + timeout_s
    seen = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = _get(f"{url}/readyz")
            seen = f"HTTP {status} {body}"
            if status == 200:
                if body.get("model_version") != version:
                    raise SystemExit(f"probe: {url}/readyz serves model {body.get('model_version')!r}, the image's "
                                     f"label says {version!r}: the image was built from another package context")
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            seen = str(exc)
        time.sleep(POLL_S)
    raise SystemExit(f"probe: {url}/readyz did not answer 200 within {timeout_s:.0f} s (last: {seen}); see the "
                     "container's log above")


def test_images(data_dir: Path, count: int) -> list[tuple[bytes, int]]:
    """The first ``count`` images of the prepared test split, as PNG bytes, with their labels."""
    from PIL import Image

    from signpost.data.cache import load_split

    split = load_split(data_dir / "test.safetensors")
    if len(split) < count:
        raise SystemExit(f"probe: {data_dir}/test.safetensors has {len(split)} images, fewer than --images {count}")
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(split.images[index].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        images.append((buffer.getvalue(), int(split.labels[index])))
    return images


def predict(url: str, png: bytes) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/v1/predict", data=png, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"probe: {url}/v1/predict answered HTTP {exc.code}: {exc.read()[:500]!r}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the started image, e.g. http://127.0.0.1:8000")
    parser.add_argument("--version", required=True, help="the model version the image is labelled with")
    parser.add_argument("--data", type=Path, required=True, help="the prepared data folder (test.safetensors)")
    parser.add_argument("--images", type=int, default=5, help="test images to send (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")

    wait_ready(url, args.version, args.timeout)
    wrong = []
    for index, (png, label) in enumerate(test_images(args.data, args.images)):
        answer = predict(url, png)
        if answer.get("model_version") != args.version:
            raise SystemExit(f"probe: test image {index} was answered by model {answer.get('model_version')!r}, "
                             f"not {args.version!r}")
        if answer.get("class_id") != label:
            wrong.append(f"image {index}: class {answer.get('class_id')} for label {label}")
    if len(wrong) > args.images // 5:
        raise SystemExit(f"probe: {len(wrong)} of {args.images} test images misclassified ({'; '.join(wrong)}): "
                         "the image does not serve the model that passed the gate")
    print(f"probe: {url} is ready, serves {args.version} and classified {args.images - len(wrong)} of "
          f"{args.images} test images correctly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
