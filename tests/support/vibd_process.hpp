// vibd as a child process on the host-local Xen, and devices provisioned the
// way the toolstack writes them: for tests and benchmarks alike.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "vib/platform/types.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::test {

// Starts `vibd --local-xen dir extra_args...`; with a log path, its stderr
// goes there. The child dies with this process. Returns its pid.
pid_t spawn_vibd(const char* vibd, const std::string& local_xen_dir, const std::string& log = {},
                 const std::vector<std::string>& extra_args = {});
// SIGTERM and wait; the wait status, or -1 if pid was not running.
int stop_vibd(pid_t& pid);

std::string backend_path(platform::DomId domid, unsigned devid = 0);
std::string frontend_path(platform::DomId domid, unsigned devid = 0);

// What the toolstack writes for device 0 of `domid` served by dom0, with
// libxl's permissions, inside transaction `tx`.
void provision_device(platform::XenStore& store, platform::TransactionId tx, platform::DomId domid,
                      const std::string& hca = "soft");

}  // namespace vib::test
