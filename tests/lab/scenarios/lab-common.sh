# Shared by the scenarios that run a guest (sourced, dom0 side).
# start_guest [CONFIG_LINE...]: the arguments are added to the guest's config.
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
  for line in "$@"; do echo "$line" >> /tmp/guest.cfg; done
  xl create /tmp/guest.cfg
  guest_domid=$(xl domid vib-guest)
  echo "guest is domain $guest_domid"
}

# Waits for the guest's report and prints it; fails if the guest's scenario
# failed. The guest stays (powered off: on_poweroff = "preserve").
guest_report() {
  i=0
  until rc=$(xenstore-read "/local/domain/$guest_domid/data/vib-lab/rc" 2>/dev/null); do
    i=$((i + 1))
    [ $i -lt 120 ] || { echo "guest never reported"; xl list; return 1; }
    sleep 1
  done
  xenstore-read -R "/local/domain/$guest_domid/data/vib-lab/log"
  echo   # -R prints the value as it is, without a newline
  [ "$rc" = 0 ]
}

# guest_report, then destroys the guest.
guest_result() {
  if guest_report; then guest_ok=0; else guest_ok=1; fi
  xl destroy vib-guest
  [ "$guest_ok" = 0 ]
}
