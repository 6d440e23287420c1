#!/bin/sh
# boot-timeout: 600
# Scenario (k): `xl save` and `xl restore` of a PV guest with a vib device,
# in the middle of traffic. libxl knows nothing of vib devices: the restored
# domain (a new domain id, the same name) gets its device again from vibd's
# provisioning (the config the xl front kept), and the old domain's back-end
# directory goes with it. In the guest, the rdma_check pair that was moving
# data when the guest was saved (-r 1) gets IBV_EVENT_DEVICE_FATAL (its
# context belonged to the old domain), opens the restored domain's device,
# reconnects and goes on, every byte checked, and ends 20 iterations later
# with status 0; a new pair works too, and the guest's kernel logs no
# complaint. In dom0, `xl vib-list -l` shows, while the pair runs, what its
# two processes created (each a PD, two CQs, a QP and an MR) and counts the
# work requests as they are served; vibd holds no grant mapping once the
# saved domain has gone, and holds the same after the restored one is
# destroyed.
#
# dom0 gets /vib/vibd, /vib/vib (hotplug script), /vib/xl (the front),
# /vib/xl-vib; the guest /vib/libibverbs.so.1, /vib/vib-rdma-check and
# /vib/vibgrant.ko.
. /lab-common.sh

if [ "$1" = guest ]; then
  wait_for_vib_device 0 || exit 1
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  export LD_LIBRARY_PATH=/vib
  before=$(/usr/bin/xenstore-read domid)
  /vib/vib-rdma-check -d vib0 -p 18800 -n 1000000 -r 1 > /tmp/server.out 2>&1 &
  server=$!
  /vib/vib-rdma-check -d vib0 -p 18800 -n 1000000 -r 1 -E 20 127.0.0.1 > /tmp/client.out 2>&1 &
  client=$!
  sleep 8
  running $client || { cat /tmp/client.out; echo "guest: FAIL: the client ended early"; exit 1; }
  /usr/bin/xenstore-write data/vib-lab/phase traffic
  # dom0 saves and restores this domain now; its domain id changes.
  wait_until 300 sh -c "[ \"\$(/usr/bin/xenstore-read domid)\" != $before ]" ||
    { echo "guest: FAIL: not restored within 300 s"; exit 1; }
  echo "guest: restored: domain $before is now $(/usr/bin/xenstore-read domid)"
  for p in "client $client" "server $server"; do
    set -- $p
    n=0
    while running "$2" && [ $n -lt 480 ]; do n=$((n + 1)); sleep 0.25; done
    if running "$2"; then
      echo "guest: FAIL: the $1 of the saved traffic still runs 120 s after the restore; its threads:"
      for t in /proc/$2/task/*; do
        echo "  ${t##*/}: $(cut -d' ' -f3 $t/stat) wchan $(cat $t/wchan 2>/dev/null) syscall $(cut -d' ' -f1-2 $t/syscall 2>/dev/null)"
      done
      tail -n 3 /tmp/$1.out
      exit 1
    fi
    wait "$2"
    rc=$?
    echo "guest: the $1 of the saved traffic ended with $rc:"
    grep -E 'lost|reopened|all correct' "/tmp/$1.out" | sed 's/^/  /'
    [ $rc = 0 ] && grep -q 'all correct' "/tmp/$1.out" &&
      grep -q 'lost the device and reopened it 1 times' "/tmp/$1.out" ||
      { tail -n 5 "/tmp/$1.out"; echo "guest: FAIL: it should have reopened the device and gone on"; exit 1; }
  done
  # The device again, on the restored domain.
  i=0
  until /usr/bin/xenstore-read device/vib/0/backend 2>/dev/null | grep -q "/backend/vib/$(/usr/bin/xenstore-read domid)/0$"; do
    i=$((i + 1))
    [ $i -lt 60 ] || { echo "guest: FAIL: no vib device 0 of the restored domain after 60 s"; exit 1; }
    sleep 1
  done
  echo "guest: device/vib/0 -> $(/usr/bin/xenstore-read device/vib/0/backend)"
  check_pair vib0 -p 18801 -n 8
  echo "guest: a new pair after the restore: server $server_rc, client $client_rc"
  grep -h 'all correct' /tmp/server.out
  [ $client_rc = 0 ] && [ $server_rc = 0 ] || { tail -n 3 /tmp/server.out /tmp/client.out; exit 1; }
  # The guest's kernel came through the restore and the old contexts' end
  # without a complaint.
  if dmesg | grep -E '(BUG|WARNING|Oops|general protection)' ; then
    echo "guest: FAIL: the guest's kernel complained (above)"
    exit 1
  fi
  exit 0
fi

be_root=/local/domain/0/backend/vib
vibd_log=/tmp/vibd.log
phase_is() { [ "$(xenstore-read "/local/domain/$guest_domid/data/vib-lab/phase" 2>/dev/null)" = "$1" ]; }
served() {
  st=$(xenstore-read "$be_root/$1/0/state" 2>/dev/null)
  [ "$st" = 2 ] || [ "$st" = 4 ]
}
gone() { ! xenstore-ls "$be_root/$1" > /dev/null 2>&1; }
# What vibd holds of dom0: grant mappings and file descriptors.
holdings() {
  echo "$(grep -c /dev/xen/gntdev /proc/$vibd_pid/maps) gntdev mappings," \
       "$(ls /proc/$vibd_pid/fd 2>/dev/null | wc -l) fds"
}
holds() { [ "$(holdings)" = "$1" ]; }

xl_front_first
start_vibd --hca soft --scripts-dir /vib || fail "vibd did not start"
guest_memory=256   # the save file lives in dom0's memory (its root is an initramfs)
start_guest "vib = [ 'hca=soft,script=vib' ]"
saved_domid=$guest_domid
wait_until 200 phase_is traffic || { guest_report 1; fail "the guest's traffic did not start within 200 s"; }
# `xl vib-list -l` columns of a context row: id, PDs, CQs, QPs, SRQs, MRs,
# AHs, pinned pages, requests, errors, WQEs, completions, errors, activity.
listed_objects_match() {
  xl vib-list -l vib-guest > /tmp/list.out 2>&1 || return 1
  grep -q 'PDs 2/.* CQs 4/.* QPs 2/.* SRQs 0/.* MRs 2/.* AHs 0/' /tmp/list.out &&
    [ "$(awk '$2 == 1 && $3 == 2 && $4 == 1 && $5 == 0 && $6 == 1 && $7 == 0' /tmp/list.out | wc -l)" = 2 ]
}
listed_wqes() { xl vib-list -l vib-guest | awk '$2 == 1 && $3 == 2 && $4 == 1 {n += $11} END {print n + 0}'; }
more_wqes_than() { [ "$(listed_wqes)" -gt "$1" ]; }
wait_until 20 listed_objects_match || { cat /tmp/list.out; fail "xl vib-list -l does not show the pair's objects"; }
cat /tmp/list.out
before=$(listed_wqes)
wait_until 20 more_wqes_than "$before" || fail "xl vib-list -l counted no work request in 20 s of traffic (still $before)"
echo "xl vib-list -l: the pair's objects, and work requests counted as served ($before, then $(listed_wqes)): ok"
echo "== xl save vib-guest in the middle of traffic, then xl restore"
xl save vib-guest /tmp/vib-guest.save || fail "xl save failed"
ls -l /tmp/vib-guest.save
wait_until 20 gone "$saved_domid" || fail "domain $saved_domid's back-end directory is left 20 s after xl save"
echo "domain $saved_domid's vib back-end is gone: ok"
# No guest now: the saved domain's contexts are all freed.
wait_until 20 sh -c "! grep -q /dev/xen/gntdev /proc/$vibd_pid/maps" ||
  fail "vibd still holds $(holdings) 20 s after xl save"
no_guest=$(holdings)
echo "vibd with no guest: $no_guest"
xl restore /tmp/vib-guest.save || fail "xl restore failed"
rm -f /tmp/vib-guest.save
guest_domid=$(xl domid vib-guest)
echo "restored as domain $guest_domid"
wait_until 60 served "$guest_domid" || fail "the restored domain $guest_domid has no served vib device 0 within 60 s"
echo "vibd provisioned the restored domain's device: state $st"
guest_report 300 || fail "the guest's checks after the restore failed (above)"
xl destroy vib-guest
wait_until 20 holds "$no_guest" || fail "vibd holds $(holdings) 20 s after xl destroy; after xl save it held $no_guest"
echo "after xl destroy, vibd holds what it did after xl save: $no_guest"
kill "$vibd_pid"
wait "$vibd_pid"
echo "vibd exited with status $?"
exit 0
