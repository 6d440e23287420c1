#!/usr/bin/env bash
# Builds (incrementally) and runs the test suite. Extra args go to ctest.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${VIB_BUILD_DIR:-$top/build}
bash "$top/scripts/build.sh" >/dev/null
ctest --test-dir "$build" --output-on-failure -j2 --timeout 300 "$@"
