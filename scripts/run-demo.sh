#!/usr/bin/env bash
# README command 1: install the Debian packages, build, run the demo.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bash "$top/scripts/install-deps.sh"
bash "$top/scripts/build.sh"
bash "$top/scripts/demo.sh"
