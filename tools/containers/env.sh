#!/usr/bin/env bash
# Settings buildah and podman need on a machine without a container daemon or cgroup delegation (CI runners in a
# sandbox, this project's machines): vfs storage, chroot isolation, runc, cgroupfs, explicit ulimits.
# Usage: eval "$(tools/containers/env.sh [STATE_DIR])"   (default STATE_DIR: ~/.cache/signpost/containers)
set -eu
state="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/signpost/containers}"
mkdir -p "$state/storage" "$state/run"
nofile="$(ulimit -Hn)"
cat > "$state/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$state/storage"
runroot = "$state/run"
CONF
cat > "$state/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
echo "export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot"
echo "export CONTAINERS_STORAGE_CONF='$state/storage.conf' CONTAINERS_CONF='$state/containers.conf'"
