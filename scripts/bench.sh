#!/usr/bin/env bash
# Builds vib (scripts/build.sh) and runs the benchmark: soft HCA direct vs
# through vibd. Arguments go to vib-bench (--quick, --iterations N, --help).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${VIB_BUILD_DIR:-$top/build}
case "$build" in /*) ;; *) build=$top/$build ;; esac
VIB_BUILD_DIR=$build bash "$top/scripts/build.sh" >/dev/null
exec "$build/tests/bench/vib-bench" "$@"
