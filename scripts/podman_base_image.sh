#!/usr/bin/env bash
# Prepare Podman on a machine that cannot pull from container registries but reaches Debian's
# package archive: install Podman, runc and mmdebstrap, write /etc/containers/containers.conf,
# and build a Debian bookworm image with Python 3.11 that replaces python:3.11-slim.
#
# Usage: sudo scripts/podman_base_image.sh [TAG]
#   TAG defaults to docker.io/library/python:3.11-slim, the base that the Dockerfile names.
# Running it again is safe: installed packages, the config and an existing image are kept.
# Set FORCE_REBUILD=1 to replace the image.
set -euo pipefail

TAG="${1:-docker.io/library/python:3.11-slim}"
SUITE="${DEBIAN_SUITE:-bookworm}"
CONF=/etc/containers/containers.conf

# catatonit is the init process of the pods that `podman kube play` starts.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
    || ! command -v mmdebstrap >/dev/null || ! command -v catatonit >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        podman runc mmdebstrap uidmap slirp4netns catatonit
fi

# The packages above bring runc but not crun, Podman's default runtime, so the config selects
# runc. Containers get 20000 open files and 32768 processes.
if ! grep -q '^runtime = "runc"' "$CONF" 2>/dev/null; then
    mkdir -p "$(dirname "$CONF")"
    if [[ -f "$CONF" ]]; then
        cp "$CONF" "$CONF.bak"
        echo "saved the previous $CONF as $CONF.bak"
    fi
    cat >"$CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
    echo "wrote $CONF"
fi

if podman image exists "$TAG" && [[ "${FORCE_REBUILD:-0}" != 1 ]]; then
    echo "image $TAG exists; set FORCE_REBUILD=1 to rebuild it"
    exit 0
fi

# python3-venv brings ensurepip, so `python3 -m venv` gives a venv with pip as in the official
# image. The official image keeps Python in /usr/local/bin and Debian in /usr/bin, so the
# Dockerfile calls `python3` and the venv's own python, never a fixed interpreter path.
rootfs_tar="$(mktemp --suffix=.tar)"
trap 'rm -f "$rootfs_tar"' EXIT
mmdebstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='chroot "$1" apt-get clean' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$SUITE" "$rootfs_tar"
podman import \
    --change 'CMD ["python3"]' \
    --change 'ENV LANG=C.UTF-8' \
    "$rootfs_tar" "$TAG"
podman image ls "$TAG"
