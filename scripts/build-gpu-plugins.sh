#!/usr/bin/env bash
# TEST-ONLY. Builds CRIU's own GPU plugins from the CRIU 4.2.1 tree scripts/setup.sh keeps
# ($CACHE/criu-4.2.1): the CUDA plugin (`make cuda_plugin`, plugins/cuda) and the AMD GPU
# plugin (`make amdgpu_plugin`, plugins/amdgpu; its only extra dependency, libdrm with
# libdrm_amdgpu, comes with Debian 12's libdrm-dev, which setup.sh installs for CRIU anyway).
# The tests load them beside ours (tests/integration/test_gpu_plugins.py, docs/gpu.md);
# nothing is installed into CRIU's plugin dir. Idempotent: the two .so files are cached in
# $CACHE/gpu-plugins and rebuilt only when the CRIU tarball or this script changes.
# Prints the dir on success.
set -euo pipefail

CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CACHE=${OVERLAYFS_INETSK_CACHE:-/var/cache/overlayfs-inetsk}
SRC="$CACHE/criu-4.2.1"
OUT="$CACHE/gpu-plugins"
PLUGINS=(cuda_plugin amdgpu_plugin)

log() { printf '[gpu-plugins] %s\n' "$*" >&2; }
die() { printf '[gpu-plugins] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

want="$(sha256sum "$0" | cut -d' ' -f1) $CRIU_SHA256"
have_all() { for p in "${PLUGINS[@]}"; do [ -s "$OUT/$p.so" ] || return 1; done; }
if have_all && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$want" ]; then
  echo "$OUT"
  exit 0
fi

[ -f "$SRC/Makefile" ] && [ -x "$SRC/criu/criu" ] ||
  die "$SRC is not a built CRIU tree: run scripts/setup.sh first"
grep -q "CRIU_SHA256=$CRIU_SHA256" "$(dirname "$0")/setup.sh" ||
  die "setup.sh builds another CRIU than this script expects"
# libdrm (with libdrm_amdgpu) is what CRIU's Makefile.config checks for the AMD plugin
pkg-config --exists libdrm libdrm_amdgpu ||
  die "the AMD GPU plugin needs libdrm-dev (with libdrm_amdgpu): apt-get install libdrm-dev"

buildlog="$OUT/build.log"
: >"$buildlog"
for p in "${PLUGINS[@]}"; do
  log "make $p in $SRC (a few seconds: criu itself is already built)"
  make -C "$SRC" -j2 "$p" >>"$buildlog" 2>&1 ||
    { tail -30 "$buildlog"; die "make $p failed (log: $buildlog)"; }
done
install -m 755 "$SRC/plugins/cuda/cuda_plugin.so" "$OUT/cuda_plugin.so"
install -m 755 "$SRC/plugins/amdgpu/amdgpu_plugin.so" "$OUT/amdgpu_plugin.so"
for p in "${PLUGINS[@]}"; do
  # each must carry CRIU's plugin descriptor (what CRIU's loader reads)
  nm -D --defined-only "$OUT/$p.so" | grep -qw CR_PLUGIN_DESC || die "$OUT/$p.so has no CR_PLUGIN_DESC"
done
echo "$want" > "$OUT/.stamp"
log "ready: $OUT (${PLUGINS[*]})"
echo "$OUT"
