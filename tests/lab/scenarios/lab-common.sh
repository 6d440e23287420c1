# Shared by the lab's scenarios (sourced, dom0 side).

# rxe_on_veth: Soft-RoCE device rxe0 on a veth pair inside dom0 (no NIC, no
# IPv4: GID 0 is the link-local address; connections go over loopback).
# Returns once GID 0 is set and its address is usable. The kernel fills GID 0
# in as soon as IPv6 adds vibe0's link-local address, but while that address
# is still tentative (duplicate address detection, about a second) a route
# lookup from it fails and so does moving a QP to RTR: the first run of the
# control scenario failed that way in CI. Nothing else is on this link, so
# DAD is switched off, and the wait also covers the tentative state in case
# the sysctl is missing. Fails after 30 s.
rxe_on_veth() {
  /usr/sbin/ip link add vibe0 type veth peer name vibe1 || return 1
  for dev in vibe0 vibe1; do
    echo 0 > /proc/sys/net/ipv6/conf/$dev/accept_dad 2>/dev/null ||
      echo "note: cannot switch off DAD on $dev; waiting for it instead"
  done
  /usr/sbin/ip link set vibe0 up || return 1
  /usr/sbin/ip link set vibe1 up || return 1
  rdma link add rxe0 type rxe netdev vibe0 || { echo "rdma link add rxe0 failed"; return 1; }
  gid_file=/sys/class/infiniband/rxe0/ports/1/gids/0
  waited=0
  until gid_usable "$gid_file"; do
    if [ $waited -ge 300 ]; then
      echo "rxe0's GID 0 still unset or its address tentative after 30 s:"
      cat $gid_file; /usr/sbin/ip -6 addr show dev vibe0
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "rxe0 up, GID 0 $(cat $gid_file) (after $((waited * 100)) ms)"
}

# gid_usable GID_FILE: the GID is set and vibe0 has a link-local address that
# is neither tentative nor failed duplicate detection.
gid_usable() {
  gid=$(cat "$1" 2>/dev/null)
  [ -n "$gid" ] && [ "$gid" != "0000:0000:0000:0000:0000:0000:0000:0000" ] || return 1
  addr=$(/usr/sbin/ip -6 -o addr show dev vibe0 scope link)
  [ -n "$addr" ] || return 1
  case "$addr" in *tentative*|*dadfailed*) return 1 ;; esac
  return 0
}

# fail MESSAGE...: the scenario's verdict, with the end of vibd's log (when
# it started one, in $vibd_log) to say why. A scenario with more to show
# defines its own after sourcing this file.
fail() {
  echo "FAIL: $*"
  if [ -n "${vibd_log:-}" ] && [ -f "$vibd_log" ]; then
    echo "---- vibd log (last 40 lines) ----"
    tail -n 40 "$vibd_log"
  fi
  exit 1
}

# check_pair DEVICE [OPTION...]: an rdma_check server and client on DEVICE
# in this domain, over loopback TCP, each cut at 120 s; their exit statuses
# in $server_rc and $client_rc, their outputs in /tmp/server.out and
# /tmp/client.out.
check_pair() {
  timeout 120 /vib/vib-rdma-check -d "$@" > /tmp/server.out 2>&1 &
  pair_server=$!
  timeout 120 /vib/vib-rdma-check -d "$@" 127.0.0.1 > /tmp/client.out 2>&1
  client_rc=$?
  wait $pair_server
  server_rc=$?
}

# running PID: the process PID has not ended. (kill -0 is not enough: a
# child that exited stays a zombie until the shell waits for it.)
running() {
  state=$(sed -n 's/^[0-9]* (.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# listening PORT: a TCP socket listens on PORT (state 0A in /proc/net/tcp).
listening() {
  grep -qi ":$(printf '%04X' "$1") [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# wait_until SECONDS COMMAND...: waits for COMMAND to succeed, polling 4
# times a second; fails after SECONDS.
wait_until() {
  limit=$1
  shift
  n=0
  until "$@"; do
    n=$((n + 1))
    [ $n -lt $((limit * 4)) ] || return 1
    sleep 0.25
  done
}

# xl_front_first: vib's xl front ahead of Xen's xl in PATH, as administrators
# install it (from /vib/xl, with /vib/xl-vib as its plugin).
xl_front_first() {
  mkdir -p /tmp/front
  cp /vib/xl /tmp/front/xl
  chmod 755 /tmp/front/xl
  VIB_REAL_XL=$(command -v xl)
  export VIB_REAL_XL VIB_XL_VIB=/vib/xl-vib PATH="/tmp/front:$PATH"
  echo "xl is $(command -v xl), Xen's xl $VIB_REAL_XL"
}

# start_vibd ARGS...: vibd ($vibd_bin, /vib/vibd unless set) with ARGS in
# the background, its output in $vibd_log, its pid in $vibd_pid; returns once
# it watches its domain's back-end directory and has served its first pass
# (so every thread it keeps runs), fails if it has not within 20 s or exited. The log is emptied here,
# not by the background shell's redirection, which may run after the first
# look at the log and let a previous vibd's lines answer for this one.
start_vibd() {
  : > "$vibd_log"
  "${vibd_bin:-/vib/vibd}" "$@" >> "$vibd_log" 2>&1 &
  vibd_pid=$!
  wait_until 20 grep -q "vibd: ready: serving" "$vibd_log" || return 1
  kill -0 "$vibd_pid" 2>/dev/null || return 1
  echo "vibd (pid $vibd_pid) is $(sed -n 's/.*vibd: \(watching .*\)/\1/p' "$vibd_log" | head -1)"
}

# Shared by the scenarios that run a guest.
# start_guest [CONFIG_LINE...]: the arguments are added to the guest's config.
# The guest is named $guest_name (vib-guest unless set), has $guest_vcpus
# vCPUs (1 unless set) and $guest_memory MiB (512 unless set), and its
# kernel gets $guest_extra on its command line; its domain id goes to
# $guest_domid.
start_guest() {
  name=${guest_name:-vib-guest}
  cat > "/tmp/$name.cfg" <<CFG
name = "$name"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/guest.cpio.gz"
extra = "console=hvc0 quiet ${guest_extra:-}"
memory = ${guest_memory:-512}
vcpus = ${guest_vcpus:-1}
on_poweroff = "preserve"
CFG
  for line in "$@"; do echo "$line" >> "/tmp/$name.cfg"; done
  xl create "/tmp/$name.cfg"
  guest_domid=$(xl domid "$name")
  echo "guest $name is domain $guest_domid"
}

# wait_for_vib_device N (in the guest): vibd adds devices when it sees the
# domain introduced, so they may appear only after the guest booted; waits
# up to 60 s for device/vib/N.
wait_for_vib_device() {
  i=0
  until /usr/bin/xenstore-read "device/vib/$1/backend" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 60 ] || { echo "guest: no vib device $1 after 60 s"; return 1; }
    sleep 1
  done
  echo "guest: device/vib/$1 -> $(/usr/bin/xenstore-read "device/vib/$1/backend") after ${i}s"
}

# guest_report [SECONDS]: waits for the guest's report and prints it; fails
# if the guest's scenario failed, or if SECONDS (120 unless told) pass
# without the report and without the guest moving its data/vib-lab/progress
# node. A guest that says how far it got is given time by its progress, not
# by a total that a loaded machine outruns (lab g ran out of a fixed 1000 s
# while its guest was still running programs). The progress is shown about
# once a minute, and at once when it says FAILED, so a long run shows how
# far it got even if it is cut short. The guest stays (powered off:
# on_poweroff = "preserve").
guest_report() {
  i=0
  progress=
  report_start=$(date +%s)
  shown_at=$report_start
  until rc=$(xenstore-read "/local/domain/$guest_domid/data/vib-lab/rc" 2>/dev/null); do
    now=$(xenstore-read "/local/domain/$guest_domid/data/vib-lab/progress" 2>/dev/null || true)
    if [ "$now" != "$progress" ]; then
      progress=$now
      i=0
      t=$(date +%s)
      case "$progress" in
        *FAILED*) show=1 ;;
        *) show=$((t - shown_at >= 60)) ;;
      esac
      if [ "$show" = 1 ]; then
        echo "guest: $progress ($((t - report_start)) s)"
        shown_at=$t
      fi
    fi
    i=$((i + 1))
    [ $i -lt "${1:-120}" ] || {
      console="/var/log/xen/console/guest-$(xl domname "$guest_domid" 2>/dev/null).log"
      # A kernel oops scrolls past any tail: its first report in full.
      if grep -q -E '\] (BUG|Oops|general protection fault|WARNING|kernel BUG)' "$console" 2>/dev/null; then
        echo "the guest's kernel failed; its first report:"
        sed -n -E '/\] (BUG|Oops|general protection fault|WARNING|kernel BUG)/,$p' "$console" | head -n 80
      fi
      echo "guest never reported${progress:+ (its last progress: $progress)}; the end of its console:"
      tail -n 40 "$console" 2>/dev/null
      xl list
      return 1
    }
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
