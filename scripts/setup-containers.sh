#!/usr/bin/env bash
# Idempotent set-up of the container runtimes the runtime tests and bench use, on Debian 12,
# as root (scripts/setup.sh calls it; fast when everything is in place):
#   1. Podman + runc (+ netavark, debootstrap, zstd) from Debian, without Recommends: runc's
#      would pull Debian's criu 3.17, which does not run on these kernels (CRIU 4.2.1 in
#      /usr/local/sbin, built by setup.sh, is what runc finds on PATH);
#   2. containerd (its `ctr`), for the containerd check;
#   3. the base image localhost/overlayfs-inetsk-base:bookworm, imported from a debootstrap
#      minbase tree with python3 (no container registry is needed or used). The tree comes
#      from the Debian mirror this machine's apt sources already use;
#   4. the node image (the project's Dockerfile) built from this tree on that base:
#      scripts/build-node-image.sh (cached by podman: seconds when nothing changed, about
#      100 s cold here). catatonit (podman's pause image) is for `podman kube play` of the
#      DaemonSet's pod (tests/integration/test_daemonset.py).
set -euo pipefail

CACHE=${OVERLAYFS_INETSK_CACHE:-/var/cache/overlayfs-inetsk}
BASE_IMAGE=${OVERLAYFS_INETSK_BASE_IMAGE:-localhost/overlayfs-inetsk-base:bookworm}
SUITE=bookworm
BASE_DIR="$CACHE/podman-base"
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '[setup-containers] %s\n' "$*" >&2; }
die() { printf '[setup-containers] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get and podman import need it)"

PKGS=(podman runc netavark aardvark-dns conmon catatonit debootstrap zstd containerd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages (no Recommends): ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
fi
if dpkg-query -W -f='${Status}' criu 2>/dev/null | grep -q 'install ok installed'; then
  log "warning: Debian's criu package is installed; runc must find /usr/local/sbin/criu first"
fi
[ "$(command -v criu || true)" = /usr/local/sbin/criu ] ||
  log "warning: criu on PATH is $(command -v criu || echo none), not /usr/local/sbin/criu"

# --- the base image ----------------------------------------------------------------------
base_image() {
  if podman image exists "$BASE_IMAGE"; then
    log "base image: $BASE_IMAGE (present)"
    return 0
  fi

  if [ ! -x "$BASE_DIR/rootfs/usr/bin/python3" ]; then
    # The mirror this machine's apt already uses for $SUITE (never a hard-coded host name).
    mirror=$(apt-get indextargets --format '$(SITE)' 'Identifier: Packages' "Codename: $SUITE" \
               'Origin: Debian' 2>/dev/null | sort -u | head -1)
    [ -n "$mirror" ] || die "no Debian $SUITE entry in this machine's apt sources (apt-get update?)"
    mkdir -p "$BASE_DIR"
    rm -rf "$BASE_DIR/rootfs.tmp"
    log "debootstrap --variant=minbase --include=python3 $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3 "$SUITE" "$BASE_DIR/rootfs.tmp" "$mirror" \
      >"$BASE_DIR/debootstrap.log" 2>&1 ||
      { tail -20 "$BASE_DIR/debootstrap.log"; die "debootstrap failed (log: $BASE_DIR/debootstrap.log)"; }
    rm -rf "$BASE_DIR/rootfs.tmp/var/cache/apt/archives/"*.deb
    rm -rf "$BASE_DIR/rootfs"
    mv "$BASE_DIR/rootfs.tmp" "$BASE_DIR/rootfs"
  fi
  log "importing $BASE_DIR/rootfs as $BASE_IMAGE"
  tar -C "$BASE_DIR/rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
  podman image exists "$BASE_IMAGE" || die "podman import did not create $BASE_IMAGE"
  log "base image: $BASE_IMAGE (imported)"
}
base_image

# --- the node image, from this tree -------------------------------------------------------
OVERLAYFS_INETSK_CACHE="$CACHE" OVERLAYFS_INETSK_BASE_IMAGE="$BASE_IMAGE" \
  bash "$ROOT/scripts/build-node-image.sh" >/dev/null
