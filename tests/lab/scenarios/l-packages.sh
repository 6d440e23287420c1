#!/bin/sh
# boot-timeout: 600
# Scenario (l): the administrator's session with vib's Debian packages, as
# the README tells it, on real Xen. dom0 installs vib-backend and
# libvib-xl-ib0 with /usr/bin/dpkg -i (their dependencies checked against the
# image's /usr/bin/dpkg database: the packages a Debian Xen dom0 has); Xen's
# /usr/sbin/xl is diverted and `xl vib-*` are plain xl subcommands; vibd
# runs from /usr/sbin with /etc/default/vibd, as its unit starts it, and a
# second one refuses; `xl create` with a vib= line gives the guest its
# device through the hotplug script in /etc/xen/scripts. The guest installs
# vib-guest with /usr/bin/dpkg -i and runs unmodified programs with no
# LD_LIBRARY_PATH: rdma-core's ibv_devices, and rdma_check moving data
# through vib with every byte checked; removing vib-guest gives them
# rdma-core's libibverbs back. Then xl vib-list/-detach/-attach and
# xl destroy, and removing vib-backend gives Xen its xl back, unchanged.
#
# /vib holds the packages, vib-rdma-check and vibgrant.ko (in a guest with
# a compiler, vibgrant-dkms would build it; this one has none). dpkg's
# programs are named by path: busybox sh would run its own dpkg applet.
. /lab-common.sh

if [ "$1" = guest ]; then
  wait_for_vib_device 0 || exit 1
  echo "guest: dpkg -i vib-guest"
  /usr/bin/dpkg -i /vib/vib-guest_*.deb > /tmp/dpkg.out 2>&1 || {
    cat /tmp/dpkg.out; echo "guest: FAIL: dpkg -i vib-guest"; exit 1; }
  grep -E '^(Setting up|Processing triggers)' /tmp/dpkg.out
  /sbin/ldconfig -p | grep 'libibverbs.so.1 '
  ibv_devices > /tmp/devices.out 2>&1
  grep -q 'vib0' /tmp/devices.out || {
    cat /tmp/devices.out; echo "guest: FAIL: ibv_devices does not list vib0 after dpkg -i vib-guest"; exit 1; }
  echo "guest: ibv_devices lists vib0, with no LD_LIBRARY_PATH: ok"
  vib-devinfo > /tmp/devinfo.out 2>&1 || {
    cat /tmp/devinfo.out; echo "guest: FAIL: vib-devinfo"; exit 1; }
  head -2 /tmp/devinfo.out
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  timeout 100 /vib/vib-rdma-check -d vib0 -n 4 > /tmp/server.out 2>&1 &
  server=$!
  timeout 100 /vib/vib-rdma-check -d vib0 -n 4 127.0.0.1 > /tmp/client.out 2>&1
  client_rc=$?
  wait $server
  server_rc=$?
  if [ $server_rc != 0 ] || [ $client_rc != 0 ]; then
    cat /tmp/server.out /tmp/client.out
    echo "guest: FAIL: rdma_check through vib0: server exited $server_rc, client $client_rc"
    exit 1
  fi
  grep -h 'all correct' /tmp/server.out
  # Objects held open for dom0's `xl vib-list -l --json` to count: the
  # ibv_rc_pingpong server's PD, MR, CQ and QP while it waits for a client.
  ibv_rc_pingpong -d vib0 > /tmp/pingpong.out 2>&1 &
  pingpong=$!
  # It listens for its client once its objects are there (its own output
  # sits in stdio's buffer until then).
  wait_until 30 listening 18515 || {
    cat /tmp/pingpong.out; echo "guest: FAIL: ibv_rc_pingpong did not set up"; exit 1; }
  /usr/bin/xenstore-write data/vib-lab/holding 1
  wait_until 120 /usr/bin/xenstore-read data/vib-lab/release >/dev/null 2>&1 || {
    echo "guest: FAIL: dom0 never released ibv_rc_pingpong"; exit 1; }
  kill $pingpong
  wait $pingpong 2>/dev/null
  echo "guest: dpkg -r vib-guest"
  /usr/bin/dpkg -r vib-guest > /tmp/dpkg.out 2>&1 || {
    cat /tmp/dpkg.out; echo "guest: FAIL: dpkg -r vib-guest"; exit 1; }
  grep -E '^(Removing|Processing triggers)' /tmp/dpkg.out
  if /sbin/ldconfig -p | grep -q '/vib/'; then
    /sbin/ldconfig -p | grep '/vib/'; echo "guest: FAIL: the loader's cache still has vib's libraries"; exit 1
  fi
  ibv_devices > /tmp/devices.out 2>&1
  if grep -q 'vib0' /tmp/devices.out; then
    cat /tmp/devices.out; echo "guest: FAIL: ibv_devices still lists vib0 after dpkg -r vib-guest"; exit 1
  fi
  echo "guest: after dpkg -r, ibv_devices (rdma-core's libibverbs) lists no vib device: ok"
  exit 0
fi

be_root=/local/domain/0/backend/vib
vibd_log=/tmp/vibd.log
vibd_bin=/usr/sbin/vibd

be_ready() {
  st=$(xenstore-read "$be_root/$guest_domid/$1/state" 2>/dev/null)
  hs=$(xenstore-read "$be_root/$guest_domid/$1/hotplug-status" 2>/dev/null)
  { [ "$st" = 2 ] || [ "$st" = 4 ]; } && [ "$hs" = connected ]
}
be_gone() { ! xenstore-ls "$be_root/$guest_domid" >/dev/null 2>&1; }

echo "== before: Xen's xl"
xen_xl=$(readlink /usr/sbin/xl) || fail "/usr/sbin/xl is not Xen's link to its wrapper"
echo "/usr/sbin/xl -> $xen_xl"
xl list >/dev/null || fail "Xen's xl list failed"
if xl vib-list >/tmp/xl.out 2>&1; then fail "Xen's own xl ran vib-list"; fi
echo "Xen's xl knows no vib-list: $(head -1 /tmp/xl.out)"

echo "== dpkg -i libvib-xl-ib0 vib-backend"
/usr/bin/dpkg -i /vib/libvib-xl-ib0_*.deb /vib/vib-backend_*.deb > /tmp/dpkg.out 2>&1 || {
  cat /tmp/dpkg.out; fail "dpkg -i of the dom0 packages failed"; }
grep -E '^(Unpacking|Setting up|Adding)' /tmp/dpkg.out
/usr/bin/dpkg-query -W -f='${Package} ${Version} ${Status}\n' vib-backend libvib-xl-ib0
for p in vib-backend libvib-xl-ib0; do
  [ "$(/usr/bin/dpkg-query -W -f='${Status}' $p)" = "install ok installed" ] || fail "$p is not installed"
done
/usr/bin/dpkg-divert --list /usr/sbin/xl
/usr/bin/dpkg-divert --list /usr/sbin/xl | grep -q 'to /usr/sbin/xl.distrib by vib-backend' ||
  fail "vib-backend did not divert Xen's /usr/sbin/xl"
[ "$(readlink /usr/sbin/xl.distrib)" = "$xen_xl" ] || fail "/usr/sbin/xl.distrib is not Xen's link"
for f in /usr/sbin/vibd /usr/sbin/xl-vib /etc/xen/scripts/vib /etc/default/vibd /lib/systemd/system/vibd.service; do
  [ -e "$f" ] || fail "vib-backend did not install $f"
done
echo "installed, Xen's xl diverted to /usr/sbin/xl.distrib: ok"

echo "== vibd as vibd.service starts it: /usr/sbin/vibd with /etc/default/vibd"
VIBD_HCA=soft
VIBD_OPTS=
. /etc/default/vibd
# shellcheck disable=SC2086 # VIBD_OPTS is a list of options
start_vibd --hca "$VIBD_HCA" $VIBD_OPTS --verbose || fail "vibd did not start within 20 s"
/usr/sbin/vibd --hca "$VIBD_HCA" > /tmp/second.out 2>&1
second_rc=$?
cat /tmp/second.out
[ $second_rc = 3 ] || fail "a second vibd exited $second_rc, not 3"
grep -q "another vibd (pid $vibd_pid) already serves domain 0" /tmp/second.out ||
  fail "a second vibd did not name the one running"
kill -0 "$vibd_pid" || fail "the first vibd died"
echo "a second vibd refused with status 3: ok"

echo "== xl create with vib = [ 'hca=soft,script=vib' ] (the hotplug script from /etc/xen/scripts)"
start_guest "vib = [ 'hca=soft,script=vib' ]"
[ -n "$guest_domid" ] || fail "xl create gave no domain"
if ! wait_until 40 be_ready 0; then
  xenstore-ls -fp "$be_root" 2>&1
  fail "domain $guest_domid has no served vib device 0 within 40 s (state '$st', hotplug-status '$hs')"
fi
xenstore-read "$be_root/$guest_domid/0/script"
echo "== xl vib-list vib-guest"
xl vib-list vib-guest > /tmp/vib-list.out 2>&1 || { cat /tmp/vib-list.out; fail "xl vib-list failed"; }
cat /tmp/vib-list.out
grep -q "^0 .*$be_root/$guest_domid/0\$" /tmp/vib-list.out || fail "xl vib-list does not list device 0"

echo "== the guest: dpkg -i vib-guest, unmodified programs through vib"
# holding: the guest holds its objects open, or has given up and reported.
holding() {
  xenstore-read "/local/domain/$guest_domid/data/vib-lab/holding" >/dev/null 2>&1 ||
    xenstore-read "/local/domain/$guest_domid/data/vib-lab/rc" >/dev/null 2>&1
}
if ! wait_until 300 holding || ! xenstore-read "/local/domain/$guest_domid/data/vib-lab/holding" >/dev/null 2>&1; then
  guest_report 1
  fail "the guest never held its ibv_rc_pingpong open"
fi

echo "== xl vib-list -l --json vib-guest counts the ibv_rc_pingpong server's objects"
# flat_status: the JSON on one line, without blanks.
flat_status() {
  xl vib-list -l --json vib-guest > /tmp/vib-list.json 2>&1 || return 1
  tr -d ' \n' < /tmp/vib-list.json
}
# vibd publishes its counters at a bounded rate: within a few seconds.
counted() {
  flat_status | grep -qE '"contexts":\[\{"id":[0-9]+,"objects":\{"pds":1,"cqs":1,"qps":1,"srqs":0,"mrs":1,"ahs":0\}'
}
if ! wait_until 20 counted; then
  cat /tmp/vib-list.json
  fail "xl vib-list -l --json does not show one context with 1 PD, 1 CQ, 1 QP and 1 MR"
fi
cat /tmp/vib-list.json
flat_status | grep -q "\"backend-path\":\"$be_root/$guest_domid/0\"" ||
  fail "xl vib-list -l --json does not give device 0's back-end path"
echo "one context with 1 PD, 1 CQ, 1 QP, 1 MR: ok"
xenstore-write "/local/domain/$guest_domid/data/vib-lab/release" 1

echo "== the guest: dpkg -r vib-guest"
guest_report 120 > /tmp/guest-report.out || { cat /tmp/guest-report.out; fail "the guest's part failed"; }
cat /tmp/guest-report.out

echo "== xl vib-detach vib-guest 0, xl vib-attach vib-guest hca=soft script=vib"
xl vib-detach vib-guest 0 || fail "xl vib-detach vib-guest 0 failed"
xenstore-ls "$be_root/$guest_domid/0" >/dev/null 2>&1 && fail "$be_root/$guest_domid/0 is still there after vib-detach"
xl vib-attach vib-guest hca=soft script=vib || fail "xl vib-attach vib-guest hca=soft script=vib failed"
attached=$(xenstore-list "$be_root/$guest_domid" | head -1)
[ -n "$attached" ] || fail "xl vib-attach wrote no back-end device"
wait_until 40 be_ready "$attached" ||
  fail "the attached device $attached is not served within 40 s (state '$st', hotplug-status '$hs')"
xl vib-list vib-guest
echo "detached and attached: ok"

xl destroy vib-guest || fail "xl destroy vib-guest failed"
wait_until 10 be_gone || fail "$be_root/$guest_domid is still there 10 s after xl destroy"
kill "$vibd_pid"
wait "$vibd_pid"
echo "vibd exited with status $?"

echo "== dpkg -r vib-backend libvib-xl-ib0"
/usr/bin/dpkg -r vib-backend libvib-xl-ib0 > /tmp/dpkg.out 2>&1 || { cat /tmp/dpkg.out; fail "dpkg -r failed"; }
grep -E '^(Removing)' /tmp/dpkg.out
[ -z "$(/usr/bin/dpkg-divert --list /usr/sbin/xl)" ] || fail "the divert of /usr/sbin/xl stays: $(/usr/bin/dpkg-divert --list /usr/sbin/xl)"
[ "$(readlink /usr/sbin/xl)" = "$xen_xl" ] || fail "/usr/sbin/xl is not Xen's link after removal"
[ ! -e /usr/sbin/xl.distrib ] && [ ! -e /usr/sbin/vibd ] || fail "files of vib-backend stay after removal"
xl list >/dev/null || fail "Xen's xl list failed after removal"
if xl vib-list >/dev/null 2>&1; then fail "xl still runs vib-list after removal"; fi
echo "Xen's xl is back, unchanged: ok"
exit 0
