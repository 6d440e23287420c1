// vibd, the vib back-end daemon: serves the vib devices of guests from dom0
// (or a driver domain). This is its whole public interface; main() and the
// tests drive it through run_daemon().
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "vib/platform/grants.hpp"
#include "vib/platform/types.hpp"

namespace vib::backend {

struct DaemonOptions {
  // The real Xen in production; the host-local Xen only when asked for.
  platform::XenTarget xen = platform::XenTarget::real();
  // HCA for devices whose xenstore configuration names none.
  std::string default_hca = "soft";
  // Hotplug scripts (a device's `script` node): where relative names live,
  // and how long one may run before vibd kills it and fails the device.
  std::string scripts_dir = "/etc/xen/scripts";
  std::chrono::milliseconds script_timeout{30000};
  // RDMA-CM: how long a connection request waits for the listener's answer,
  // and an accepted one for the active side's RTU (rdma_cm's own is ~4 s
  // times its retries).
  std::chrono::milliseconds cm_timeout{20000};
  // Provisioning at `xl create`: the vib= lines of each new domain's config,
  // as the xl front kept it by domain name (stash_dir; unset: libxl-ib's
  // kConfigStashDir), or else as xl saved it after `xl config-update`
  // (libxl userdata "xl" in userdata_dir).
  bool provision = true;
  std::optional<std::string> stash_dir;
  std::string userdata_dir = "/var/lib/xen";
  std::chrono::milliseconds userdata_wait{30000};
  // Tests only (empty in vibd): wraps the grant mapper guest memory is
  // mapped with, so a test can hold one guest's mapping in the middle and
  // watch what else vibd still does meanwhile.
  std::function<std::unique_ptr<platform::GrantMapper>(std::unique_ptr<platform::GrantMapper>)> wrap_grant_mapper;
  // The fast path: how many workers serve the contexts (0: one per online
  // CPU), how long an idle worker may spin before it sleeps (when spinning
  // pays and takes no CPU from anyone: workers.hpp, SpinPolicy; 0: never),
  // and how many threads the control pool may grow to (0: two per online
  // CPU).
  // The workers run at `worker_nice` (they run only for their guests' work,
  // so when they have some they go first; needs CAP_SYS_NICE, else ignored).
  unsigned workers = 0;
  std::chrono::microseconds max_spin{50};
  int worker_nice = -10;
  unsigned control_threads = 0;
  // How often, at most, the devices' status is published for
  // `xl vib-list -l` (see status.hpp).
  std::chrono::milliseconds status_interval{1000};
  bool systemd_logging = false;
  bool verbose = false;
  // Tells the service manager how vibd is doing, in sd_notify(3) words:
  // "READY=1" once it serves (watches set, existing devices looked at),
  // "STATUS=..." when what it serves changes, "STOPPING=1" when it stops.
  std::function<void(const std::string&)> notify;
};

// Exit codes of run_daemon besides 0 (stopped) and 1 (failed).
inline constexpr int kExitAlreadyRunning = 3;  // another vibd serves the domain

// Serves until `stop_fd` becomes readable. Returns a process exit code.
int run_daemon(const DaemonOptions& options, int stop_fd);

}  // namespace vib::backend
