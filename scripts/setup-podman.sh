#!/usr/bin/env bash
# bash scripts/setup-podman.sh
#
# Makes a Debian machine with no Docker engine and no reachable image registry able to
# build and run llmrepro's OCI images with Podman. Idempotent: safe to run again.
#   1. installs podman, buildah, runc and debootstrap with apt-get (as root, if missing);
#   2. writes containers.conf: runtime runc and default ulimits (crun and the kernel's
#      defaults fail on these machines);
#   3. makes the base image $LLMREPRO_BASE_IMAGE (default localhost/llmrepro-base:bookworm)
#      with debootstrap + `podman import`, since no registry can be pulled from.
# The CA bundle and the local wheel folder are passed per build by `invoke build`.
set -euo pipefail

BASE_IMAGE="${LLMREPRO_BASE_IMAGE:-localhost/llmrepro-base:bookworm}"
PACKAGES=(podman buildah runc debootstrap uidmap slirp4netns fuse-overlayfs)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-podman: run as root to install: ${missing[*]}" >&2
        exit 2
    fi
    echo "+ apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ $(id -u) -eq 0 ]]; then conf_dir=/etc/containers; else conf_dir="${XDG_CONFIG_HOME:-$HOME/.config}/containers"; fi
conf="$conf_dir/containers.conf"
want='# Written by llmrepro scripts/setup-podman.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"'
if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$want" ]]; then
    if [[ -f $conf ]] && ! grep -q "llmrepro scripts/setup-podman.sh" "$conf"; then
        cp "$conf" "$conf.bak"
        echo "setup-podman: kept the previous $conf as $conf.bak"
    fi
    mkdir -p "$conf_dir"
    printf '%s\n' "$want" >"$conf"
    echo "+ wrote $conf"
fi

if podman image exists "$BASE_IMAGE"; then
    echo "setup-podman: base image $BASE_IMAGE already present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "setup-podman: debootstrap needs root to make $BASE_IMAGE" >&2
    exit 2
fi
rootfs="$(mktemp -d /var/tmp/llmrepro-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "+ debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
echo "+ podman import -> $BASE_IMAGE"
tar -C "$rootfs" -c . | podman import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
echo "setup-podman: made $BASE_IMAGE"
