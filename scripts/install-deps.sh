#!/usr/bin/env bash
# Installs the Debian 12 packages vib builds and tests with. Idempotent.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libxen-dev xenstore-utils            # libxenstore/gnttab/evtchn/ctrl/light/xlutil + CLI tools
  libibverbs-dev rdma-core ibverbs-utils perftest
  librdmacm-dev rdmacm-utils            # RDMA-CM: headers, and the programs the compat tests run
  ucx-utils                            # ucx_info: UCX sees vib devices (compat test)
  libibumad-dev infiniband-diags       # ibstat over vib's libibumad (compat test)
  libyajl-dev libsystemd-dev
  libgtest-dev libgmock-dev
  clang libclang-rt-14-dev             # libFuzzer targets and sanitizer runtimes
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
