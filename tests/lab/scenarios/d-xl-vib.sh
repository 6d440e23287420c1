#!/bin/sh
# Scenario (d): `xl create` with a vib= line on real Xen, through the xl
# front (ahead of Xen's xl in PATH, as administrators install it): it checks
# and keeps the vib= lines, Xen's xl creates the domain, and vibd (real Xen,
# software HCA, the vib hotplug script) sees the domain introduced, finds
# the kept config by the domain's name and adds its vib device; the guest's
# vib-devinfo talks to vibd over real grants, event channels and xenstore;
# then `xl vib-list`, `xl vib-detach`, `xl vib-attach` and `xl destroy`,
# after which vibd removes the dead domain's back-end directory.
#
# dom0 gets /vib/vibd, /vib/xl-vib, /vib/vib-devinfo, /vib/vib (the hotplug
# script, so /vib is vibd's --scripts-dir) and /vib/xl (the front); the
# guest /vib/vib-devinfo.
. /lab-common.sh

if [ "$1" = guest ]; then
  # vibd adds the device when it sees the domain introduced: it may appear
  # only after this boots.
  i=0
  until /usr/bin/xenstore-read device/vib/0/backend >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 60 ] || { echo "guest: no vib device 0 after 60 s"; exit 1; }
    sleep 1
  done
  echo "guest: device/vib/0 -> $(/usr/bin/xenstore-read device/vib/0/backend) after ${i}s"
  # With a time limit: a hang is reported with where it hangs.
  /vib/vib-devinfo > /tmp/devinfo.out 2>&1 &
  pid=$!
  i=0
  while kill -0 $pid 2>/dev/null && [ $i -lt 120 ]; do
    i=$((i + 1))
    sleep 0.25
  done
  if kill -0 $pid 2>/dev/null; then
    echo "guest: vib-devinfo still running after 30 s; its threads are in:"
    for t in /proc/$pid/task/*; do
      echo "  ${t##*/}: wchan $(cat $t/wchan 2>/dev/null), syscall $(cut -d' ' -f1-2 $t/syscall 2>/dev/null)"
    done
    ls -l /proc/$pid/fd 2>/dev/null | sed -n 's/.*[0-9] \([0-9]* -> .*\)/  fd \1/p'
    kill -9 $pid
    wait $pid 2>/dev/null
    cat /tmp/devinfo.out
    echo "guest: vib-devinfo hung"
    exit 1
  fi
  wait $pid
  rc=$?
  cat /tmp/devinfo.out
  echo "guest: vib-devinfo exited $rc"
  exit $rc
fi

be_root=/local/domain/0/backend/vib
vibd_log=/tmp/vibd.log

show_vibd_log() {
  if [ -n "$vibd_pid" ] && [ -d /proc/$vibd_pid ]; then
    echo "---- vibd's threads ----"
    for t in /proc/$vibd_pid/task/*; do
      echo "  ${t##*/} $(cat $t/comm): wchan $(cat $t/wchan 2>/dev/null), syscall $(cut -d' ' -f1-2 $t/syscall 2>/dev/null)"
    done
  fi
  echo "---- vibd log ($vibd_log) ----"
  cat "$vibd_log" 2>/dev/null
  echo "---- end of vibd log ----"
}
trap show_vibd_log EXIT

fail() {
  echo "FAIL: $*"
  exit 1
}

# Waits up to $1 seconds for the command "$2..." to succeed.
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

be_gone() { ! xenstore-read "$be_root/$guest_domid" >/dev/null 2>&1 && \
            ! xenstore-ls "$be_root/$guest_domid" >/dev/null 2>&1; }
vibd_watching() { grep -q "watching $be_root" "$vibd_log" 2>/dev/null; }
# The device is served: state InitWait or Connected, hotplug script done.
be_ready() {
  st=$(xenstore-read "$be_root/$guest_domid/$1/state" 2>/dev/null)
  hs=$(xenstore-read "$be_root/$guest_domid/$1/hotplug-status" 2>/dev/null)
  { [ "$st" = 2 ] || [ "$st" = 4 ]; } && [ "$hs" = connected ]
}

echo "== the xl front ahead of Xen's xl in PATH"
mkdir -p /tmp/front
cp /vib/xl /tmp/front/xl
chmod 755 /tmp/front/xl
VIB_REAL_XL=$(command -v xl)
export VIB_REAL_XL VIB_XL_VIB=/vib/xl-vib PATH="/tmp/front:$PATH"
echo "xl is $(command -v xl), Xen's xl $VIB_REAL_XL"

echo "== starting vibd (real Xen, software HCA, scripts in /vib)"
/vib/vibd --hca soft --scripts-dir /vib --verbose > "$vibd_log" 2>&1 &
vibd_pid=$!
wait_until 20 vibd_watching || fail "vibd did not start watching $be_root within 20 s"
kill -0 "$vibd_pid" 2>/dev/null || fail "vibd exited"
echo "vibd (pid $vibd_pid) is watching $be_root"

echo "== xl create with vib = [ 'hca=soft,script=vib' ]"
start_guest "vib = [ 'hca=soft,script=vib' ]"
[ -n "$guest_domid" ] || fail "xl create gave no domain"
grep '^vib' /tmp/guest.cfg

echo "== the config the front kept for vibd"
cat /var/lib/vib/domains/vib-guest.cfg || fail "the xl front kept no config for vib-guest"

# vibd waits up to 30 s for a config to appear: 40 s lets its log say why
# when it gave up.
echo "== check: back-end device $be_root/$guest_domid/0 in state 2 or 4 with hotplug-status connected"
if ! wait_until 40 be_ready 0; then
  xenstore-ls -fp "$be_root" 2>&1
  fail "xl create did not give domain $guest_domid a served vib device 0 within 40 s" \
       "(state '$st', hotplug-status '$hs')"
fi
xenstore-ls -fp "$be_root"
echo "state $st, hotplug-status $hs: ok"

echo "== check: xl vib-list vib-guest lists it"
xl vib-list vib-guest > /tmp/vib-list.out 2>&1 || { cat /tmp/vib-list.out; fail "xl vib-list failed"; }
cat /tmp/vib-list.out
grep -q "^0 .*$be_root/$guest_domid/0\$" /tmp/vib-list.out ||
  fail "xl vib-list does not list device 0 with back-end $be_root/$guest_domid/0"
echo "listed: ok"

echo "== check: vib-devinfo in the guest"
guest_report || fail "vib-devinfo in the guest failed (its output is above)"
echo "guest's vib-devinfo: ok"

echo "== check: xl vib-detach vib-guest 0"
xl vib-detach vib-guest 0 || fail "xl vib-detach vib-guest 0 failed"
xenstore-ls "$be_root/$guest_domid/0" >/dev/null 2>&1 && {
  xenstore-ls -fp "$be_root"
  fail "$be_root/$guest_domid/0 is still there after vib-detach"
}
echo "$be_root/$guest_domid/0 is gone: ok"

echo "== check: xl vib-attach vib-guest hca=soft, then xl destroy"
xl vib-attach vib-guest hca=soft || fail "xl vib-attach vib-guest hca=soft failed"
xl vib-list vib-guest
xenstore-ls -fp "$be_root/$guest_domid"
xl destroy vib-guest || fail "xl destroy vib-guest failed"
if ! wait_until 10 be_gone; then
  xenstore-ls -fp "$be_root"
  fail "$be_root/$guest_domid is still there 10 s after xl destroy"
fi
echo "$be_root/$guest_domid is gone after xl destroy: ok"
xenstore-ls -fp "$be_root" 2>&1 || true

kill "$vibd_pid"
wait "$vibd_pid"
echo "vibd exited with status $?"
exit 0
