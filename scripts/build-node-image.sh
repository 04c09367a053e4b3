#!/usr/bin/env bash
# Builds the node image (the project's Dockerfile, docs/docker.md) from THIS tree with podman,
# on the local base image, as localhost/overlayfs-inetsk:<version in pyproject.toml>, and
# prints its image ID on stdout. scripts/setup-containers.sh calls it; the DaemonSet test
# (tests/integration/test_daemonset.py) calls it again, so that it always runs this tree's
# image. podman's layer cache does the work: nothing changed, every step is cached (a few
# seconds); only the tree changed, the CRIU build layer is kept and only the steps after
# `COPY . /app` run again.
#
# What this workplace needs and a normal user does not is passed here, never baked into
# the Dockerfile or the image: bind mounts (podman build -v) seen by every RUN step only.
#   - apt: the host's own Acquire::Check-Valid-Until / Check-Date "false" when the host's
#     apt has them (a mirror whose Release files are past Valid-Until), as an apt.conf.d
#     file;
#   - pip: the host's CA bundle ($PIP_CERT, else /etc/ssl/certs/ca-certificates.crt) and a
#     /etc/pip.conf naming it (a TLS-inspecting proxy that certifi does not know).
# The base image is passed as --build-arg DEBIAN=...: nothing is retagged.
#
# Environment: OVERLAYFS_INETSK_BASE_IMAGE (default localhost/overlayfs-inetsk-base:bookworm),
# OVERLAYFS_INETSK_NODE_IMAGE (the tag), OVERLAYFS_INETSK_CACHE (where the mounted files go).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${OVERLAYFS_INETSK_CACHE:-/var/cache/overlayfs-inetsk}
BASE_IMAGE=${OVERLAYFS_INETSK_BASE_IMAGE:-localhost/overlayfs-inetsk-base:bookworm}
CONF="$CACHE/node-image"

log() { printf '[build-node-image] %s\n' "$*" >&2; }
die() { printf '[build-node-image] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman build of a privileged node image)"
version=$(python3 -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml") ||
  die "$ROOT/pyproject.toml: no [project] version"
TAG=${OVERLAYFS_INETSK_NODE_IMAGE:-localhost/overlayfs-inetsk:$version}
podman image exists "$BASE_IMAGE" ||
  die "no base image $BASE_IMAGE (scripts/setup-containers.sh imports it)"

mkdir -p "$CONF"
exec 9>"$CONF/lock"
flock -w 1800 9 || die "another build of the node image holds $CONF/lock"

mounts=()
apt_conf="$CONF/apt.conf"
eval "$(apt-config shell valid_until Acquire::Check-Valid-Until check_date Acquire::Check-Date)"
{
  echo "// written by scripts/build-node-image.sh: the host's own apt options, build-time only"
  [ "${valid_until:-}" = false ] && echo 'Acquire::Check-Valid-Until "false";'
  [ "${check_date:-}" = false ] && echo 'Acquire::Check-Date "false";'
  true
} > "$apt_conf.tmp"
mv "$apt_conf.tmp" "$apt_conf"
mounts+=(-v "$apt_conf:/etc/apt/apt.conf.d/99overlayfs-inetsk-build:ro")
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -r "$ca" ]; then
  printf '[global]\ncert = /run/overlayfs-inetsk-build/ca.crt\n' > "$CONF/pip.conf"
  mounts+=(-v "$ca:/run/overlayfs-inetsk-build/ca.crt:ro" -v "$CONF/pip.conf:/etc/pip.conf:ro")
fi

old=$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
start=$(date +%s.%N)
buildlog="$CONF/build.log"
podman build --runtime runc --pull=never --layers \
  --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
  --build-arg "DEBIAN=$BASE_IMAGE" "${mounts[@]}" \
  -t "$TAG" -f "$ROOT/Dockerfile" "$ROOT" >"$buildlog" 2>&1 ||
  { tail -30 "$buildlog" >&2; die "podman build failed (log: $buildlog)"; }
id=$(podman image inspect --format '{{.Id}}' "$TAG") || die "the build made no $TAG"
secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
  "$start" "$(date +%s.%N)")
if [ "$old" = "$id" ]; then
  log "node image: $TAG (${id:0:12}, unchanged, ${secs} s)"
else
  log "node image: $TAG (${id:0:12}, built in ${secs} s)"
  # the image this tag named before, if nothing else names or uses it (not a prune: only ours)
  [ -n "$old" ] && podman rmi "$old" >/dev/null 2>&1 || true
fi
echo "$id"
