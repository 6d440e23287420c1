#!/usr/bin/env bash
# The main job on its embedded default: on the host-local Xen, vibd serves a
# vib device (built-in software HCA) to a process of guest domain 5, which
# queries it and allocates a protection domain. Prints what happened and the
# live xenstore tree of the device.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${VIB_BUILD_DIR:-$top/build}
localxen=$build/platform/local/vib-localxen
vibd=$build/backend-daemon/vibd
devinfo=$build/frontend-lib/vib-devinfo
for bin in "$localxen" "$vibd" "$devinfo"; do
  [ -x "$bin" ] || { echo "demo: $bin is missing; build first (scripts/build.sh)" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/vib-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
export XENSTORED_PATH=$dir/domain/0/xenstore   # the real xenstore-* tools talk to the local store

step() { printf '\n== %s\n' "$*"; }

step "host-local Xen in $dir"
"$localxen" serve --dir "$dir" > "$dir/localxen.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$XENSTORED_PATH" ] && break; sleep 0.1; done
"$localxen" create-domain --dir "$dir" --domid 5 --name demo-guest

step "toolstack: vib device 0 of domain 5 (what 'vib = [ \"hca=soft\" ]' provisions)"
be=/local/domain/0/backend/vib/5/0
fe=/local/domain/5/device/vib/0
xenstore-write "$be/frontend" "$fe" "$be/frontend-id" 5 "$be/online" 1 "$be/state" 1 \
               "$be/handle" 0 "$be/hca" soft "$be/port" 1 "$be/pkeys" 0xffff
xenstore-chmod -r "$be" n0 r5          # back-end: dom0's, readable by the guest
xenstore-write "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/state" 1 "$fe/handle" 0
xenstore-chmod -r "$fe" n5 r0          # front-end: the guest's, readable by dom0

step "vibd (dom0 back-end daemon)"
"$vibd" --local-xen "$dir" 2> >(sed 's/^/  [vibd] /' >&2) &
pids+=($!)
for _ in $(seq 50); do [ "$(xenstore-read "$be/state" 2>/dev/null)" = 2 ] && break; sleep 0.1; done
echo "back-end state: $(xenstore-read "$be/state") (InitWait)"

step "guest domain 5: a process opens the device"
"$devinfo" --local-xen "$dir" --domid 5

step "xenstore-ls of the device"
sleep 0.2
xenstore-ls -fp "$be" "$fe"

step "stop vibd (SIGTERM)"
kill "${pids[1]}"
wait "${pids[1]}" || true
echo "demo: done"
