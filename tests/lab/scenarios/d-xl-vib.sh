#!/bin/sh
# boot-timeout: 600
# Scenario (d): `xl create` with a vib= line on real Xen, through the xl
# front (ahead of Xen's xl in PATH, as administrators install it): it checks
# and keeps the vib= lines, Xen's xl creates the domain, and vibd (real Xen,
# software HCA, the vib hotplug script) sees the domain introduced, finds
# the kept config by the domain's name and adds its vib device; the guest's
# vib-devinfo talks to vibd over real grants, event channels and xenstore;
# then data through vib, every byte checked: two rdma_check processes in
# the guest with vib's libibverbs.so.1, on device 0 (the software HCA) and
# on device 1 (rxe0 in dom0 behind vibd: the rdma-core HCA path), next to
# the same check natively over rxe0 in dom0 in this boot, the figures side
# by side; then `xl vib-list`, `xl vib-detach`, `xl vib-attach` and
# `xl destroy`, after which vibd removes the dead domain's back-end directory.
#
# dom0 gets /vib/vibd, /vib/xl-vib, /vib/vib-devinfo, /vib/vib (the hotplug
# script, so /vib is vibd's --scripts-dir), /vib/xl (the front),
# /vib/vib-rdma-check, vib's /vib/libibverbs.so.1 and /vib/vibgrant.ko (the
# guest module registration needs); the guest the same.
. /lab-common.sh

if [ "$1" = guest ]; then
  wait_for_vib_device 0 || exit 1
  # vib-devinfo 10 times (it once printed its results, then died with
  # SIGSEGV: issue 14), each with a time limit: a hang is reported with
  # where it hangs. The first one's output goes to the report, all on a
  # failure.
  run=1
  while [ $run -le 10 ]; do
    /vib/vib-devinfo > /tmp/devinfo.out 2>&1 &
    pid=$!
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 120 ]; do
      i=$((i + 1))
      sleep 0.25
    done
    if kill -0 $pid 2>/dev/null; then
      echo "guest: vib-devinfo (run $run) still running after 30 s; its threads are in:"
      for t in /proc/$pid/task/*; do
        echo "  ${t##*/}: wchan $(cat $t/wchan 2>/dev/null), syscall $(cut -d' ' -f1-2 $t/syscall 2>/dev/null)"
      done
      ls -l /proc/$pid/fd 2>/dev/null | sed -n 's/.*[0-9] \([0-9]* -> .*\)/  fd \1/p'
      kill -9 $pid
      wait $pid 2>/dev/null
      cat /tmp/devinfo.out
      echo "guest: vib-devinfo hung"
      exit 1
    fi
    wait $pid
    rc=$?
    [ $run != 1 ] || head -4 /tmp/devinfo.out
    if [ $rc != 0 ]; then
      cat /tmp/devinfo.out
      echo "guest: vib-devinfo (run $run) exited $rc (above 128: killed by signal)"
      dmesg | grep -E 'segfault at|general protection' | tail -3
      exit 1
    fi
    run=$((run + 1))
  done
  echo "guest: vib-devinfo exited 0 10 times"
  # Data through vib: two processes of this guest with vib's libibverbs.so.1
  # (in /vib) first in the library path. Each checks every byte it receives;
  # a hang is cut at 100 s. Only the verdicts go to the report (dom0 reads
  # its last 1500 bytes), whole outputs on a failure.
  export LD_LIBRARY_PATH=/vib
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  failed=0
  for device in "vib0" "vib1 -g 0"; do
    timeout 100 /vib/vib-rdma-check -d $device -n 16 > /tmp/check-server.out 2>&1 &
    server=$!
    timeout 100 /vib/vib-rdma-check -d $device -n 16 127.0.0.1 > /tmp/check-client.out 2>&1
    client_rc=$?
    wait $server
    server_rc=$?
    echo "guest: rdma_check through vib on ${device%% *}: server exited $server_rc, client $client_rc"
    if [ $server_rc = 0 ] && [ $client_rc = 0 ]; then
      grep -h 'all correct' /tmp/check-server.out | sed 's/SEND with immediate, RDMA WRITE, RDMA WRITE with immediate, RDMA READ/SEND+imm, WRITE, WRITE+imm, READ/'
      grep -h 'usec per iteration' /tmp/check-client.out
    else
      failed=1
      cat /tmp/check-server.out /tmp/check-client.out
    fi
  done
  exit $failed
fi

be_root=/local/domain/0/backend/vib
vibd_log=/tmp/vibd.log

show_vibd_log() {
  if [ -n "$vibd_pid" ] && [ -d /proc/$vibd_pid ]; then
    echo "---- vibd's threads ----"
    for t in /proc/$vibd_pid/task/*; do
      echo "  ${t##*/} $(cat $t/comm): wchan $(cat $t/wchan 2>/dev/null), syscall $(cut -d' ' -f1-2 $t/syscall 2>/dev/null)"
    done
  fi
  echo "---- vibd log ($vibd_log) ----"
  cat "$vibd_log" 2>/dev/null
  echo "---- end of vibd log ----"
}
trap show_vibd_log EXIT

fail() {
  echo "FAIL: $*"
  exit 1
}

be_gone() { ! xenstore-read "$be_root/$guest_domid" >/dev/null 2>&1 && \
            ! xenstore-ls "$be_root/$guest_domid" >/dev/null 2>&1; }
# The device is served: state InitWait or Connected, hotplug script done.
be_ready() {
  st=$(xenstore-read "$be_root/$guest_domid/$1/state" 2>/dev/null)
  hs=$(xenstore-read "$be_root/$guest_domid/$1/hotplug-status" 2>/dev/null)
  { [ "$st" = 2 ] || [ "$st" = 4 ]; } && [ "$hs" = connected ]
}

echo "== the xl front ahead of Xen's xl in PATH"
xl_front_first

echo "== rxe0 on a veth pair, and data natively over it (rdma_check, every byte checked)"
rxe_on_veth || fail "no usable rxe0"
timeout 100 /vib/vib-rdma-check -d rxe0 -g 0 -n 16 > /tmp/native-server.out 2>&1 &
native_server=$!
timeout 100 /vib/vib-rdma-check -d rxe0 -g 0 -n 16 127.0.0.1 > /tmp/native-client.out 2>&1
native_client_rc=$?
wait $native_server
native_server_rc=$?
cat /tmp/native-server.out /tmp/native-client.out
[ $native_server_rc = 0 ] && [ $native_client_rc = 0 ] ||
  fail "native rdma_check over rxe0: server exited $native_server_rc, client $native_client_rc"

echo "== starting vibd (real Xen, software HCA, scripts in /vib)"
start_vibd --hca soft --scripts-dir /vib --verbose || fail "vibd did not start watching $be_root within 20 s"

echo "== xl create with vib = [ 'hca=soft,script=vib', 'hca=rxe0,script=vib' ]"
start_guest "vib = [ 'hca=soft,script=vib', 'hca=rxe0,script=vib' ]"
[ -n "$guest_domid" ] || fail "xl create gave no domain"
grep '^vib' /tmp/vib-guest.cfg

echo "== the config the front kept for vibd"
cat /var/lib/vib/domains/vib-guest.cfg || fail "the xl front kept no config for vib-guest"

# vibd waits up to 30 s for a config to appear: 40 s lets its log say why
# when it gave up.
echo "== check: back-end device $be_root/$guest_domid/0 in state 2 or 4 with hotplug-status connected"
if ! wait_until 40 be_ready 0; then
  xenstore-ls -fp "$be_root" 2>&1
  fail "xl create did not give domain $guest_domid a served vib device 0 within 40 s" \
       "(state '$st', hotplug-status '$hs')"
fi
xenstore-ls -fp "$be_root"
echo "state $st, hotplug-status $hs: ok"

echo "== check: xl vib-list vib-guest lists it"
xl vib-list vib-guest > /tmp/vib-list.out 2>&1 || { cat /tmp/vib-list.out; fail "xl vib-list failed"; }
cat /tmp/vib-list.out
grep -q "^0 .*$be_root/$guest_domid/0\$" /tmp/vib-list.out ||
  fail "xl vib-list does not list device 0 with back-end $be_root/$guest_domid/0"
echo "listed: ok"

echo "== check: vib-devinfo, then rdma_check through vib on both devices, in the guest"
guest_report 300 > /tmp/guest-report.out || { cat /tmp/guest-report.out; fail "vib-devinfo or rdma_check in the guest failed"; }
cat /tmp/guest-report.out
echo "guest's vib-devinfo and rdma_check: ok"
# usec_of FILE DEVICE: the client's usec per iteration on DEVICE in FILE.
usec_of() { sed -n "s/^rdma_check client on $2: .*, \([0-9]*\) usec per iteration/\1/p" "$1" | head -1; }
native=$(usec_of /tmp/native-client.out rxe0)
soft=$(usec_of /tmp/guest-report.out vib0)
over_rxe=$(usec_of /tmp/guest-report.out vib1)
echo "VIB-LAB-MEASURE: rdma_check, 16 iterations of every operation, 1 B to 64 KiB, usec per iteration:" \
     "native rxe0 in dom0 $native | through vib on rxe0 $over_rxe" \
     "($(awk "BEGIN {printf \"%.1f\", $over_rxe / $native}")x) | through vib on the software HCA $soft"

echo "== check: xl vib-detach vib-guest 0"
xl vib-detach vib-guest 0 || fail "xl vib-detach vib-guest 0 failed"
xenstore-ls "$be_root/$guest_domid/0" >/dev/null 2>&1 && {
  xenstore-ls -fp "$be_root"
  fail "$be_root/$guest_domid/0 is still there after vib-detach"
}
echo "$be_root/$guest_domid/0 is gone: ok"

echo "== check: xl vib-attach vib-guest hca=soft, then xl destroy"
xl vib-attach vib-guest hca=soft || fail "xl vib-attach vib-guest hca=soft failed"
xl vib-list vib-guest
xenstore-ls -fp "$be_root/$guest_domid"
xl destroy vib-guest || fail "xl destroy vib-guest failed"
if ! wait_until 10 be_gone; then
  xenstore-ls -fp "$be_root"
  fail "$be_root/$guest_domid is still there 10 s after xl destroy"
fi
echo "$be_root/$guest_domid is gone after xl destroy: ok"
xenstore-ls -fp "$be_root" 2>&1 || true

kill "$vibd_pid"
wait "$vibd_pid"
echo "vibd exited with status $?"
exit 0
