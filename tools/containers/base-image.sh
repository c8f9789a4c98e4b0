#!/usr/bin/env bash
# Build a local Python base image (Debian bookworm, python3 + venv) for `signpost package --build` where no public
# registry can be reached: `--base-image localhost/signpost-python:bookworm`. Needs root, debootstrap and buildah.
# Usage: tools/containers/base-image.sh [IMAGE]   (reuses the image when it exists)
set -euo pipefail
image="${1:-localhost/signpost-python:bookworm}"
if buildah inspect --type image "$image" >/dev/null 2>&1; then
  echo "$image exists"; exit 0
fi
# The apt mirror this machine is configured with, so debootstrap works wherever apt does.
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
container="$(buildah from scratch)"
mount="$(buildah mount "$container")"
cp -a "$rootfs"/. "$mount"/
buildah umount "$container" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$container"
buildah commit --rm "$container" "$image" >/dev/null
echo "$image built"
