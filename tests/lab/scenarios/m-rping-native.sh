#!/bin/sh
# boot-timeout: 600
# Scenario (m): RDMA-CM between a PV guest through vib and a native,
# non-virtualized program in dom0 over the same rxe0 (issue 15). vibd serves
# the guest vib0 on rxe0 with the RDMA-CM address 192.0.2.10, which the
# administrator has put on rxe0's network device (vibe0) beside dom0's own
# 192.0.2.1; vibd adds that address's GID to the guest's GID table (the
# config gives no gid-indices) and must say so. vibd
# connects the guest's ids through the host's rdma_cm (librdmacm), so the
# native side sees an ordinary RoCE peer. Both directions, unmodified rping
# (rdmacm-utils) with every ping's data validated (-V):
#   the guest's rping client (vib's librdmacm.so.1) against a native rping
#   server in dom0 (rdma-core's), then a native client in dom0 against the
#   guest's server.
# Then the same with UD (SIDR): unmodified udaddy, the guest's client
# against dom0's native server, dom0's native client against the guest's
# server (10 messages each way; udaddy checks only that they arrive).
# Each program must exit 0, and the guest's ibv_devinfo must show its
# address's GID as RoCE v2, as rxe0 has it.
#
# dom0 gets /vib/vibd, /vib/vib (hotplug script), /vib/xl (the front),
# /vib/xl-vib; the guest /vib/libibverbs.so.1, /vib/librdmacm.so.1 and
# /vib/vibgrant.ko.
. /lab-common.sh

dom0_address=192.0.2.1
guest_address=192.0.2.10
to_dom0_port=18540    # dom0's native server
to_guest_port=18541   # the guest's server
count=500

if [ "$1" = guest ]; then
  wait_for_vib_device 0 || exit 1
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  export LD_LIBRARY_PATH=/vib
  failed=0
  # The guest's GID table is rxe0's entries as they are on the wire: RoCE v2.
  if ibv_devinfo -v -d vib0 | grep -q ":$guest_address, RoCE v2"; then
    echo "guest: vib0's GID 1 is $guest_address, RoCE v2"
  else
    failed=1
    echo "guest: FAIL: vib0's GID table does not show $guest_address as RoCE v2:"
    ibv_devinfo -v -d vib0 | grep -E 'link_layer|GID'
  fi
  start=$(date +%s)
  timeout 200 rping -c -a $dom0_address -p $to_dom0_port -V -C $count -S 100 > /tmp/rping-c.out 2>&1
  rc=$?
  echo "guest: rping client to dom0's native server exited $rc after $(($(date +%s) - start)) s ($count pings, 100 B, validated)"
  [ $rc = 0 ] || { failed=1; tail -n 5 /tmp/rping-c.out; }
  timeout 100 udaddy -s $dom0_address -b $guest_address > /tmp/udaddy-c.out 2>&1
  rc=$?
  echo "guest: udaddy client to dom0's native server exited $rc"
  [ $rc = 0 ] || { failed=1; tail -n 5 /tmp/udaddy-c.out; }
  # dom0's native client connects once vibd says this server listens on rxe0.
  timeout 300 rping -s -a $guest_address -p $to_guest_port -V -C $count -S 100 > /tmp/rping-s.out 2>&1
  rc=$?
  echo "guest: rping server for dom0's native client exited $rc"
  [ $rc = 0 ] || { failed=1; tail -n 5 /tmp/rping-s.out; }
  timeout 200 udaddy -b $guest_address > /tmp/udaddy-s.out 2>&1
  rc=$?
  echo "guest: udaddy server for dom0's native client exited $rc"
  [ $rc = 0 ] || { failed=1; tail -n 20 /tmp/udaddy-s.out; ibv_devinfo -v -d vib0 | grep -E 'link_layer|GID'; }
  exit $failed
fi

vibd_log=/tmp/vibd.log

echo "== rxe0 on a veth pair, dom0's address $dom0_address and the guest's $guest_address on it"
rxe_on_veth || fail "no usable rxe0"
/usr/sbin/ip addr add $dom0_address/24 dev vibe0 || fail "cannot add $dom0_address"
/usr/sbin/ip addr add $guest_address/24 dev vibe0 || fail "cannot add $guest_address"
# The GID of an IPv4 address is ::ffff:a.b.c.d; the kernel adds it to
# rxe0's table on its own, at an index of its choosing.
gid_index_of() {
  for file in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    if [ "$(cat "$file" 2>/dev/null)" = "$1" ]; then basename "$file"; return 0; fi
  done
  return 1
}
guest_gid=0000:0000:0000:0000:0000:ffff:c000:020a
wait_until 30 gid_index_of $guest_gid > /dev/null || fail "rxe0 has no GID for $guest_address after 30 s"
guest_gid_index=$(gid_index_of $guest_gid)
echo "rxe0: $guest_address is GID index $guest_gid_index"

xl_front_first
echo "== vibd; dom0's native rping server; the guest"
start_vibd --hca soft --scripts-dir /vib || fail "vibd did not start"
timeout 300 rping -s -a $dom0_address -p $to_dom0_port -V -C $count -S 100 > /tmp/rping-native-s.out 2>&1 &
native_server=$!
timeout 300 udaddy -b $dom0_address > /tmp/udaddy-native-s.out 2>&1 &
native_ud_server=$!
start_guest "vib = [ 'hca=rxe0,script=vib,ip=$guest_address' ]"
[ -n "$guest_domid" ] || fail "xl create gave no domain for the guest"
wait_until 30 grep -q "GID index $guest_gid_index of rxe0 ($guest_address) is the guest's 1" "$vibd_log" ||
  fail "vibd did not give the guest the GID of $guest_address (rxe0's index $guest_gid_index)"

echo "== the guest's server, then dom0's native client"
wait_until 300 grep -q "RDMA-CM listening for peers outside vib on rxe0 at $guest_address port $to_guest_port" \
  "$vibd_log" || {
  guest_report 1
  tail -n 20 "$vibd_log"
  fail "the guest's rping did not listen on rxe0 within 300 s"
}
start=$(date +%s)
timeout 200 rping -c -I $dom0_address -a $guest_address -p $to_guest_port -V -C $count -S 100 > /tmp/rping-native-c.out 2>&1
native_client_rc=$?
native_client_s=$(($(date +%s) - start))
echo "dom0: native rping client to the guest's server exited $native_client_rc after $native_client_s s"
[ $native_client_rc = 0 ] || tail -n 5 /tmp/rping-native-c.out
wait_until 200 grep -q "RDMA-CM listening for peers outside vib on rxe0 at $guest_address port 7174" "$vibd_log" || {
  tail -n 20 "$vibd_log"
  echo "the guest's udaddy did not listen on rxe0 within 200 s"
}
timeout 100 udaddy -s $guest_address -b $dom0_address > /tmp/udaddy-native-c.out 2>&1
native_ud_client_rc=$?
echo "dom0: native udaddy client to the guest's server exited $native_ud_client_rc"
[ $native_ud_client_rc = 0 ] || tail -n 5 /tmp/udaddy-native-c.out

echo "== the guest's report"
guest_ok=0
guest_report 300 > /tmp/report.out || guest_ok=1
cat /tmp/report.out
# The guest's client is long done: a native server still waiting never got it.
wait_until 5 sh -c "! kill -0 $native_server 2>/dev/null" || kill $native_server 2>/dev/null
wait $native_server
native_server_rc=$?
echo "dom0: native rping server for the guest's client exited $native_server_rc"
[ $native_server_rc = 0 ] || tail -n 5 /tmp/rping-native-s.out
wait_until 5 sh -c "! kill -0 $native_ud_server 2>/dev/null" || kill $native_ud_server 2>/dev/null
wait $native_ud_server
native_ud_server_rc=$?
echo "dom0: native udaddy server for the guest's client exited $native_ud_server_rc"
[ $native_ud_server_rc = 0 ] || tail -n 5 /tmp/udaddy-native-s.out
guest_s=$(sed -n 's/^guest: rping client to dom0.s native server exited 0 after \([0-9]*\) s.*/\1/p' /tmp/report.out)
echo "VIB-LAB-MEASURE: rping ($count validated pings of 100 B, s) between a guest through vib on rxe0 and" \
     "a native rping in dom0: guest client ${guest_s:-failed}, native client $native_client_s"
grep -E 'outside vib|host.s rdma_cm' "$vibd_log" | head -n 20

xl destroy vib-guest
kill "$vibd_pid"
wait "$vibd_pid"
[ $guest_ok = 0 ] || fail "the guest's rping failed (above)"
[ $native_client_rc = 0 ] && [ $native_server_rc = 0 ] || fail "dom0's native rping failed (above)"
[ $native_ud_client_rc = 0 ] && [ $native_ud_server_rc = 0 ] || fail "dom0's native udaddy failed (above)"
exit 0
