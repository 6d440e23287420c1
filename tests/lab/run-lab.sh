#!/usr/bin/env bash
# Boots the lab under QEMU with a scenario and reports its result.
#
#   run-lab.sh SCENARIO_SCRIPT [PROJECT_BINARY...]
#
# Fails with the console's last lines on a timeout, a crash or a FAIL.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
scenario=$1
shift
# A scenario that needs longer than 300 s says so in a "# boot-timeout: N" line.
default_timeout=$(sed -n 's/^# boot-timeout: \([0-9][0-9]*\)$/\1/p' "$scenario" | head -1)
timeout_s=${VIB_LAB_TIMEOUT:-${default_timeout:-300}}
# And one that needs more on Xen's command line, in a "# xen-cmdline: ..." line.
xen_extra=$(sed -n 's/^# xen-cmdline: \([a-z0-9_=, ]*\)$/\1/p' "$scenario" | head -1)
# The CPU model (docs/lab.md says why these features are off); another one
# only to compare, e.g. VIB_LAB_QEMU_CPU=max with the control scenario.
cpu=${VIB_LAB_QEMU_CPU:-max,-smap,-smep,-pku,-xsave,-avx,-avx2,-fma,-f16c}
work=$(mktemp -d /tmp/vib-lab.XXXXXX)
trap 'rm -rf "$work"' EXIT
bash "$here/build-images.sh" "$work" "$scenario" "$@"
log=$work/console.log
# dom0 prints "VIB-LAB: dom0 up" seconds after QEMU starts. Once in
# hundreds of boots (2026-12-08, scenario g) QEMU's emulated machine hung
# before it did, silent after Xen started dom0's kernel, and would have sat
# out the scenario's whole timeout: no scenario step and no vib code had
# run. Such a boot is killed after VIB_LAB_BOOT_LIMIT seconds and the
# machine booted again, once, saying so; a scenario that fails after dom0
# came up is never run again.
boot_limit=${VIB_LAB_BOOT_LIMIT:-240}
boot() {
  start=$(date +%s)
  qemu-system-x86_64 -machine q35 -cpu "$cpu" -m 3072 -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$work/xen" \
    -append "dom0_mem=1024M,max:1024M console=com1 com1=115200 noreboot smap=0 smep=0${xen_extra:+ $xen_extra}" \
    -initrd "$work/vmlinuz console=hvc0 quiet,$work/dom0.cpio.gz" > "$log" 2>&1 < /dev/null &
  qemu=$!
  # Xen does not exit when dom0 dies ('noreboot'): watch the console instead.
  rc=0
  while kill -0 "$qemu" 2>/dev/null; do
    if grep -aqE 'Hardware Dom0 (crashed|halted)|Kernel panic|VIB-LAB-RESULT' "$log"; then
      sleep 2
      kill "$qemu" 2>/dev/null || true
      break
    fi
    elapsed=$(( $(date +%s) - start ))
    if [ "$elapsed" -ge "$boot_limit" ] && ! grep -aq '^VIB-LAB: dom0 up' "$log"; then
      rc=125
      kill "$qemu" 2>/dev/null || true
      break
    fi
    if [ "$elapsed" -ge "$timeout_s" ]; then
      rc=124
      kill "$qemu" 2>/dev/null || true
      break
    fi
    sleep 1
  done
  wait "$qemu" 2>/dev/null || true
}
echo "lab: booting $(basename "$scenario") (timeout ${timeout_s}s)"
boot
if [ $rc -eq 125 ]; then
  echo "lab: the emulated machine hung before dom0 came up (nothing in ${boot_limit}s); its console ends:" >&2
  tail -3 "$log" >&2
  echo "lab: booting $(basename "$scenario") again" >&2
  boot
  if [ $rc -eq 125 ]; then echo "lab: the emulated machine hung before dom0 came up again" >&2; fi
fi
echo "lab: finished in $(( $(date +%s) - start ))s"
# The scenario's own output: what dom0 printed after it came up.
sed 's/\r$//' "$log" | sed -n '/^VIB-LAB: dom0 up/,$p' | grep -av -e '^(XEN)' -e '^\[ *[0-9.]*\]' || true
if grep -aq '^VIB-LAB-RESULT: PASS' "$log"; then
  exit 0
fi
[ $rc -eq 124 ] && echo "lab: TIMEOUT after ${timeout_s}s" >&2
echo "lab: FAILED; last console lines:" >&2
grep -aiE 'panic|BUG|Oops|VIB-LAB|error' "$log" | tail -20 >&2 || true
tail -40 "$log" >&2
exit 1
