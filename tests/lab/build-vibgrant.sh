#!/usr/bin/env bash
# Builds the vibgrant guest module (frontend-lib/kernel) for the lab guest's
# kernel, against Debian's headers for exactly that kernel: the same
# linux-image-<version> build-images.sh puts in the images, its
# linux-headers and linux-kbuild packages pinned at the version apt would
# install, downloaded into $VIB_LAB_CACHE/debs and unpacked in the cache.
#
#   build-vibgrant.sh OUT_DIR        (leaves OUT_DIR/vibgrant.ko)
set -euo pipefail
out=$1
cache=${VIB_LAB_CACHE:-/var/cache/vib-lab}
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

# modinfo checks the module's vermagic; ctest -R may run this before
# build-images.sh has installed its host tools.
dpkg-query -W -f='${Status}' kmod 2>/dev/null | grep -q "install ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kmod >/dev/null

kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1)
[ -n "$kver" ] || { apt-get update -qq; kver=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1); }
candidate() { apt-cache policy "$1" | awk '$1 == "Candidate:" {print $2}'; }
image_version=$(candidate "linux-image-$kver")
# The headers and the Debian kbuild tools they name (the compiler comes from
# the build host: Debian 12's gcc-12, which built the kernel).
packages=("linux-headers-$kver" $(apt-cache depends "linux-headers-$kver" |
                                  sed -n 's/.*Depends: \(linux-\(headers\|kbuild\)-.*\)/\1/p' | sort -u))
pinned=()
for p in "${packages[@]}"; do
  v=$(candidate "$p")
  [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "lab: no candidate for $p (apt-get update?)" >&2; exit 1; }
  pinned+=("$p=$v")
done
[ "$(candidate "linux-headers-$kver")" = "$image_version" ] ||
  { echo "lab: linux-headers-$kver is not at linux-image-$kver's version $image_version" >&2; exit 1; }

headers=$cache/kheaders-$kver-$image_version
if [ ! -f "$headers/done" ]; then
  rm -rf "$headers" && mkdir -p "$cache/debs" "$headers"
  need=()
  for pv in "${pinned[@]}"; do
    name=${pv%%=*} ver=${pv#*=}
    compgen -G "$cache/debs/${name}_${ver//:/%3a}_*.deb" >/dev/null || need+=("$pv")
  done
  [ ${#need[@]} -eq 0 ] || (cd "$cache/debs" && apt-get download -qq "${need[@]}")
  for pv in "${pinned[@]}"; do
    name=${pv%%=*} ver=${pv#*=}
    for d in "$cache/debs/${name}_${ver//:/%3a}"_*.deb; do dpkg-deb -x "$d" "$headers"; done
  done
  # The arch tree's Makefile includes the common one by absolute path.
  sed -i "s|^include /usr/src/|include $headers/usr/src/|" "$headers/usr/src/linux-headers-$kver/Makefile"
  touch "$headers/done"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The source tree exactly as the vibgrant-dkms package lays it out for DKMS.
while read -r file dest; do
  [ -n "$file" ] || continue
  mkdir -p "$work/${dest#usr/src/vibgrant-*/}"
  cp "$top/$file" "$work/${dest#usr/src/vibgrant-*/}"
done < "$top/debian/vibgrant-dkms.install"
make -s -C "$headers/usr/src/linux-headers-$kver" M="$work" modules
vermagic=$(modinfo -F vermagic "$work/vibgrant.ko")
case $vermagic in
  "$kver "*) ;;
  *) echo "lab: vibgrant.ko built for '$vermagic', not $kver" >&2; exit 1 ;;
esac
mkdir -p "$out"
cp "$work/vibgrant.ko" "$out/vibgrant.ko"
echo "lab: vibgrant.ko for $kver ($image_version) in $out"
