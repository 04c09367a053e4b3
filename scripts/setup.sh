#!/usr/bin/env bash
# Idempotent set-up of everything overlayfs-inetsk needs, on Debian 12, as root:
#   1. Debian packages (CRIU build deps, FUSE 3, iproute2, iptables, Python venv support);
#   2. CRIU 4.2.1 built from Debian's source package into /usr/local (skipped when
#      /usr/local/sbin/criu already reports 4.2.1 and the source tree is kept);
#   3. .venv/ with the package (editable), pycriu and crit from that CRIU tree, and test deps;
#   4. the CRIU plugin built (plugin/build/) and copied to /usr/local/lib/overlayfs-inetsk/, where
#      `overlayfs-inetsk plugin install` takes it from (installing it into CRIU's plugin dir
#      is that command's job: setup changes no restore by itself);
#   5. test-only: CRIU 4.2.1 with the UPDATE_INETSK hook in $CACHE/criu-hook/prefix, and
#      CRIU's CUDA and AMD GPU plugins from the same 4.2.1 tree in $CACHE/gpu-plugins;
#   6. scripts/setup-containers.sh: Podman, runc, containerd and the base image.
set -euo pipefail

CRIU_VERSION=4.2.1
CRIU_DEB_VERSION=4.2.1-1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CACHE=${OVERLAYFS_INETSK_CACHE:-/var/cache/overlayfs-inetsk}
SRC="$CACHE/criu-$CRIU_VERSION"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get and the CRIU install need it)"

APT_PKGS=(build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler
  protobuf-compiler libnl-3-dev libnl-route-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev
  libgnutls28-dev libnftables-dev uuid-dev libdrm-dev iproute2 iptables fuse3 libfuse3-dev
  python3-dev python3-venv python3-pip xz-utils ca-certificates dpkg-dev util-linux procps
  psmisc nftables conntrack
  systemd)  # systemd: systemd-socket-activate and systemd-analyze for the agent's tests

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- CRIU 4.2.1 from Debian's source package --------------------------------------------
criu_ok() { [ -x /usr/local/sbin/criu ] && /usr/local/sbin/criu --version 2>/dev/null | grep -q "Version: $CRIU_VERSION\$"; }
pycriu_ok() { ls "$SRC"/lib/pycriu/images/*_pb2.py >/dev/null 2>&1 && [ -f "$SRC/lib/pycriu/images/magic.py" ]; }

if ! criu_ok || ! pycriu_ok; then
  mkdir -p "$CACHE" && chmod 755 "$CACHE"
  tarball="$CACHE/criu_$CRIU_VERSION.orig.tar.xz"
  if ! echo "$CRIU_SHA256  $tarball" | sha256sum -c --status 2>/dev/null; then
    # deb-src only: a `Types: deb` line for sid would upgrade libc on the next install.
    srcfile=/etc/apt/sources.list.d/overlayfs-inetsk-criu-src.sources
    if [ ! -f "$srcfile" ]; then
      log "adding a deb-src (only) entry for sid, on this machine's Debian mirror"
      # shellcheck source=scripts/apt-mirror.sh
      . "$ROOT/scripts/apt-mirror.sh"
      entry=$(criu_src_entry) || die "cannot pick a mirror from /etc/apt (see above)"
      printf '%s\n' "$entry" > "$srcfile"
    fi
    apt-get update -qq
    log "fetching criu=$CRIU_DEB_VERSION source"
    (cd "$CACHE" && apt-get source --download-only --tar-only "criu=$CRIU_DEB_VERSION" >/dev/null)
    echo "$CRIU_SHA256  $tarball" | sha256sum -c --status || die "sha256 mismatch for $tarball"
  fi
  if [ ! -f "$SRC/Makefile" ]; then
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar -xJf "$tarball" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
  fi
  log "building CRIU $CRIU_VERSION (about a minute)"
  make -C "$SRC" -j"$(nproc)" criu >"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; die "CRIU build failed (log: $CACHE/build.log)"; }
  make -C "$SRC" lib >>"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; die "make lib failed"; }
  make -C "$SRC" PREFIX=/usr/local install-criu >>"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; die "CRIU install failed"; }
fi
criu_ok || die "/usr/local/sbin/criu does not report $CRIU_VERSION"
# crit's version module is normally written by CRIU's top-level `make install`.
[ -f "$SRC/crit/crit/version.py" ] || echo "__version__ = '$CRIU_VERSION'" > "$SRC/crit/crit/version.py"
log "criu: $(/usr/local/sbin/criu --version | head -1)"

# --- test-only: CRIU 4.2.1 + the UPDATE_INETSK hook, in a private prefix ----------------
# Only tests/integration/test_criu_hook*.py use it (the hook is not in any CRIU release);
# never installed over /usr/local/sbin/criu. Cached; OVERLAYFS_INETSK_SKIP_CRIU_HOOK=1 skips.
if [ "${OVERLAYFS_INETSK_SKIP_CRIU_HOOK:-0}" != 1 ]; then
  OVERLAYFS_INETSK_CACHE="$CACHE" "$ROOT/tests/criu-hook/build.sh" >/dev/null ||
    die "the test-only patched CRIU did not build (tests/criu-hook/build.sh)"
fi

# --- test-only: CRIU's own GPU plugins (CUDA, AMD), to load beside ours -----------------
# Only tests/integration/test_gpu_plugins.py uses them; never installed into a plugin dir.
# Cached; OVERLAYFS_INETSK_SKIP_GPU_PLUGINS=1 skips (those tests then skip).
if [ "${OVERLAYFS_INETSK_SKIP_GPU_PLUGINS:-0}" != 1 ]; then
  OVERLAYFS_INETSK_CACHE="$CACHE" bash "$ROOT/scripts/build-gpu-plugins.sh" >/dev/null ||
    die "CRIU's GPU plugins did not build (scripts/build-gpu-plugins.sh)"
fi

# --- the CRIU plugin (-Wall -Wextra -Werror against this CRIU's criu-plugin.h) ---------
PLUGIN_SO=/usr/local/lib/overlayfs-inetsk/overlayfs_inetsk_plugin.so
make -s -C "$ROOT/plugin" CRIU_SRC="$SRC" OUT="$ROOT/plugin/build" >/dev/null || die "plugin build failed (make -C plugin)"
if ! cmp -s "$ROOT/plugin/build/overlayfs_inetsk_plugin.so" "$PLUGIN_SO"; then
  install -D -m 755 "$ROOT/plugin/build/overlayfs_inetsk_plugin.so" "$PLUGIN_SO"
  log "plugin: $PLUGIN_SO (overlayfs-inetsk plugin install puts it into CRIU's plugin dir)"
fi

# --- the venv --------------------------------------------------------------------------
# Both editable installs are plain path entries (a .pth naming the repo and testbed/), not
# setuptools' default import-hook finder: the finders' modules (pathlib, importlib.util)
# cost every Python start in the venv about 12 ms here (`python -c pass`; of a whole
# `overlayfs-inetsk rewrite` 3 to 6 ms, docs/design.md), and an installed, non-editable
# package has none. The price: the repo's top dirs (tests/, bench/, plugin/ ...) are
# importable as namespace packages in the venv.
# EDITABLE is part of the stamp, so a venv made with the finders is switched over.
VENV="$ROOT/.venv"
EDITABLE=compat
stamp="$VENV/.setup-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/testbed/pyproject.toml" | sha256sum | cut -d' ' -f1) $CRIU_VERSION editable=$EDITABLE"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  log "installing the venv"
  piplog="$VENV/pip-install.log"
  {
    "$VENV/bin/pip" install -q --upgrade pip &&
    "$VENV/bin/pip" install -q "$SRC/lib" "$SRC/crit" &&
    "$VENV/bin/pip" install -q --config-settings editable_mode=$EDITABLE -e "$ROOT[test]" &&
    "$VENV/bin/pip" install -q --config-settings editable_mode=$EDITABLE -e "$ROOT/testbed"
  } >"$piplog" 2>&1 || { tail -30 "$piplog"; die "pip install failed (log: $piplog)"; }
  echo "$want" > "$stamp"
fi
"$VENV/bin/overlayfs-inetsk" --help >/dev/null || die ".venv/bin/overlayfs-inetsk --help failed"

# --- container runtimes (Podman, runc, containerd, the base image) for the runtime tests and
# bench; OVERLAYFS_INETSK_NO_CONTAINERS=1 skips them (those tests then skip) -------------
if [ "${OVERLAYFS_INETSK_NO_CONTAINERS:-}" != 1 ]; then
  bash "$ROOT/scripts/setup-containers.sh"
fi
log "ready: $VENV/bin/overlayfs-inetsk"
