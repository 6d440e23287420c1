#!/usr/bin/env bash
# Installs the Debian packages (scripts/build-packages.sh) with dpkg -i into
# a throwaway Debian 12 root that has Xen's tools and rdma-core, and checks
# what an administrator relies on: `xl vib-*` as plain xl subcommands and
# everything else reaching Xen's xl, `xl create` checking vib= lines, verbs
# programs loading vib's libibverbs.so.1, the manuals, the unit enabled; then
# that removing the packages gives back Xen's xl and rdma-core's library
# exactly, and that purging leaves nothing.
#
#   bash scripts/test-packages.sh [DEB_DIR]     (default ./build-deb)
#
# The root is made once with mmdebstrap and cached in $VIB_PKGTEST_CACHE
# (default /var/cache/vib-pkgtest). No hypervisor is needed: Xen's xl is
# reached (it then fails to open the hypervisor, which proves the routing).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
debs=$(cd "${1:-$top/build-deb}" && pwd)
cache=${VIB_PKGTEST_CACHE:-/var/cache/vib-pkgtest}
packages=xen-utils-common,xen-utils-4.17,xenstore-utils,libibverbs1,librdmacm1,ibverbs-utils,man-db,systemd
tarball=$cache/bookworm-$(echo "$packages" | sha256sum | cut -c1-12).tar

if [ "$(id -u)" -ne 0 ]; then
  echo "test-packages: run as root (chroot)" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap; }
if [ ! -f "$tarball" ]; then
  mkdir -p "$cache"
  echo "test-packages: making a Debian 12 root with $packages (cached afterwards)"
  mirror=http://deb.debian.org/debian
  mmdebstrap --quiet --variant=apt --format=tar --include="$packages" bookworm "$tarball.tmp" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
  mv "$tarball.tmp" "$tarball"
fi

root=$(mktemp -d /var/tmp/vib-pkgtest.XXXXXX)
cleanup() {
  mountpoint -q "$root/proc" && umount "$root/proc"
  rm -rf "$root"
}
trap cleanup EXIT
tar -xf "$tarball" -C "$root"
mount -t proc proc "$root/proc"
mkdir -p "$root/debs"
cp "$debs"/vib-backend_*.deb "$debs"/vib-guest_*.deb "$debs"/libvib-xl-ib0_*.deb "$debs"/libvib-xl-ib-dev_*.deb \
   "$root/debs/"
# Xen's wrapper picks /usr/lib/xen-<major>.<minor>/bin/xl from sysfs: a
# plain directory in this root, not the host's sysfs.
mkdir -p "$root/sys/hypervisor/version"
echo xen > "$root/sys/hypervisor/type"
echo 4 > "$root/sys/hypervisor/version/major"
echo 17 > "$root/sys/hypervisor/version/minor"
cat > "$root/etc/xen/bad.cfg" <<'CFG'
name = "guest1"
vib = [ 'hca=soft,colour=blue' ]
CFG

in_root() { chroot "$root" /bin/sh -c "$1" 2>&1; }
passed=0 failed=0
check() {  # check DESCRIPTION COMMAND EXPECTED-SUBSTRING
  local out
  out=$(in_root "$2" || true)
  if [[ "$out" == *"$3"* ]]; then
    passed=$((passed + 1)); echo "ok   $1"
  else
    failed=$((failed + 1)); echo "FAIL $1: '$2' printed:"; echo "$out" | sed 's/^/     /'
  fi
}

# vibgrant-dkms is checked from outside: building it needs the guest
# kernel's headers (the lab builds the same source tree, laid out from
# debian/vibgrant-dkms.install, against its guest kernel's).
echo "== vibgrant-dkms"
dkms_deb=$(ls "$debs"/vibgrant-dkms_*_all.deb)
dkms_files=$(dpkg-deb -c "$dkms_deb" | awk '{print $NF}')
host_check() {  # host_check DESCRIPTION ACTUAL EXPECTED-SUBSTRING
  if [[ "$2" == *"$3"* ]]; then
    passed=$((passed + 1)); echo "ok   $1"
  else
    failed=$((failed + 1)); echo "FAIL $1: got:"; echo "$2" | sed 's/^/     /'
  fi
}
for f in dkms.conf Kbuild Makefile vibgrant.c include/vib/vibgrant.h; do
  host_check "vibgrant-dkms ships $f" "$dkms_files" "./usr/src/vibgrant-0.1/$f"
done
host_check "dkms.conf names the directory's version" \
  "$(dpkg-deb --fsys-tarfile "$dkms_deb" | tar -xO ./usr/src/vibgrant-0.1/dkms.conf)" 'PACKAGE_VERSION="0.1"'
host_check "vibgrant-dkms depends on dkms" "$(dpkg-deb -f "$dkms_deb" Depends)" "dkms"
host_check "its postinst has DKMS build it" "$(dpkg-deb --ctrl-tarfile "$dkms_deb" | tar -xO ./postinst)" \
  "dkms"

xl_before=$(in_root 'readlink /usr/sbin/xl')
check "rdma-core's libibverbs before install" 'ldd /usr/bin/ibv_devinfo' \
  "libibverbs.so.1 => /lib/x86_64-linux-gnu/libibverbs.so.1"

echo "== dpkg -i"
in_root 'dpkg -i /debs/*.deb' | tail -3
check "Xen's xl diverted" 'dpkg-divert --list /usr/sbin/xl' \
  "diversion of /usr/sbin/xl to /usr/sbin/xl.distrib by vib-backend"
check "xl is vib's front" 'head -3 /usr/sbin/xl' "xl front for vib"
check "xl vib-list is an xl subcommand" 'xl vib-list --help' "Usage: xl vib-list [-l] [--json]"
check "xl vib-attach is an xl subcommand" 'xl vib-attach --help' "Usage: xl vib-attach"
check "xen vib-detach too" 'xen vib-detach --help' "Usage: xl vib-detach"
check "other subcommands reach Xen's xl" 'xl list' "cannot init xl context"
check "xl help is Xen's" 'xl help' "cannot init xl context"
check "a bad vib= line stops xl create" 'xl create /etc/xen/bad.cfg; echo "exit $?"' \
  "unknown key 'colour'"
check "... before Xen's xl runs" 'xl create /etc/xen/bad.cfg; echo "exit $?"' "exit 1"
check "verbs programs load vib's libibverbs.so.1" 'ldd /usr/bin/ibv_devinfo' \
  "libibverbs.so.1 => /usr/lib/x86_64-linux-gnu/vib/libibverbs.so.1"
check "the loader's cache lists vib's first" 'ldconfig -p | grep -m1 "libibverbs.so.1 "' "/vib/libibverbs.so.1"
check "vibd.service enabled" 'readlink /etc/systemd/system/multi-user.target.wants/vibd.service' \
  "/lib/systemd/system/vibd.service"
check "vibd.service is Type=notify" 'grep ^Type= /lib/systemd/system/vibd.service' "Type=notify"
check "systemd accepts the unit" 'systemd-analyze verify /lib/systemd/system/vibd.service && echo verified' \
  "verified"
check "the unit is hardened" \
  'systemd-analyze security --offline=true /lib/systemd/system/vibd.service | tail -1' "Overall exposure level"
check "the hotplug script in Xen's directory" 'test -x /etc/xen/scripts/vib && echo yes' "yes"
check "defaults file" 'grep ^VIBD_HCA= /etc/default/vibd' "VIBD_HCA=soft"
for page in vibd xl-vib xl-vib-configuration vib-devinfo; do
  check "man $page renders without warnings" \
    "MANWIDTH=80 man --warnings $page >/dev/null && echo rendered" "rendered"
done
check "the -dev package's pkg-config file" 'cat /usr/lib/x86_64-linux-gnu/pkgconfig/vib-xl-ib.pc' "-lvib-xl-ib"

echo "== dpkg -r"
in_root 'dpkg -r vib-backend vib-guest libvib-xl-ib-dev libvib-xl-ib0' | tail -2
check "Xen's xl back, the same link" 'readlink /usr/sbin/xl' "$xl_before"
check "no diversion left" 'dpkg-divert --list | grep -c vib-backend' "0"
check "no xl.distrib left" 'ls /usr/sbin/xl.distrib' "No such file"
check "xen-utils-common verifies clean" 'dpkg -V xen-utils-common libibverbs1 && echo clean' "clean"
check "Xen's xl runs as before" 'xl list' "cannot init xl context"
check "rdma-core's libibverbs again" 'ldd /usr/bin/ibv_devinfo' \
  "libibverbs.so.1 => /lib/x86_64-linux-gnu/libibverbs.so.1"

echo "== dpkg -P"
in_root 'dpkg -P vib-backend vib-guest' | tail -1
check "purge leaves no configuration" 'ls /etc/default/vibd /etc/ld.so.conf.d/00-vib.conf /var/lib/vib 2>&1 | grep -c "No such file"' "3"

echo "test-packages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
