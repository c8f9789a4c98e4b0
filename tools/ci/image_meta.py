"""What the mlops workflow's package job builds, read from the newest package artifact, as GITHUB_OUTPUT lines.

    python tools/ci/image_meta.py artifacts/package ARCH >> "$GITHUB_OUTPUT"

Prints ``context`` (the build context folder), ``version`` (the model version the image serves), ``tags`` (the
package's tags: the model version and the git revision) and ``labels``: the OCI labels this architecture's image
carries on top of the Dockerfile's, saying which variant and runtime it serves on which architecture. Each
architecture packages its own bench candidate, so the two images of one tag may serve different variants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def image_meta(package_root: Path, arch: str) -> dict[str, str]:
    """The outputs for the newest package folder under ``package_root``, built for ``arch`` (amd64, arm64)."""
    manifests = sorted(package_root.glob("*/manifest.json"), key=lambda path: path.stat().st_mtime)
    if not manifests:
        raise SystemExit(f"image_meta: no */manifest.json under {package_root}: run `signpost package` first")
    manifest = json.loads(manifests[-1].read_text(encoding="utf-8"))
    image = manifest["image"]
    labels = image["labels"]
    # The package's input is the model folder, named after its variant (<workdir>/optimize/<run>/<variant>).
    variant = str(manifest.get("inputs", {}).get("model", "model"))
    extra = {
        "io.signpost.variant": variant,
        "io.signpost.model.runtime": str(image.get("runtime", labels.get("io.signpost.model.runtime", ""))),
        "io.signpost.platform": f"linux/{arch}",
        "org.opencontainers.image.description": f"Signpost inference service: {labels['io.signpost.model.version']}, "
        f"{variant} on {image.get('runtime', '?')}, linux/{arch}",
    }
    return {
        "context": str(manifests[-1].parent / "context"),
        "version": labels["io.signpost.model.version"],
        "tags": " ".join(image["tags"]),
        "labels": "\n".join(f"{key}={value}" for key, value in extra.items()),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("amd64", "arm64"):
        print("usage: python tools/ci/image_meta.py PACKAGE_ROOT amd64|arm64", file=sys.stderr)
        return 2
    for key, value in image_meta(Path(argv[0]), argv[1]).items():
        if "\n" in value:
            print(f"{key}<<EOF\n{value}\nEOF")
        else:
            print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
