#!/usr/bin/env bash
# Idempotent set-up of everything overlayfs-inetsk needs, on Debian 12, as root:
#   1. Debian packages (CRIU build deps, FUSE 3, iproute2, iptables, Python venv support);
#   2. CRIU 4.2.1 built from Debian's source package into /usr/local (skipped when
#      /usr/local/sbin/criu already reports 4.2.1 and the source tree is kept);
#   3. .venv/ with the package (editable), pycriu and crit from that CRIU tree, and test deps.
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
  psmisc)

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

# --- the venv --------------------------------------------------------------------------
VENV="$ROOT/.venv"
stamp="$VENV/.setup-stamp"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $CRIU_VERSION"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  log "installing the venv"
  piplog="$VENV/pip-install.log"
  {
    "$VENV/bin/pip" install -q --upgrade pip &&
    "$VENV/bin/pip" install -q "$SRC/lib" "$SRC/crit" &&
    "$VENV/bin/pip" install -q -e "$ROOT[test]"
  } >"$piplog" 2>&1 || { tail -30 "$piplog"; die "pip install failed (log: $piplog)"; }
  echo "$want" > "$stamp"
fi
"$VENV/bin/overlayfs-inetsk" --help >/dev/null || die ".venv/bin/overlayfs-inetsk --help failed"
log "ready: $VENV/bin/overlayfs-inetsk"
