#!/bin/sh
# Scenario (f): memory registration in a PV guest on real Xen (issue 13).
# vibd serves the guest (software HCA, through the xl front as in (d)); in
# the guest, through vib's libibverbs.so.1:
#   1. without the vibgrant module: ibv_reg_mr is refused at the first
#      cycle with EOPNOTSUPP, and libvibfront's stderr names vibgrant and
#      how to get it (copying the pages instead would lose other threads'
#      writes, so vib never does);
#   2. insmod vibgrant.ko (built against Debian's headers for this kernel):
#      /dev/xen/vibgrant appears, and vibgrant_check finds its ioctls refuse
#      malformed requests, count and release what they grant, honour
#      RLIMIT_MEMLOCK and fork, and that its event channels deliver, mask,
#      stop at 64 per file and notify on close only when asked (every
#      check printed only when it fails);
#   3. reg_writers: 100 register/deregister cycles with a thread writing
#      around the buffer, no write lost, nothing on stderr;
#   4. rdma_check, both sides in the guest over loopback TCP, every byte of
#      SEND/WRITE/READ/atomics checked: data moves through in-place grants;
#   5. reg_big: a 256 MiB registration (65536 grants) does not fit the grant
#      table of Xen's default max_grant_frames (64 frames, 32768 grants):
#      ibv_reg_mr fails with ENOSPC and libvibfront's stderr names
#      max_grant_frames; vib-devinfo reports that table's size. (Scenario g
#      registers the same in a guest whose config raises max_grant_frames.)
#
# dom0 gets /vib/vibd, /vib/vib (hotplug script), /vib/xl (the front),
# /vib/xl-vib; the guest /vib/libibverbs.so.1, /vib/vib-reg-writers,
# /vib/vib-rdma-check, /vib/vib-vibgrant-check, /vib/vib-reg-big,
# /vib/vib-devinfo and /vib/vibgrant.ko.
. /lab-common.sh

if [ "$1" = guest ]; then
  wait_for_vib_device 0 || exit 1
  export LD_LIBRARY_PATH=/vib
  echo "guest: 1. without vibgrant"
  timeout 60 /vib/vib-reg-writers -d vib0 -n 50 > /tmp/w1.out 2> /tmp/w1.err
  rc=$?
  cat /tmp/w1.err
  [ $rc = 1 ] || { cat /tmp/w1.out; echo "guest: FAIL: reg_writers exited $rc without vibgrant, not 1"; exit 1; }
  grep -q 'ibv_reg_mr, cycle 0: Operation not supported' /tmp/w1.err &&
    grep -q '^libvibfront: ibv_reg_mr: .*vibgrant guest kernel module is not loaded' /tmp/w1.err ||
    { echo "guest: FAIL: the refusal without vibgrant is not EOPNOTSUPP naming the module"; exit 1; }
  echo "guest: refused without vibgrant, naming it: ok"

  echo "guest: 2. insmod vibgrant.ko"
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  [ -c /dev/xen/vibgrant ] || { ls -l /dev/xen; echo "guest: FAIL: no /dev/xen/vibgrant"; exit 1; }
  /vib/vib-vibgrant-check 0 "$(/usr/bin/xenstore-read domid)" > /tmp/vc.out 2>&1
  vrc=$?
  grep -v ': ok$' /tmp/vc.out
  [ $vrc = 0 ] || { echo "guest: FAIL: vibgrant_check exited $vrc"; exit 1; }

  echo "guest: 3. reg_writers with vibgrant"
  timeout 120 /vib/vib-reg-writers -d vib0 -n 100 > /tmp/w2.out 2> /tmp/w2.err
  rc=$?
  cat /tmp/w2.out
  [ ! -s /tmp/w2.err ] || { cat /tmp/w2.err; echo "guest: FAIL: reg_writers said something on stderr"; exit 1; }
  [ $rc = 0 ] || { echo "guest: FAIL: reg_writers exited $rc"; exit 1; }

  echo "guest: 4. rdma_check through vib"
  check_pair vib0 -n 10
  tail -n 2 /tmp/server.out /tmp/client.out
  [ $client_rc = 0 ] && [ $server_rc = 0 ] || { echo "guest: FAIL: rdma_check server $server_rc, client $client_rc"; exit 1; }
  grep -q libvibfront: /tmp/server.out /tmp/client.out && { echo "guest: FAIL: libvibfront complained with vibgrant loaded"; exit 1; }

  echo "guest: 5. 256 MiB with the default max_grant_frames"
  timeout 120 /vib/vib-reg-big -d vib0 -m 256 > /tmp/big.out 2> /tmp/big.err
  rc=$?
  cat /tmp/big.out /tmp/big.err
  dmesg | grep 'max_grant_frames reached' | tail -n 1
  [ $rc != 0 ] || { echo "guest: FAIL: 256 MiB registered with the default grant table"; exit 1; }
  grep -q 'ibv_reg_mr failed: errno 28 ' /tmp/big.out || { echo "guest: FAIL: not ENOSPC"; exit 1; }
  grep -q 'max_grant_frames' /tmp/big.err || { echo "guest: FAIL: stderr does not name max_grant_frames"; exit 1; }
  /vib/vib-devinfo > /tmp/devinfo.out 2>&1 || { cat /tmp/devinfo.out; echo "guest: FAIL: vib-devinfo"; exit 1; }
  grep 'grant table:' /tmp/devinfo.out
  grep -q 'grant table:   32768 entries (max_grant_frames=64), ' /tmp/devinfo.out ||
    { echo "guest: FAIL: vib-devinfo does not show the default table"; exit 1; }
  echo "guest: all ok"
  exit 0
fi

be_root=/local/domain/0/backend/vib
vibd_log=/tmp/vibd.log

xl_front_first
echo "== starting vibd (real Xen, software HCA)"
start_vibd --hca soft --scripts-dir /vib || fail "vibd did not start watching $be_root within 20 s"

echo "== the guest, with a vib device"
start_guest "vib = [ 'hca=soft,script=vib' ]"
[ -n "$guest_domid" ] || fail "xl create gave no domain"
guest_result || fail "the guest's registration checks failed (its output is above)"
kill "$vibd_pid"
wait "$vibd_pid"
exit 0
