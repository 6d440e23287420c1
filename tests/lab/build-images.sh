#!/usr/bin/env bash
# Builds the real-Xen lab from Debian packages only: Xen 4.17, the Debian
# 6.1 kernel, a busybox dom0 initramfs with xenstored/xl/rdma-core/perftest/rping,
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

# Tools this script runs on the build host (nothing of the host goes into
# the images).
host_packages=(qemu-system-x86 cpio kmod binutils)
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
# What the images run, and the libraries the project's binaries link to
# (the overlay takes them from the image, never from the host).
image_packages=(xen-hypervisor-4.17-amd64 "linux-image-$kver" xen-utils-4.17 xenstore-utils busybox-static
                iproute2 rdma-core ibverbs-utils ibverbs-providers perftest rdmacm-utils libgcc-s1 libstdc++6
                libibverbs1 librdmacm1 libxenstore4 libxengnttab1 libxenevtchn1 libxenmisc4.17 libxentoollog1
                libsystemd0 dpkg libc-bin)
# Their dependency closure (Depends and Pre-Depends), each package pinned
# at the version apt would install: one consistent set of Debian packages.
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
            --no-replaces --no-enhances "${image_packages[@]}" | grep -v '^[ <]' | sort -u)
# shellcheck disable=SC2086 # one name per word
pinned=$(apt-cache policy $closure | awk '/^[^ ]/ {p = $1; sub(/:$/, "", p)}
                                           $1 == "Candidate:" {print p "=" $2}')
if [ "$(echo "$pinned" | wc -l)" -ne "$(echo "$closure" | wc -l)" ] || echo "$pinned" | grep -q '=(none)$'; then
  echo "lab: cannot pin the image's packages (apt-get update?):" >&2
  echo "$pinned" | grep '=(none)$' >&2 || true
  exit 1
fi
key=$(echo "$pinned" "$(cat "$0" "$here/init" | sha256sum)" | sha256sum | cut -c1-16)
base=$cache/base-$key

# in_root ROOT PATH: PATH's target inside ROOT, following symbolic links
# (absolute ones relative to ROOT, as they would be inside the image).
in_root() {
  local root=$1 path=$2 hops=0 link
  while [ -L "$root$path" ]; do
    link=$(readlink "$root$path")
    case $link in
      /*) path=$link ;;
      *) path=$(dirname "$path")/$link ;;
    esac
    hops=$((hops + 1))
    [ $hops -lt 40 ] || return 1
  done
  [ -e "$root$path" ] && echo "$path"
}

# The directories the dynamic loader searches (Debian's multiarch ones).
lib_dirs=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib /usr/lib /lib64 /usr/lib64)

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | tr -d '\177')" = ELF ]; }
needed_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
runpath_of() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(\(RUNPATH\|RPATH\)).*\[\(.*\)\]/\2/p' | tr ':' ' '; }
interp_of() { readelf -l "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'; }

# find_lib ROOT NAME ELF: where NAME (a DT_NEEDED of ELF, a path inside
# ROOT) is found inside ROOT.
find_lib() {
  local root=$1 name=$2 elf=$3 d
  for d in $(runpath_of "$root$elf") "${lib_dirs[@]}"; do
    d=${d//\$ORIGIN/$(dirname "$elf")}
    in_root "$root" "$d/$name" >/dev/null && { echo "$d/$name"; return 0; }
  done
  return 1
}

# copy_from_root ROOT STAGE PATH: PATH (inside ROOT) into STAGE at the same
# path, with its interpreter and the closure of its DT_NEEDED, all from ROOT.
copy_from_root() {
  local root=$1 stage=$2 path=$3 real lib interp
  [ -e "$stage$path" ] && return 0
  real=$(in_root "$root" "$path") || { echo "lab: $path is not in the image's packages" >&2; return 1; }
  mkdir -p "$stage$(dirname "$path")"
  cp "$root$real" "$stage$path"
  is_elf "$stage$path" || return 0
  interp=$(interp_of "$stage$path")
  [ -z "$interp" ] || copy_from_root "$root" "$stage" "$interp"
  for lib in $(needed_of "$stage$path"); do
    lib=$(find_lib "$root" "$lib" "$path") || {
      echo "lab: $path needs $lib, which no package of the image provides" >&2; return 1; }
    copy_from_root "$root" "$stage" "$lib"
  done
}

# check_image TREE: every ELF program and library in TREE finds its
# interpreter and every DT_NEEDED inside TREE; lists what does not.
check_image() {
  local tree=$1 bad=0 f rel lib interp
  while IFS= read -r f; do
    is_elf "$f" || continue
    rel=${f#"$tree"}
    interp=$(interp_of "$f")
    if [ -n "$interp" ] && ! in_root "$tree" "$interp" >/dev/null; then
      echo "lab: image check: $rel: interpreter $interp is not in the image" >&2; bad=1
    fi
    for lib in $(needed_of "$f"); do
      find_lib "$tree" "$lib" "$rel" >/dev/null ||
        { echo "lab: image check: $rel needs $lib, not in the image" >&2; bad=1; }
    done
  done < <(find "$tree" -type f ! -name '*.ko' ! -name '*.ko.*')
  return $bad
}

# deb_of NAME [VERSION]: the downloaded package NAME of the image (at
# VERSION, or the one pinned).
deb_of() {
  local ver=${2:-$(echo "$pinned" | sed -n "s/^$1=//p")}
  compgen -G "$cache/debs/${1}_${ver//:/%3a}_*.deb" | head -1
}

if [ ! -f "$base/done" ]; then
  echo "lab: building base images $key (cold; cached afterwards)"
  rm -rf "$base" && mkdir -p "$cache/debs" "$base/root" "$base/dom0"
  # The downloads are kept across keys: a package at a version is the same file.
  need=()
  for pv in $pinned; do
    name=${pv%%=*} ver=${pv#*=}
    compgen -G "$cache/debs/${name}_${ver//:/%3a}_*.deb" >/dev/null || need+=("$pv")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "lab: downloading ${#need[@]} packages"
    (cd "$cache/debs" && { apt-get download -qq "${need[@]}" 2>/dev/null ||
                           { apt-get update -qq && apt-get download -qq "${need[@]}"; }; })
  fi
  for pv in $pinned; do
    name=${pv%%=*} ver=${pv#*=}
    for d in "$cache/debs/${name}_${ver//:/%3a}"_*.deb; do dpkg-deb -x "$d" "$base/root"; done
  done
  echo "$pinned" > "$base/packages"
  root=$base/root
  gunzip -c "$root/boot/xen-4.17-amd64.gz" > "$base/xen"
  cp "$root/boot/vmlinuz-$kver" "$base/vmlinuz"
  depmod -b "$root" "$kver"

  stage=$base/dom0
  mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,run,tmp,var/lib/xen,var/log/xen,var/run/xen,lib/modules}
  copy_from_root "$root" "$stage" /bin/busybox
  for app in $("$stage/bin/busybox" --list); do
    [ "$app" = busybox ] || ln -sf busybox "$stage/bin/$app"
  done

  for b in xl xenstored xenconsoled xen-init-dom0 libxl-save-helper; do copy_from_root "$root" "$stage" "/usr/lib/xen-4.17/bin/$b"; done
  for b in xenstore-read xenstore-write xenstore-ls xenstore-rm xenstore-list xenstore-chmod xenstore-watch \
           rdma ibv_devices ibv_devinfo ibv_rc_pingpong ibv_ud_pingpong \
           ib_send_lat ib_write_lat ib_send_bw ib_write_bw rping ucmatose udaddy; do
    copy_from_root "$root" "$stage" "/usr/bin/$b"
  done
  # iproute2 installs ip in /sbin; the scenarios name it by its usrmerged path.
  copy_from_root "$root" "$stage" /sbin/ip
  mkdir -p "$stage/usr/sbin" && ln -s /sbin/ip "$stage/usr/sbin/ip"
  # libibverbs finds its providers through these.
  copy_from_root "$root" "$stage" /etc/libibverbs.d/rxe.driver
  copy_from_root "$root" "$stage" /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
  # glibc loads it at run time for pthread_cancel (xl uses it).
  copy_from_root "$root" "$stage" /lib/x86_64-linux-gnu/libgcc_s.so.1
  mkdir -p "$stage/etc/xen"
  : > "$stage/etc/xen/xl.conf"
  echo "root:x:0:0:root:/root:/bin/sh" > "$stage/etc/passwd"

  # Kernel modules, in load order.
  : > "$stage/modules.list"
  # rxe checksums with the crypto API's crc32; user-space verbs need ib_uverbs
  # and user-space RDMA-CM (native rping, vibd's ids for peers outside vib)
  # rdma_ucm; guests that talk TCP to each other get a vif (netfront) on a
  # bridge in dom0 (netback).
  for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs veth crc32_generic rdma_rxe ib_uverbs rdma_ucm \
           xen-netback xen-netfront bridge; do
    modprobe -d "$root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' |
    while read -r ko; do
      rel=${ko#"$root"}
      grep -qx "$rel" "$stage/modules.list" && continue
      mkdir -p "$stage$(dirname "$rel")"
      cp "$ko" "$stage$rel"
      echo "$rel" >> "$stage/modules.list"
    done
  done
  # What an administrator installs vib's packages with (scenario l): dpkg;
  # ldconfig, whose trigger puts vib-guest's libraries first for the loader;
  # Xen's /usr/sbin/xl (its version wrapper), which vib-backend diverts; and
  # a dpkg database listing every package the image was cut from, so that
  # dpkg checks vib's dependencies against what a Debian Xen dom0 has. The
  # image holds only the files of those packages that the lab runs.
  dpkg-deb -c "$(deb_of dpkg)" | awk '$1 !~ /^d/ {print substr($6, 2)}' |
    grep -v -e '^/usr/share/\(doc\|man\|locale\|lintian\|polkit-1\|zsh\|bash-completion\|bug\)/' \
            -e '^/etc/\(cron\|logrotate\)' -e '^/lib/systemd/' |
    while read -r f; do copy_from_root "$root" "$stage" "$f"; done
  # dpkg-deb runs GNU tar with options busybox's lacks; busybox's dpkg
  # applets are not dpkg (the scenario names the real ones by path: busybox
  # sh runs its applets first).
  rm -f "$stage/bin/tar" "$stage/bin/dpkg" "$stage/bin/dpkg-deb"
  for f in /bin/tar /sbin/ldconfig /etc/ld.so.conf /etc/ld.so.conf.d/libc.conf /etc/ld.so.conf.d/x86_64-linux-gnu.conf \
           /usr/lib/xen-common/bin/xen-utils-wrapper; do
    copy_from_root "$root" "$stage" "$f"
  done
  mkdir -p "$stage/usr/sbin" && ln -s "$(readlink "$root/usr/sbin/xl")" "$stage/usr/sbin/xl"
  db=$stage/var/lib/dpkg
  mkdir -p "$db/info" "$db/updates" "$db/triggers" "$db/alternatives" "$stage/etc/alternatives"
  # Info files of Multi-Arch: same packages are named PACKAGE:ARCH.
  echo 1 > "$db/info/format"
  : > "$db/available"; : > "$db/diversions"; : > "$db/statoverride"
  : > "$db/triggers/File"; : > "$db/triggers/Unincorp"
  for pv in $pinned; do
    deb=$(deb_of "${pv%%=*}" "${pv#*=}")
    name=$(dpkg-deb -f "$deb" Package)
    [ "$(dpkg-deb -f "$deb" Multi-Arch)" != same ] || name=$name:$(dpkg-deb -f "$deb" Architecture)
    dpkg-deb -f "$deb" | awk 'NR == 1 {print; print "Status: install ok installed"; next} {print}' >> "$db/status"
    echo >> "$db/status"
    dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -e 's|^\./|/|' -e 's|^/$|/.|' -e 's|\(.\)/$|\1|' > "$db/info/$name.list"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./md5sums > "$db/info/$name.md5sums" 2>/dev/null || rm -f "$db/info/$name.md5sums"
  done
  # libc-bin runs ldconfig when a package activates its trigger.
  echo libc-bin > "$db/triggers/ldconfig"
  dpkg-deb --ctrl-tarfile "$(deb_of libc-bin)" | tar -xO ./postinst > "$db/info/libc-bin.postinst"
  dpkg-deb --ctrl-tarfile "$(deb_of libc-bin)" | tar -xO ./triggers > "$db/info/libc-bin.triggers"
  chmod 755 "$db/info/libc-bin.postinst"

  cp "$here/init" "$stage/init"
  chmod +x "$stage/init"
  check_image "$stage" || { echo "lab: the base image is inconsistent; not cached" >&2; exit 1; }
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$base/dom0-base.cpio.gz"

  # The guest: the same /init and tools, without the dom0 daemons' weight
  # mattering much (it runs in 512 MiB); its role comes from /proc/xen.
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$base/guest-base.cpio.gz"
  touch "$base/done"
fi

# Overlay: the scenario and the project's files in /vib: binaries (with
# their libraries) and scripts (such as the vib hotplug script).
mkdir -p "$out"
overlay=$(mktemp -d)
cp "$scenario" "$overlay/scenario.sh"
cp "$here/scenarios/lab-common.sh" "$overlay/lab-common.sh"
# The scenarios' settings from the caller's environment (numbers only), for
# them to source from /lab-settings: the domains do not inherit it.
for setting in VIB_LAB_CONTROL_RUNS VIB_LAB_REPEAT; do
  value=${!setting-}
  [ -n "$value" ] || continue
  [[ $value =~ ^[0-9]+$ ]] || { echo "lab: $setting must be a number, not '$value'" >&2; exit 1; }
  echo "$setting=$value" >> "$overlay/lab-settings"
done
chmod +x "$overlay/scenario.sh"
mkdir -p "$overlay/vib"
# Debian packages among them (scenario l installs them with dpkg -i): the
# libraries their programs need come from the image's packages too, into the
# overlay, since the base image holds only what the lab itself runs.
debs_root=$(mktemp -d)
trap 'rm -rf "$overlay" "$debs_root"' EXIT
for f in "$@"; do
  case $f in *.deb) dpkg-deb -x "$f" "$debs_root" ;; esac
done
# bring_libraries ELF PATH RIDES_ALONG: each library that ELF (at PATH in
# the domains) needs and dom0's base image lacks, copied into the overlay
# from the image's packages, unless the command RIDES_ALONG says the
# overlay carries it already; a library the image lacks fails the build.
bring_libraries() {
  local elf=$1 path=$2 rides_along=$3 lib
  for lib in $(needed_of "$elf"); do
    find_lib "$base/dom0" "$lib" "$path" >/dev/null && continue
    "$rides_along" "$lib" "$path" && continue
    lib=$(find_lib "$base/root" "$lib" "$path") ||
      { echo "lab: $path needs $lib, which no package of the image provides" >&2; exit 1; }
    copy_from_root "$base/root" "$overlay" "$lib"
  done
}
# A library of the packages' own, or of vib's own in /vib (found through
# RUNPATH $ORIGIN).
in_the_packages() { find_lib "$debs_root" "$1" "$2" >/dev/null; }
in_vib_dir() { [ -e "$overlay/vib/$1" ]; }
while IFS= read -r f; do
  is_elf "$f" || continue
  bring_libraries "$f" "${f#"$debs_root"}" in_the_packages
done < <(find "$debs_root" -type f)
for f in "$@"; do
  cp -L "$f" "$overlay/vib/"
  is_elf "$f" || continue
  bring_libraries "$f" "/vib/$(basename "$f")" in_vib_dir
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
