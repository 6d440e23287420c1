#!/bin/sh
# boot-timeout: 1500
# Control scenario: native verbs traffic over rxe in dom0, with no vib
# component running, looped; every run must exit 0. A fault of the emulated
# machine (CPU model, Xen under TCG) shows here, so it is never mistaken for
# a vib fault in the other scenarios, nor a vib fault for an emulation one.
#
# Each run is a pair of ibv_rc_pingpong processes (server and client, a new
# TCP port each) exchanging 100 messages of 4 KiB over rxe0: process start,
# device open, QP setup, traffic and teardown, which is what died with
# SIGSEGV in 4 of 200 runs under `-cpu max` (issue 14). VIB_LAB_CONTROL_RUNS
# (from the caller's environment, through /lab-settings) sets the count.
runs=200
[ ! -f /lab-settings ] || . /lab-settings
runs=${VIB_LAB_CONTROL_RUNS:-$runs}
. /lab-common.sh
rxe_on_veth || exit 1

failed=0
i=0
start=$(date +%s)
while [ $i -lt "$runs" ]; do
  port=$((20000 + i))
  ibv_rc_pingpong -d rxe0 -g 0 -n 100 -p $port > /tmp/server.log 2>&1 &
  server=$!
  n=0
  until listening $port || [ $n -ge 300 ] || ! kill -0 $server 2>/dev/null; do n=$((n + 1)); sleep 0.1; done
  ibv_rc_pingpong -d rxe0 -g 0 -n 100 -p $port 127.0.0.1 > /tmp/client.log 2>&1
  client_rc=$?
  wait $server
  server_rc=$?
  if [ $client_rc -ne 0 ] || [ $server_rc -ne 0 ] || ! grep -q 'iters in' /tmp/client.log; then
    failed=$((failed + 1))
    echo "run $i: client exit $client_rc, server exit $server_rc (above 128: killed by signal)"
    tail -3 /tmp/client.log /tmp/server.log
  fi
  i=$((i + 1))
  [ $((i % 25)) -ne 0 ] || echo "control: $i runs, $failed failed, $(( $(date +%s) - start )) s"
done
elapsed=$(( $(date +%s) - start ))
# The kernel logs every process killed by a fault, with where it was.
faults=$(dmesg | grep -cE 'segfault at|general protection|trap invalid opcode')
dmesg | grep -E 'segfault at|general protection|trap invalid opcode' | tail -10
echo "VIB-LAB-MEASURE: control: $runs runs of native ibv_rc_pingpong pairs over rxe, $failed failed," \
     "$faults faults in the kernel log, $elapsed s ($((elapsed * 1000 / runs)) ms a run)"
[ $failed -eq 0 ] && [ "$faults" -eq 0 ]
