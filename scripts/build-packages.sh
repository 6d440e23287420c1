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
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${VIB_DEB_DIR:-$top/build-deb}

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
(cd "$top" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp -P --parents -t "$src")
# shellcheck disable=SC2206 # DEB_BUILD_OPTIONS is a list of words
opts=(${DEB_BUILD_OPTIONS:-} "parallel=$(nproc)")
[ "${VIB_DEB_CHECK:-0}" = 1 ] || opts+=(nocheck)
# ccache's compiler links, when ccache is there: rebuilds are quick.
[ -d /usr/lib/ccache ] && export PATH=/usr/lib/ccache:$PATH
(cd "$src" && DEB_BUILD_OPTIONS="${opts[*]}" dpkg-buildpackage -us -uc -b "$@")

mkdir -p "$out"
rm -f "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo
cp "$work"/*.deb "$work"/*.changes "$work"/*.buildinfo "$out"/
echo "== lintian"
lintian --fail-on error,warning --info --display-info "$out"/*.changes
ls -l "$out"/*.deb
