# Shared by the scenarios that run a guest (sourced, dom0 side).
start_guest() {
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
  guest_domid=$(xl domid vib-guest)
  echo "guest is domain $guest_domid"
}

# Waits for the guest's report, prints it, destroys the guest; fails if the
# guest's scenario failed.
guest_result() {
  i=0
  until rc=$(xenstore-read "/local/domain/$guest_domid/data/vib-lab/rc" 2>/dev/null); do
    i=$((i + 1))
    [ $i -lt 120 ] || { echo "guest never reported"; xl list; return 1; }
    sleep 1
  done
  xenstore-read "/local/domain/$guest_domid/data/vib-lab/log"
  xl destroy vib-guest
  [ "$rc" = 0 ]
}
