#!/usr/bin/env bash
# TEST-ONLY. Builds CRIU 4.2.1 with update-inetsk.patch (the project's own minimal patch that
# adds upstream's UPDATE_INETSK plugin hook, id 15) into a private prefix, so the tests can
# check the plugin against the hook's ABI before any CRIU release has it. Never installs over
# /usr/local/sbin/criu or anything on PATH. Idempotent: cached under $CACHE/criu-hook, rebuilt
# only when the patch or the tarball changes. Prints the patched criu's path on success.
#
# Needs the verified tarball that scripts/setup.sh fetched ($CACHE/criu_4.2.1.orig.tar.xz)
# and CRIU's build deps (also installed by setup.sh). Uses make -j2.
set -euo pipefail

CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CACHE=${OVERLAYFS_INETSK_CACHE:-/var/cache/overlayfs-inetsk}
HERE=$(cd "$(dirname "$0")" && pwd)
PATCH="$HERE/update-inetsk.patch"
TARBALL="$CACHE/criu_4.2.1.orig.tar.xz"
DIR="$CACHE/criu-hook"
SRC="$DIR/src"
PREFIX="$DIR/prefix"
CRIU="$PREFIX/sbin/criu"

log() { printf '[criu-hook] %s\n' "$*" >&2; }
die() { printf '[criu-hook] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9

want="$(sha256sum "$PATCH" | cut -d' ' -f1) $CRIU_SHA256"
if [ -x "$CRIU" ] && [ "$(cat "$PREFIX/.stamp" 2>/dev/null)" = "$want" ]; then
  echo "$CRIU"
  exit 0
fi

[ -f "$TARBALL" ] || die "$TARBALL is missing: run scripts/setup.sh first"
echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --status || die "sha256 mismatch for $TARBALL"

log "building patched CRIU 4.2.1 into $PREFIX (test-only; about a minute)"
rm -rf "$SRC" "$PREFIX"
mkdir -p "$SRC"
tar -xJf "$TARBALL" -C "$SRC" --strip-components=1
patch -s -p1 -d "$SRC" < "$PATCH" || die "$PATCH does not apply to CRIU 4.2.1"
buildlog="$DIR/build.log"
make -C "$SRC" -j2 criu >"$buildlog" 2>&1 || { tail -30 "$buildlog"; die "build failed (log: $buildlog)"; }
make -C "$SRC" PREFIX="$PREFIX" install-criu >>"$buildlog" 2>&1 ||
  { tail -30 "$buildlog"; die "install failed (log: $buildlog)"; }
[ -x "$CRIU" ] || die "no $CRIU after the install"
grep -q 'CR_PLUGIN_HOOK__UPDATE_INETSK = 15' "$PREFIX/include/criu/criu-plugin.h" ||
  die "installed criu-plugin.h has no UPDATE_INETSK"
echo "$want" > "$PREFIX/.stamp"
log "ready: $CRIU"
echo "$CRIU"
