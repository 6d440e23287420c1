#!/bin/sh
# boot-timeout: 2400
# xen-cmdline: gnttab_max_frames=160
# Scenario (g): unmodified rdma-core and perftest programs through vib in a
# PV guest, on real Xen. vibd serves two devices to the guest: vib0 on the
# software HCA and vib1 on rxe0 in dom0 (the rdma-core HCA path). With the
# vibgrant module loaded (registration grants the application's own pages),
# two processes of the guest (two vCPUs, as dom0) run, through vib's libibverbs.so.1, each of
#   ibv_rc_pingpong (busy polling, and -e: completion events),
#   ibv_ud_pingpong, ib_send_lat, ib_write_lat, ib_send_bw, ib_write_bw
# on each device, VIB_LAB_REPEAT times (default 3; 10 for a reliability run,
# docs/lab.md); every process must exit
# 0 (their data is checked by rdma_check in scenarios d and f: these
# programs check nothing of it). The same programs run natively over rxe0
# in dom0 in this boot first, and the figures are printed side by side.
# Before them, the guest registers 256 MiB (65536 grants) through vib0:
# its config raises max_grant_frames to 160 (81920 grants), so this must
# succeed where scenario f's guest, at the default 64, fails. Xen 4.17
# refuses a domain's max_grant_frames above its own gnttab_max_frames, so
# Xen's command line raises that to 160 and xl.conf keeps the default for
# domains at 64: the guest's config line is what makes the room.
#
# dom0 gets /vib/vibd, /vib/vib (hotplug script), /vib/xl (the front),
# /vib/xl-vib; the guest /vib/libibverbs.so.1, /vib/vib-reg-big and
# /vib/vibgrant.ko.
[ ! -f /lab-settings ] || . /lab-settings
repeat=${VIB_LAB_REPEAT:-3}
. /lab-common.sh

# The programs, as "NAME|COMMAND": the device and its address options are
# appended, then -p PORT, then (for the client) the server's address.
programs="rc_pingpong|ibv_rc_pingpong -n 500 -s 4096
rc_pingpong-e|ibv_rc_pingpong -n 500 -s 4096 -e
ud_pingpong|ibv_ud_pingpong -n 500 -s 512
ib_send_lat|ib_send_lat -n 500 -F
ib_write_lat|ib_write_lat -n 500 -F
ib_send_bw|ib_send_bw -n 500 -F
ib_write_bw|ib_write_bw -n 500 -F"

# figure_of NAME CLIENT_OUTPUT: the figure a program prints for the run:
# usec per iteration (pingpongs), typical usec (latency, 2 bytes) or
# average MB/s (bandwidth, 64 KiB).
figure_of() {
  case $1 in
    rc_pingpong*|ud_pingpong) sed -n 's/.* = \([0-9.]*\) usec\/iter/\1/p' "$2" | tail -1 ;;
    *_lat) awk '$1 == 2 && NF >= 5 {print $5; exit}' "$2" ;;
    *_bw) awk '$1 == 65536 && NF >= 5 {print $4; exit}' "$2" ;;
  esac
}

# run_all DEVICE PINGPONG_ADDRESS PERFTEST_ADDRESS LABEL: every program on
# DEVICE, REPEAT times, server and client in this domain over loopback TCP.
# Prints "LABEL NAME FIGURE" for each program's last run, or "LABEL NAME
# FAILED ..." with the outputs' tails at its first failed run.
run_all() {
  echo "$programs" | while IFS='|' read -r name command; do
    case $name in *pingpong*) address=$2 ;; *) address=$3 ;; esac
    run=1
    figure=
    while [ $run -le "$repeat" ]; do
      port=$((port + 1))
      # shellcheck disable=SC2086
      timeout 120 $command -d $1 $address -p $port > /tmp/u-server.out 2>&1 &
      server=$!
      n=0
      until listening $port || [ $n -ge 300 ] || ! kill -0 $server 2>/dev/null; do n=$((n + 1)); sleep 0.1; done
      # shellcheck disable=SC2086
      timeout 120 $command -d $1 $address -p $port 127.0.0.1 > /tmp/u-client.out 2>&1
      client_rc=$?
      wait $server
      server_rc=$?
      if [ $client_rc != 0 ] || [ $server_rc != 0 ]; then
        failure="$4 $name FAILED run $run: server exited $server_rc, client $client_rc"
        echo "$failure"
        [ -z "${progress_node:-}" ] || /usr/bin/xenstore-write "$progress_node" "$failure"
        tail -n 3 /tmp/u-server.out /tmp/u-client.out | grep -v '^$'
        figure=
        break
      fi
      figure=$(figure_of "$name" /tmp/u-client.out)
      [ -z "${progress_node:-}" ] || /usr/bin/xenstore-write "$progress_node" "$4 $name run $run"
      run=$((run + 1))
    done
    [ -n "$figure" ] && echo "$4 $name $figure"
  done
}

if [ "$1" = guest ]; then
  wait_for_vib_device 1 || exit 1
  insmod /vib/vibgrant.ko || { echo "guest: FAIL: insmod vibgrant.ko"; exit 1; }
  export LD_LIBRARY_PATH=/vib
  # dom0 gives the guest time while this node moves (guest_report).
  progress_node=data/vib-lab/progress
  /usr/bin/xenstore-write "$progress_node" "device up"
  timeout 120 /vib/vib-reg-big -d vib0 -m 256 > /tmp/big.out 2>&1 ||
    { cat /tmp/big.out; echo "guest: FAIL: 256 MiB did not register with max_grant_frames = 160"; exit 1; }
  cat /tmp/big.out
  /usr/bin/xenstore-write "$progress_node" "256 MiB registered"
  port=21000
  run_all vib0 "" "" vib0 > /tmp/g-results
  port=22000
  run_all vib1 "-g 0" "-x 0" vib1 >> /tmp/g-results
  # The verdicts go to data/vib-lab/measure in full (the report keeps only
  # the log's last 1500 bytes).
  /usr/bin/xenstore-write data/vib-lab/measure "$(grep -v FAILED /tmp/g-results)"
  cat /tmp/g-results | grep -A3 FAILED
  ! grep -q FAILED /tmp/g-results
  exit $?
fi

vibd_log=/tmp/vibd.log

echo "== rxe0 on a veth pair; the programs natively over it, $repeat times each"
rxe_on_veth || fail "no usable rxe0"
port=20000
run_all rxe0 "-g 0" "-x 0" native > /tmp/native-results
cat /tmp/native-results
grep -q FAILED /tmp/native-results && fail "a program failed natively over rxe0 (no vib involved)"

xl_front_first
echo "== vibd (real Xen), a guest with vib0 on the software HCA and vib1 on rxe0"
start_vibd --hca soft --scripts-dir /vib || fail "vibd did not start"
# Two vCPUs, as dom0 has: a busy-polling pair on one vCPU waits for the
# scheduler's time slice every message, whatever carries the data.
guest_vcpus=2
echo "max_grant_frames = 64" >> /etc/xen/xl.conf
start_guest "vib = [ 'hca=soft,script=vib', 'hca=rxe0,script=vib' ]" "max_grant_frames = 160"
[ -n "$guest_domid" ] || fail "xl create gave no domain"
guest_ok=0
# A program pair has 120 s (timeout) for its server and its client: 300 s
# without a pair finished means the guest is stuck, however loaded the
# machine is. The boot timeout bounds the whole.
guest_report 300 || guest_ok=1
xenstore-read -R "/local/domain/$guest_domid/data/vib-lab/measure" > /tmp/guest-results 2>/dev/null
echo

echo "VIB-LAB-MEASURE: unmodified programs, figure of the last of $repeat runs" \
     "(pingpongs: usec/iter; *_lat: typical usec, 2 B; *_bw: average MB/s, 64 KiB):"
printf '%-14s %12s %22s %16s\n' program "native rxe0" "vib on rxe0 (ratio)" "vib on soft HCA"
echo "$programs" | while IFS='|' read -r name command; do
  native=$(awk -v n="$name" '$1 == "native" && $2 == n {print $3}' /tmp/native-results)
  rxe=$(awk -v n="$name" '$1 == "vib1" && $2 == n {print $3}' /tmp/guest-results)
  soft=$(awk -v n="$name" '$1 == "vib0" && $2 == n {print $3}' /tmp/guest-results)
  ratio=$(awk -v a="$rxe" -v b="$native" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }')
  printf '%-14s %12s %14s %7s %16s\n' "$name" "${native:--}" "${rxe:--}" "($ratio)" "${soft:--}"
done

xl destroy vib-guest
kill "$vibd_pid"
wait "$vibd_pid"
[ $guest_ok = 0 ] || fail "an unmodified program failed through vib in the guest (above)"
exit 0
