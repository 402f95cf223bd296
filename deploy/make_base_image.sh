#!/usr/bin/env bash
# Build the container base image locally, for hosts that cannot pull from a container registry
# (CI here reaches the Debian mirror but not Docker Hub). Where a registry is reachable, the
# Containerfile's default base (docker.io/library/debian:bookworm-slim) is used instead and this
# script is not needed.
#
#   deploy/make_base_image.sh [IMAGE]       (default localhost/thighnode-base:bookworm; needs root,
#                                            debootstrap and podman)
#
# The image is a Debian bookworm minbase with Python 3 and venv: what the Containerfile's stages
# install on the registry's debian:bookworm-slim anyway.
set -euo pipefail
image="${1:-localhost/thighnode-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if podman image exists "$image"; then
    echo "base image $image exists"
    exit 0
fi
root="$(mktemp -d /var/tmp/thighnode-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" --numeric-owner -cf - . | podman import --change 'CMD ["/bin/bash"]' - "$image"
echo "base image $image built"
