#!/usr/bin/env bash
# Builds the real-Xen lab from Debian packages only: Xen 4.17, the Debian
# 6.1 kernel, a busybox dom0 initramfs with xenstored/xl/rdma-core/perftest,
# and a guest initramfs. The base images are cached in $VIB_LAB_CACHE
# (default /var/cache/vib-lab), keyed by the package versions; a second run
# reuses them and only packs the scenario's overlay.
#
#   build-images.sh OUT_DIR SCENARIO_SCRIPT [PROJECT_BINARY...]
#
# Leaves in OUT_DIR: xen, vmlinuz, dom0.cpio.gz (base + overlay).
set -euo pipefail
out=$1 scenario=$2
shift 2
cache=${VIB_LAB_CACHE:-/var/cache/vib-lab}
here=$(cd "$(dirname "$0")" && pwd)

host_packages=(qemu-system-x86 busybox-static cpio kmod iproute2 rdma-core ibverbs-utils perftest
               libxen-dev xenstore-utils)
missing=()
for p in "${host_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "lab: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1)
[ -n "$kver" ] || { apt-get update -qq; kver=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*\)/\1/p' | head -1); }
guest_packages=(xen-hypervisor-4.17-amd64 "linux-image-$kver" xen-utils-4.17)
versions=$(for p in "${guest_packages[@]}" busybox-static rdma-core perftest; do
             echo "$p=$(apt-cache policy "$p" | sed -n 's/ *Candidate: //p')"; done)
key=$(echo "$versions" "$(cat "$0" "$here/init" | sha256sum)" | sha256sum | cut -c1-16)
base=$cache/base-$key

if [ ! -f "$base/done" ]; then
  echo "lab: building base images $key (cold; cached afterwards)"
  rm -rf "$base" && mkdir -p "$base/debs" "$base/root" "$base/dom0"
  (cd "$base/debs" && { apt-get download -qq "${guest_packages[@]}" 2>/dev/null ||
                         { apt-get update -qq && apt-get download -qq "${guest_packages[@]}" 2>/dev/null; }; })
  for d in "$base"/debs/*.deb; do dpkg-deb -x "$d" "$base/root"; done
  gunzip -c "$base/root/boot/xen-4.17-amd64.gz" > "$base/xen"
  cp "$base/root/boot/vmlinuz-$kver" "$base/vmlinuz"
  depmod -b "$base/root" "$kver"

  stage=$base/dom0
  mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,run,tmp,var/lib/xen,var/log/xen,var/run/xen,lib/modules}
  cp /bin/busybox "$stage/bin/busybox"
  for app in $("$stage/bin/busybox" --list); do
    [ "$app" = busybox ] || ln -sf busybox "$stage/bin/$app"
  done

  # A binary and the shared libraries it loads, at their own paths.
  add() {
    local f=$1 dest=${2:-$1}
    mkdir -p "$stage$(dirname "$dest")"
    cp -L "$f" "$stage$dest"
    ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
      [ -e "$stage$lib" ] || { mkdir -p "$stage$(dirname "$lib")"; cp -L "$lib" "$stage$lib"; }
    done
  }
  xb=$base/root/usr/lib/xen-4.17/bin
  for b in xl xenstored xenconsoled xen-init-dom0; do add "$xb/$b" "/usr/lib/xen-4.17/bin/$b"; done
  for b in xenstore-read xenstore-write xenstore-ls xenstore-rm xenstore-list xenstore-chmod xenstore-watch; do
    add "/usr/bin/$b"   # xenstore-utils of the same Xen version, on the host
  done
  for b in /usr/bin/rdma /usr/sbin/ip /usr/bin/ibv_devices /usr/bin/ibv_devinfo /usr/bin/ibv_rc_pingpong \
           /usr/bin/ib_send_lat /usr/bin/ib_write_bw; do
    add "$b"
  done
  # libibverbs finds its providers through these.
  mkdir -p "$stage/etc/libibverbs.d"
  cp /etc/libibverbs.d/rxe.driver "$stage/etc/libibverbs.d/"
  add /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
  # glibc loads it at run time for pthread_cancel (xl uses it).
  cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$stage/lib/x86_64-linux-gnu/"
  mkdir -p "$stage/etc/xen"
  : > "$stage/etc/xen/xl.conf"
  echo "root:x:0:0:root:/root:/bin/sh" > "$stage/etc/passwd"

  # Kernel modules, in load order.
  : > "$stage/modules.list"
  # rxe checksums with the crypto API's crc32; user-space verbs need ib_uverbs.
  for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs veth crc32_generic rdma_rxe ib_uverbs; do
    modprobe -d "$base/root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' |
    while read -r ko; do
      rel=${ko#"$base/root"}
      grep -qx "$rel" "$stage/modules.list" && continue
      mkdir -p "$stage$(dirname "$rel")"
      cp "$ko" "$stage$rel"
      echo "$rel" >> "$stage/modules.list"
    done
  done
  cp "$here/init" "$stage/init"
  chmod +x "$stage/init"
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$base/dom0-base.cpio.gz"

  # The guest: the same /init and tools, without the dom0 daemons' weight
  # mattering much (it runs in 512 MiB); its role comes from /proc/xen.
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$base/guest-base.cpio.gz"
  echo "$versions" > "$base/versions"
  touch "$base/done"
fi

# Overlay: the scenario and the project's files in /vib: binaries (with
# their libraries) and scripts (such as the vib hotplug script).
mkdir -p "$out"
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
cp "$scenario" "$overlay/scenario.sh"
cp "$here/scenarios/lab-common.sh" "$overlay/lab-common.sh"
chmod +x "$overlay/scenario.sh"
mkdir -p "$overlay/vib"
for f in "$@"; do
  cp -L "$f" "$overlay/vib/"
  [ "$(head -c 4 "$f" | tr -d '\177')" = ELF ] || continue
  ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [ -e "$base/dom0$lib" ] || { mkdir -p "$overlay$(dirname "$lib")"; cp -L "$lib" "$overlay$lib"; }
  done
done
(cd "$overlay" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/overlay.cpio.gz"
# Concatenated cpio archives are one initramfs to Linux. The guest's kernel
# and initramfs ride inside dom0's, for `xl create`.
# libxc inflates only the first gzip member of a ramdisk: one stream.
cat "$base/guest-base.cpio.gz" "$out/overlay.cpio.gz" | gunzip -c | gzip -1 > "$out/guest.cpio.gz"
guestfiles=$(mktemp -d)
mkdir -p "$guestfiles/boot"
cp "$base/vmlinuz" "$guestfiles/boot/vmlinuz"
cp "$out/guest.cpio.gz" "$guestfiles/boot/guest.cpio.gz"
(cd "$guestfiles" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out/guestfiles.cpio.gz"
rm -rf "$guestfiles"
cat "$base/dom0-base.cpio.gz" "$out/overlay.cpio.gz" "$out/guestfiles.cpio.gz" > "$out/dom0.cpio.gz"
ln -sf "$base/xen" "$out/xen"
ln -sf "$base/vmlinuz" "$out/vmlinuz"
echo "lab: images in $out (base $key)"
