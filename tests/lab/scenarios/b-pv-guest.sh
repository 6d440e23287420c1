#!/bin/sh
# Scenario (b): a PV guest starts with `xl create`; in it the grant, event
# channel and xenbus devices work. The guest reports through data/vib-lab.
if [ "$1" = guest ]; then
  set -e
  for d in gntalloc gntdev evtchn xenbus; do
    [ -c /dev/xen/$d ] || { echo "missing /dev/xen/$d"; exit 1; }
  done
  echo "domid $(/usr/bin/xenstore-read domid), name $(/usr/bin/xenstore-read name)"
  exit 0
fi
set -e
cat > /tmp/guest.cfg <<CFG
name = "vib-guest"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/guest.cpio.gz"
extra = "console=hvc0 quiet"
memory = 512
vcpus = 1
on_poweroff = "preserve"
CFG
xl create /tmp/guest.cfg
domid=$(xl domid vib-guest)
echo "guest is domain $domid"
i=0
until rc=$(xenstore-read /local/domain/$domid/data/vib-lab/rc 2>/dev/null); do
  i=$((i + 1)); [ $i -lt 120 ] || { echo "guest never reported"; xl list; exit 1; }
  sleep 1
done
xenstore-read /local/domain/$domid/data/vib-lab/log
xl list
xl destroy vib-guest
[ "$rc" = 0 ]
