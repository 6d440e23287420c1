#!/bin/sh
# Scenario (a): dom0 runs xenstored, `xl info` works, Soft-RoCE gives a verbs
# device, and native ibv_rc_pingpong and ib_send_lat run over it.
set -e
xl info | grep -E '^(xen_version|total_memory|nr_cpus)'
xenstore-ls /local/domain/0 | head -5
# (busybox sh runs its own applets first, so real tools are named by path.)
/usr/sbin/ip -br link
. /lab-common.sh
rxe_on_veth
ibv_devices
ibv_devinfo -d rxe0 | grep -E 'state|link_layer'
ibv_rc_pingpong -d rxe0 -g 0 -n 1000 > /tmp/pp-server.log 2>&1 &
sleep 1
ibv_rc_pingpong -d rxe0 -g 0 -n 1000 127.0.0.1 | tee /tmp/pp-client.log
grep -q 'iters in' /tmp/pp-client.log
echo "VIB-LAB-MEASURE: rc_pingpong $(grep 'usec/iter' /tmp/pp-client.log | tail -1)"
ib_send_lat -d rxe0 -x 0 -n 1000 -F > /tmp/lat-server.log 2>&1 &
sleep 1
ib_send_lat -d rxe0 -x 0 -n 1000 -F 127.0.0.1 | tee /tmp/lat-client.log
echo "VIB-LAB-MEASURE: ib_send_lat $(grep -E '^ *2 ' /tmp/lat-client.log | head -1)"
