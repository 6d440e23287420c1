#!/bin/sh
# Scenario (c): vib's real libxenstore/libxengnttab/libxenevtchn code across
# dom0 and a PV guest (vib-lab-crossdomain, built from tests/lab/programs).
. /lab-common.sh
if [ "$1" = guest ]; then
  exec /vib/vib-lab-crossdomain guest
fi
set -e
start_guest
/vib/vib-lab-crossdomain dom0 "$guest_domid"
guest_result
