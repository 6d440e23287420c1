#!/bin/sh
# Scenario (b): a PV guest starts with `xl create`; in it the grant, event
# channel and xenbus devices work. The guest reports through data/vib-lab.
. /lab-common.sh
if [ "$1" = guest ]; then
  set -e
  for d in gntalloc gntdev evtchn xenbus; do
    [ -c /dev/xen/$d ] || { echo "missing /dev/xen/$d"; exit 1; }
  done
  echo "domid $(/usr/bin/xenstore-read domid), name $(/usr/bin/xenstore-read name)"
  exit 0
fi
set -e
start_guest
xl list
guest_result
