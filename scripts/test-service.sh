#!/usr/bin/env bash
# Runs vibd.service as the vib-backend package ships it, sandbox included,
# under systemd as PID 1 (a systemd-nspawn container booting the Debian 12
# root of scripts/test-packages.sh): the unit must start (Type=notify, so
# READY=1 must come), run the vib hotplug script, serve a guest process
# (vib-devinfo), show its STATUS= in `systemctl status`, log to the journal
# with priorities, and stop. Without a hypervisor the only change to the
# unit is a drop-in that points vibd at the host-local Xen (vib-localxen,
# from the build tree) and lifts ConditionPathExists=/proc/xen/capabilities;
# the Xen and verbs device nodes are the part this cannot reach.
#
#   bash scripts/test-service.sh [DEB_DIR] [BUILD_DIR]   (./build-deb, ./build)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
debs=$(cd "${1:-$top/build-deb}" && pwd)
build=$(cd "${2:-${VIB_BUILD_DIR:-$top/build}}" && pwd)
cache=${VIB_PKGTEST_CACHE:-/var/cache/vib-pkgtest}
packages=xen-utils-common,xen-utils-4.17,xenstore-utils,libibverbs1,librdmacm1,ibverbs-utils,man-db,systemd
tarball=$cache/bookworm-$(echo "$packages" | sha256sum | cut -c1-12).tar
[ -f "$tarball" ] || bash "$top/scripts/test-packages.sh" "$debs" >/dev/null  # makes the root
command -v systemd-nspawn >/dev/null ||
  { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container; }

root=$(mktemp -d /var/tmp/vib-svctest.XXXXXX)
trap 'rm -rf "$root"' EXIT
tar -xf "$tarball" -C "$root"
mkdir -p "$root/opt/vibtest"
cp "$debs"/vib-backend_*.deb "$build/platform/local/vib-localxen" "$build/frontend-lib/vib-devinfo" "$root/opt/vibtest/"
cat > "$root/opt/vibtest/run.sh" <<'RUN'
#!/bin/sh
exec > /opt/vibtest/result.txt 2>&1
set -x
dpkg -i /opt/vibtest/vib-backend_*.deb
lx=/var/lib/vib-lx
mkdir -p $lx
systemd-run --unit=localxen /opt/vibtest/vib-localxen serve --dir $lx
i=0
until [ -S $lx/domain/0/xenstore ] || [ $i -ge 100 ]; do i=$((i + 1)); sleep 0.1; done
/opt/vibtest/vib-localxen create-domain --dir $lx --domid 5
mkdir -p /etc/systemd/system/vibd.service.d
cat > /etc/systemd/system/vibd.service.d/local-xen.conf <<CONF
[Unit]
ConditionPathExists=
[Service]
ExecStart=
ExecStart=/usr/sbin/vibd --systemd --hca soft --local-xen $lx --status-interval 100
ReadWritePaths=$lx
CONF
systemctl daemon-reload
systemctl restart vibd
echo "vibd is $(systemctl is-active vibd)"
xl="/usr/sbin/xl-vib --local-xen $lx"
$xl vib-attach 5 hca=soft,script=vib && echo "attach: ok"
/opt/vibtest/vib-devinfo --local-xen $lx --domid 5
# vibd publishes counters at most once per --status-interval, so the first
# publication may still be on its way: wait for it (bounded), then show it.
i=0
until $xl vib-list -l 5 | grep -q ", vibd running;" || [ $i -ge 100 ]; do i=$((i + 1)); sleep 0.1; done
$xl vib-list -l 5
systemctl status vibd --no-pager -n 0
journalctl -u vibd -b --no-pager -o cat -p info
journalctl -u vibd -b --no-pager -o cat -p warning..emerg | sed 's/^/PRIORITY-WARNING-OR-WORSE: /'
# A device vibd must refuse: its error is logged at error priority.
$xl vib-attach 5 hca=nosuch0 || echo "attach of a missing HCA: refused"
journalctl -u vibd -b --no-pager -o cat -p err | sed 's/^/PRIORITY-ERROR: /'
$xl vib-detach 5 0 && echo "detach: ok"
systemctl stop vibd
echo "vibd is $(systemctl is-active vibd) after stop"
RUN
chmod +x "$root/opt/vibtest/run.sh"
cat > "$root/etc/systemd/system/vibtest.service" <<'UNIT'
[Unit]
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/opt/vibtest/run.sh
ExecStopPost=/bin/systemctl poweroff --no-block
UNIT
ln -s /etc/systemd/system/vibtest.service "$root/etc/systemd/system/multi-user.target.wants/vibtest.service"

echo "== booting systemd in a container"
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 timeout 300 systemd-nspawn -q --register=no --keep-unit -D "$root" -b \
  > "$root/opt/vibtest/console.txt" 2>&1 || true
result=$root/opt/vibtest/result.txt
[ -f "$result" ] || { echo "test-service: the container ran nothing"; tail -20 "$root/opt/vibtest/console.txt"; exit 1; }

passed=0 failed=0
expect() {  # expect DESCRIPTION TEXT
  if grep -qF -- "$2" "$result"; then passed=$((passed + 1)); echo "ok   $1"
  else failed=$((failed + 1)); echo "FAIL $1 (no '$2')"; fi
}
expect_not() {
  if grep -qF -- "$2" "$result"; then failed=$((failed + 1)); echo "FAIL $1 ('$2')"
  else passed=$((passed + 1)); echo "ok   $1"; fi
}
expect "the sandboxed unit starts (READY=1 came)" "vibd is active"
expect "the hotplug script runs in the sandbox" "dom5/vib0: hotplug script /etc/xen/scripts/vib add: connected"
expect "xl vib-attach through it" "attach: ok"
expect "a guest process is served" "allocated PD handle"
expect "its context is logged with its subject" "dom5/vib0/ctx"
expect "xl vib-list -l shows what vibd published" "HCA soft0 port 1, vibd running"
expect "systemctl status shows vibd's STATUS=" 'Status: "serving 1 vib devices (1 connected)'
expect "the journal has one line per device event" "dom5/vib0: InitWait -> Connected"
expect_not "nothing at warning priority or worse" "PRIORITY-WARNING-OR-WORSE: dom"
expect "a refused device is refused" "attach of a missing HCA: refused"
expect "and logged at error priority, with its subject" "PRIORITY-ERROR: dom5/vib1: HCA unusable"
expect "xl vib-detach through it" "detach: ok"
expect "it stops" "vibd is inactive after stop"
if [ "$failed" -ne 0 ]; then echo "---- inside the container ----"; cat "$result"; fi
echo "test-service: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
