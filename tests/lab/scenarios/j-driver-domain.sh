#!/bin/sh
# boot-timeout: 600
# Scenario (j): a driver domain as vib's back-end. vibd runs in a PV domain
# created with driver_domain=1 (software HCA, --no-provision, the vib hotplug
# script run there, as `xl devd` runs a driver domain's scripts); dom0 runs
# no vibd at all. `xl vib-attach vib-user backend=vib-dd hca=soft script=vib` gives a
# second PV guest a device served by the driver domain: the toolstack writes
# the back-end directory into the driver domain's tree and waits for its
# verdict; in the user guest two rdma_check processes (vib's libibverbs.so.1,
# the vibgrant module granting their pages to the driver domain) move data,
# every byte checked; `xl vib-list` names the back-end; `xl vib-detach`
# closes it through the driver domain's vibd.
#
# dom0 gets /vib/xl (the front) and /vib/xl-vib; the guests /vib/vibd,
# /vib/vib (hotplug script), /vib/libibverbs.so.1, /vib/vib-rdma-check and
# /vib/vibgrant.ko.
. /lab-common.sh

if [ "$1" = guest ]; then
  role=$(sed -n 's/.*vib_lab_role=\([a-z]*\).*/\1/p' /proc/cmdline)
  if [ "$role" = driver ]; then
    vibd_log=/tmp/vibd.log
    start_vibd --hca soft --no-provision --scripts-dir /vib || { cat "$vibd_log"; exit 1; }
    /usr/bin/xenstore-write data/vib-lab/ready 1
    # Serves until dom0 says stop, then stops vibd and reports its log.
    wait_until 500 /usr/bin/xenstore-read data/vib-lab/stop > /dev/null 2>&1
    kill "$vibd_pid"
    wait "$vibd_pid"
    rc=$?
    echo "driver domain: vibd exited with status $rc; its log:"
    grep -v ' connected: \| freed: \| closing: ' "$vibd_log"
    exit $rc
  fi
  wait_for_vib_device 0 || exit 1
  echo "guest: backend-id $(/usr/bin/xenstore-read device/vib/0/backend-id)"
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  export LD_LIBRARY_PATH=/vib
  check_pair vib0 -n 16
  echo "guest: rdma_check through the driver domain: server exited $server_rc, client $client_rc"
  if [ $server_rc = 0 ] && [ $client_rc = 0 ]; then
    grep -h 'all correct' /tmp/server.out
    grep -h 'usec per iteration' /tmp/client.out
    exit 0
  fi
  tail -n 5 /tmp/server.out /tmp/client.out
  exit 1
fi

fail() {
  echo "FAIL: $*"
  [ -z "$dd_domid" ] || xenstore-write "/local/domain/$dd_domid/data/vib-lab/stop" 1
  [ -z "$dd_domid" ] || { guest_domid=$dd_domid; guest_report 30; }
  exit 1
}

xl_front_first
echo "== the driver domain vib-dd (driver_domain = 1), vibd in it"
guest_name=vib-dd guest_extra="vib_lab_role=driver"
start_guest "driver_domain = 1"
dd_domid=$guest_domid
[ -n "$dd_domid" ] || fail "xl create gave no driver domain"
wait_until 120 xenstore-read "/local/domain/$dd_domid/data/vib-lab/ready" > /dev/null 2>&1 ||
  fail "vibd in the driver domain did not start within 120 s"
echo "vibd runs in domain $dd_domid"

echo "== the user guest vib-user, and xl vib-attach vib-user backend=vib-dd hca=soft script=vib"
guest_name=vib-user guest_extra="vib_lab_role=user"
start_guest
user_domid=$guest_domid
[ -n "$user_domid" ] || fail "xl create gave no user guest"
xl vib-attach vib-user backend=vib-dd hca=soft script=vib || fail "xl vib-attach with the driver domain as back-end failed"
hs=$(xenstore-read "/local/domain/$dd_domid/backend/vib/$user_domid/0/hotplug-status" 2>/dev/null)
[ "$hs" = connected ] || fail "the hotplug script in the driver domain did not report connected ('$hs')"
echo "the vib hotplug script ran in the driver domain: hotplug-status $hs"
xl vib-list vib-user | tee /tmp/vib-list.out
grep -q "/local/domain/$dd_domid/backend/vib/$user_domid/0" /tmp/vib-list.out ||
  fail "xl vib-list does not show the driver domain's back-end"
xenstore-ls -fp "/local/domain/$dd_domid/backend/vib"

echo "== the user guest's report"
guest_report 300 || fail "data through the driver domain failed (above)"

echo "== xl vib-detach vib-user 0"
xl vib-detach vib-user 0 || fail "xl vib-detach failed"
xenstore-ls "/local/domain/$dd_domid/backend/vib/$user_domid/0" > /dev/null 2>&1 &&
  fail "the driver domain's back-end directory is still there after vib-detach"
echo "the back-end directory in the driver domain is gone: ok"

xenstore-write "/local/domain/$dd_domid/data/vib-lab/stop" 1
echo "== the driver domain's report"
guest_domid=$dd_domid
guest_report 60 || fail "vibd in the driver domain did not stop cleanly"
xl destroy vib-user
xl destroy vib-dd
exit 0
