# shellcheck shell=bash
# Sourced by scripts/setup.sh and the Dockerfile. The deb-src entry that fetches CRIU's
# source package uses the Debian mirror this machine's apt already uses (a local mirror or
# a proxy URI keeps working; the project names no host).
#
#   apt_mirror [ROOT]      print the first URI of an enabled binary (`deb`) entry for this
#                          release's own suite (VERSION_CODENAME in ROOT/etc/os-release),
#                          read from ROOT/etc/apt/sources.list and sources.list.d/*.list,
#                          *.sources (one-line and deb822 formats), in apt's order
#   criu_src_entry [ROOT]  print the deb822 entry: deb-src ONLY, suite sid (a binary sid
#                          entry would upgrade libc on the next install), Debian's keyring

apt_mirror() {
  local root=${1:-} codename f
  local -a files=()
  codename=$(sed -n 's/^VERSION_CODENAME=["'\'']\{0,1\}\([^"'\'']*\).*/\1/p' \
    "$root/etc/os-release" 2>/dev/null | head -1)
  if [ -z "$codename" ]; then
    echo "apt-mirror: $root/etc/os-release names no VERSION_CODENAME" >&2
    return 1
  fi
  [ -f "$root/etc/apt/sources.list" ] && files+=("$root/etc/apt/sources.list")
  for f in "$root"/etc/apt/sources.list.d/*; do
    case $f in *.list|*.sources) [ -f "$f" ] && files+=("$f") ;; esac
  done
  [ ${#files[@]} -gt 0 ] && awk -v want="$codename" '
    function has(list, word,   n, i, a) {
      n = split(list, a, /[ \t]+/)
      for (i = 1; i <= n; i++) if (a[i] == word) return 1
      return 0
    }
    function para_end(   u) {
      if (has(types, "deb") && has(suites, want) && tolower(enabled) != "no" && uris != "") {
        split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
      }
      types = uris = suites = enabled = ""
    }
    FNR == 1 { if (deb822) para_end(); deb822 = FILENAME ~ /\.sources$/ }
    deb822 {
      if ($0 ~ /^[ \t]*#/) next
      if ($0 ~ /^[ \t]*$/) { para_end(); next }
      if ($0 ~ /^[ \t]/) next                      # a continuation line (e.g. a key block)
      i = index($0, ":"); if (!i) next
      key = tolower(substr($0, 1, i - 1)); val = substr($0, i + 1)
      gsub(/^[ \t]+|[ \t]+$/, "", val)
      if (key == "types") types = val; else if (key == "uris") uris = val
      else if (key == "suites") suites = val; else if (key == "enabled") enabled = val
      next
    }
    {
      sub(/#.*/, "")
      if ($1 != "deb") next
      k = 2
      if ($k ~ /^\[/) { while (k <= NF && $k !~ /\]$/) k++; k++ }
      if ($(k + 1) == want && $k != "") { print $k; found = 1; exit }
    }
    END { if (!found && deb822) para_end(); if (!found) exit 1 }
  ' "${files[@]}" && return 0
  echo "apt-mirror: no enabled 'deb' entry for $codename in $root/etc/apt/sources.list{,.d}" >&2
  return 1
}

criu_src_entry() {
  local uri
  uri=$(apt_mirror "${1:-}") || return 1
  printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: %s\n' \
    "$uri" /usr/share/keyrings/debian-archive-keyring.gpg
}
