#!/usr/bin/env bash
# Builds vib (scripts/build.sh) and runs the benchmark: every figure of the
# fast path (RC latency busy-polling and with completion events, bandwidth,
# message rate, the shared-memory floor, QP lifecycle, the 64 x 16 scale run),
# soft HCA direct vs through vibd, as ratios, in one run. Arguments go to
# vib-bench (--quick, --json, --sections, --help). Take figures when `uptime`
# shows a quiet machine: vib-bench prints the load before and after.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${VIB_BUILD_DIR:-$top/build}
case "$build" in /*) ;; *) build=$top/$build ;; esac
VIB_BUILD_DIR=$build bash "$top/scripts/build.sh" >/dev/null
exec "$build/tests/bench/vib-bench" "$@"
