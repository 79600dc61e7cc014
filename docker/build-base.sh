#!/usr/bin/env bash
# Builds a minimal Debian bookworm image with debootstrap and imports it into the container engine,
# for machines that cannot pull from an image registry (the Dockerfile's default BASE).
#
#   docker/build-base.sh                      # makes localhost/bookworm-minbase with podman
#   ENGINE=docker IMAGE=bookworm-minbase docker/build-base.sh
#
# Environment: ENGINE (podman), IMAGE (localhost/bookworm-minbase), SUITE (bookworm),
# MIRROR (http://deb.debian.org/debian), ENGINE_ARGS (extra options for the engine, e.g.
# "--runtime runc --cgroup-manager cgroupfs"). Needs root (debootstrap) and the debootstrap package.
# Where a registry is reachable, BASE=debian:bookworm-slim does the same job without this script.
set -euo pipefail

ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-localhost/bookworm-minbase}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
read -r -a engine_args <<< "${ENGINE_ARGS:-}"

command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
command -v "$ENGINE" >/dev/null || { echo "$ENGINE is missing" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/bookworm-minbase.XXXXXX")
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR"

# Security fixes and point-release updates, as in the official images.
if [ "$SUITE" = bookworm ] && [ "$MIRROR" = http://deb.debian.org/debian ]; then
    cat > "$root/etc/apt/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
fi

# The same trims as the official slim images: no apt lists, no caches, no docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
# debootstrap leaves the build machine's resolv.conf and hostname; the engine provides its own.
: > "$root/etc/resolv.conf"
rm -f "$root/etc/hostname"

tar -C "$root" -c . | "$ENGINE" "${engine_args[@]}" import \
    --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$IMAGE"
echo "imported $IMAGE"
