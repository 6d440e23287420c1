#!/usr/bin/env bash
# Builds vib's Debian packages with Debian's own tooling: installs the build
# dependencies that debian/control names (apt-get build-dep), then runs
# dpkg-buildpackage and lintian. The packages land in $VIB_DEB_DIR (default
# ./build-deb). Extra arguments go to dpkg-buildpackage.
#
#   bash scripts/build-packages.sh             # the packages, no test run
#   VIB_DEB_CHECK=1 bash scripts/build-packages.sh   # and the unit tests
#
# The tests are off by default (DEB_BUILD_OPTIONS=nocheck): scripts/test.sh
# runs the same suite on the same sources.
#
# VIB_DEB_REUSE_FROM=DIR takes the packages from DIR instead of building
# them, when DIR holds packages built (by this script) from the same
# sources and arguments: the lab's package scenario uses those CI's package
# stage built and checked minutes before.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${VIB_DEB_DIR:-$top/build-deb}

# The sources this script builds from: the tree's files that git knows or
# would add, as the copy below takes them.
source_files() {
  (cd "$top" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done)
}
# Every such file's path and content, and the arguments: what the packages
# in a directory were built from (its file `source-digest`).
source_digest() {
  { (cd "$top" && source_files | xargs -0 sha256sum); printf 'args: %s\n' "$*"; } | sha256sum | cut -d' ' -f1
}
# Replaces the packages in $out with those in $1 (and its digest, if any).
put_packages() {
  mkdir -p "$out"
  [ "$(cd "$1" && pwd)" = "$(cd "$out" && pwd)" ] && return
  rm -f "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo "$out"/source-digest
  cp "$1"/*.deb "$1"/*.changes "$1"/*.buildinfo "$out"/
  if [ -e "$1/source-digest" ]; then cp "$1/source-digest" "$out"/; fi
}
digest=$(source_digest "$@")
reuse=${VIB_DEB_REUSE_FROM:-}
if [ -n "$reuse" ] && [ "$(cat "$reuse/source-digest" 2>/dev/null)" = "$digest" ] &&
   compgen -G "$reuse/*.deb" >/dev/null; then
  put_packages "$reuse"
  echo "build-packages: $reuse holds the packages of these sources (built and checked by lintian there): taken, not rebuilt"
  ls -l "$out"/*.deb
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "build-packages: run as root (apt-get build-dep)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
tools=(dpkg-dev debhelper lintian)
missing=()
for p in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# What debian/control's Build-Depends names, as for any Debian source.
if ! dpkg-checkbuilddeps "$top/debian/control" 2>/dev/null; then
  apt-get update -qq
  apt-get build-dep -y -qq "$top"
fi

# dpkg-buildpackage writes the packages next to the source tree: build in a
# copy, so the tree stays clean and the results land in one place. The copy
# has a fixed path, so that ccache recognises the compilations of the last
# build (the path is in the compiler's -ffile-prefix-map).
work=${VIB_DEB_WORK:-/var/tmp/vib-deb-build}
rm -rf "$work"
trap 'rm -rf "$work"' EXIT
src=$work/vib
mkdir -p "$src"
(cd "$top" && source_files | xargs -0 cp -P --parents -t "$src")
# shellcheck disable=SC2206 # DEB_BUILD_OPTIONS is a list of words
opts=(${DEB_BUILD_OPTIONS:-} "parallel=$(nproc)")
[ "${VIB_DEB_CHECK:-0}" = 1 ] || opts+=(nocheck)
# ccache's compiler links, when ccache is there: rebuilds are quick.
[ -d /usr/lib/ccache ] && export PATH=/usr/lib/ccache:$PATH
(cd "$src" && DEB_BUILD_OPTIONS="${opts[*]}" dpkg-buildpackage -us -uc -b "$@")

put_packages "$work"
echo "== lintian"
lintian --fail-on error,warning --info --display-info "$out"/*.changes
# Only packages lintian passed say what they were built from.
echo "$digest" > "$out/source-digest"
ls -l "$out"/*.deb
