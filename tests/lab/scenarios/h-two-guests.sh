#!/bin/sh
# boot-timeout: 900
# Scenario (h): two PV guests exchange data through vib on real Xen. One
# vibd in dom0 serves both; each guest has vib0 (software HCA) and vib1
# (rxe0 in dom0, the rdma-core HCA path), and a vif on the bridge vibbr0 for
# the TCP connection the programs set up their queue pairs over (guest A
# 10.0.0.2, guest B 10.0.0.3). Guest A serves, guest B connects, with vib's
# libibverbs.so.1 and the vibgrant module in both:
#   rdma_check on vib0 and on vib1: SEND (+imm), RDMA WRITE (+imm), RDMA
#     READ, atomics, 1 B to 64 KiB, every byte checked where it lands;
#   unmodified ibv_rc_pingpong on vib0 and on vib1;
#   unmodified rping (rdmacm-utils, every ping's data validated with -V)
#     on vib0 through vib's librdmacm.so.1: vibd is the connection manager,
#     and each guest's RDMA-CM address is the ip= of its vib line.
# Every process exits 0; the figures are printed.
#
# dom0 gets /vib/vibd, /vib/vib (hotplug script), /vib/xl (the front),
# /vib/xl-vib, /vib/vif-lab; the guests /vib/libibverbs.so.1,
# /vib/librdmacm.so.1, /vib/vib-rdma-check and /vib/vibgrant.ko.
. /lab-common.sh

# The servers' TCP ports in guest A, by device.
check_port_vib0=18510
check_port_vib1=18511
pingpong_port_vib0=18520
pingpong_port_vib1=18521
rping_port=18530
rping_count=100

if [ "$1" = guest ]; then
  role=$(sed -n 's/.*vib_lab_role=\([a-z]*\).*/\1/p' /proc/cmdline)
  address=$(sed -n 's/.*vib_lab_ip=\([0-9.]*\).*/\1/p' /proc/cmdline)
  echo "guest: $role at $address"
  i=0
  until [ -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ $i -lt 60 ] || { echo "guest: no eth0 (vif) after 30 s"; exit 1; }
    sleep 0.5
  done
  /usr/sbin/ip addr add "$address/24" dev eth0 && /usr/sbin/ip link set eth0 up || exit 1
  wait_for_vib_device 1 || exit 1
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  export LD_LIBRARY_PATH=/vib
  if [ "$role" = server ]; then
    # Every server at once, each on its own port; dom0 starts guest B once
    # all of them listen (data/vib-lab/ready).
    timeout 700 /vib/vib-rdma-check -d vib0 -p $check_port_vib0 -n 16 > /tmp/check-vib0.out 2>&1 &
    check_vib0=$!
    timeout 700 /vib/vib-rdma-check -d vib1 -g 0 -p $check_port_vib1 -n 16 > /tmp/check-vib1.out 2>&1 &
    check_vib1=$!
    timeout 700 ibv_rc_pingpong -d vib0 -n 500 -s 4096 -p $pingpong_port_vib0 > /tmp/pp-vib0.out 2>&1 &
    pp_vib0=$!
    timeout 700 ibv_rc_pingpong -d vib1 -g 0 -n 500 -s 4096 -p $pingpong_port_vib1 > /tmp/pp-vib1.out 2>&1 &
    pp_vib1=$!
    # Listens through vibd, not on a socket: dom0 waits for vibd's word.
    timeout 700 rping -s -a "$address" -p $rping_port -V -C $rping_count -S 100 > /tmp/rping.out 2>&1 &
    rping=$!
    for port in $check_port_vib0 $check_port_vib1 $pingpong_port_vib0 $pingpong_port_vib1; do
      wait_until 60 listening $port || { echo "guest: FAIL: nothing listens on port $port after 60 s"; exit 1; }
    done
    /usr/bin/xenstore-write data/vib-lab/ready 1
    failed=0
    for server in "rdma_check vib0 $check_vib0 /tmp/check-vib0.out" "rdma_check vib1 $check_vib1 /tmp/check-vib1.out" \
                  "rc_pingpong vib0 $pp_vib0 /tmp/pp-vib0.out" "rc_pingpong vib1 $pp_vib1 /tmp/pp-vib1.out" \
                  "rping vib0 $rping /tmp/rping.out"; do
      set -- $server
      wait "$3"
      rc=$?
      echo "guest A: $1 server on $2 exited $rc"
      if [ $rc = 0 ]; then
        grep -h 'all correct' "$4"
      else
        failed=1
        tail -n 5 "$4"
      fi
    done
    exit $failed
  fi
  failed=0
  for device in vib0 vib1; do
    eval "check_port=\$check_port_$device pingpong_port=\$pingpong_port_$device"
    gid=""
    [ $device = vib0 ] || gid="-g 0"
    # shellcheck disable=SC2086
    timeout 200 /vib/vib-rdma-check -d $device $gid -p $check_port -n 16 10.0.0.2 > /tmp/check.out 2>&1
    rc=$?
    echo "guest B: rdma_check client on $device exited $rc"
    if [ $rc = 0 ]; then grep -h 'usec per iteration' /tmp/check.out; else failed=1; tail -n 5 /tmp/check.out; fi
    # shellcheck disable=SC2086
    timeout 200 ibv_rc_pingpong -d $device $gid -n 500 -s 4096 -p $pingpong_port 10.0.0.2 > /tmp/pp.out 2>&1
    rc=$?
    echo "guest B: rc_pingpong client on $device exited $rc"
    if [ $rc = 0 ]; then grep -h 'usec/iter' /tmp/pp.out; else failed=1; tail -n 5 /tmp/pp.out; fi
  done
  start=$(date +%s)
  timeout 200 rping -c -a 10.0.0.2 -p $rping_port -V -C $rping_count -S 100 > /tmp/rping.out 2>&1
  rc=$?
  echo "guest B: rping client on vib0 exited $rc after $(($(date +%s) - start)) s ($rping_count pings, 100 B, validated)"
  [ $rc = 0 ] || { failed=1; tail -n 5 /tmp/rping.out; }
  exit $failed
fi

vibd_log=/tmp/vibd.log

echo "== rxe0 on a veth pair; the bridge vibbr0 (10.0.0.1/24) for the guests' vifs"
rxe_on_veth || fail "no usable rxe0"
/usr/sbin/ip link add vibbr0 type bridge || fail "cannot create the bridge vibbr0"
/usr/sbin/ip addr add 10.0.0.1/24 dev vibbr0 && /usr/sbin/ip link set vibbr0 up || fail "cannot set up vibbr0"

xl_front_first
echo "== vibd (real Xen); guest A, then (once A's servers listen) guest B"
start_vibd --hca soft --scripts-dir /vib || fail "vibd did not start"
devices() { echo "vib = [ 'hca=soft,script=vib,ip=$1', 'hca=rxe0,script=vib' ]"; }
guest_name=vib-a guest_extra="vib_lab_role=server vib_lab_ip=10.0.0.2"
start_guest "$(devices 10.0.0.2)" "vif = [ 'script=/vib/vif-lab' ]"
domid_a=$guest_domid
[ -n "$domid_a" ] || fail "xl create gave no domain for guest A"
wait_until 300 xenstore-read "/local/domain/$domid_a/data/vib-lab/ready" > /dev/null 2>&1 || {
  guest_report 1
  fail "guest A's servers did not listen within 300 s"
}
wait_until 60 grep -q "RDMA-CM listening at 10.0.0.2 port $rping_port" "$vibd_log" || {
  guest_report 1
  fail "guest A's rping did not listen through vibd within 60 s"
}
guest_name=vib-b guest_extra="vib_lab_role=client vib_lab_ip=10.0.0.3"
start_guest "$(devices 10.0.0.3)" "vif = [ 'script=/vib/vif-lab' ]"
domid_b=$guest_domid
[ -n "$domid_b" ] || fail "xl create gave no domain for guest B"

echo "== guest B's report"
guest_ok=0
guest_report 700 > /tmp/report-b.out || guest_ok=1
cat /tmp/report-b.out
echo "== guest A's report"
guest_domid=$domid_a
guest_report 100 || guest_ok=1
usec_of() { sed -n "s/^rdma_check client on $1: .*, \([0-9]*\) usec per iteration/\1/p" /tmp/report-b.out | head -1; }
rping_s() { sed -n 's/^guest B: rping client on vib0 exited 0 after \([0-9]*\) s.*/\1/p' /tmp/report-b.out; }
pp_of() { sed -n 's/.* = \([0-9.]*\) usec\/iter/\1/p' /tmp/report-b.out | sed -n "${1}p"; }
echo "VIB-LAB-MEASURE: guest B to guest A through vib: rdma_check (every operation, 1 B to 64 KiB," \
     "usec per iteration) on the software HCA $(usec_of vib0), on rxe0 $(usec_of vib1);" \
     "ibv_rc_pingpong (4 KiB, usec/iter) on the software HCA $(pp_of 1), on rxe0 $(pp_of 2);" \
     "rping ($rping_count validated pings of 100 B, s) on the software HCA $(rping_s)"

xl destroy vib-a
xl destroy vib-b
kill "$vibd_pid"
wait "$vibd_pid"
[ $guest_ok = 0 ] || fail "a program failed in a guest (above)"
exit 0
