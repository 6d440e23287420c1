// Publishes what vibd serves, for `xl vib-list -l`: the state, HCA, port and
// quotas of each device and the counters of each context, under
// <vibd_dir>/devices/<domid>/<devid>[/<ctxid>] (format in vib/libxl_ib.hpp).
//
// Why xenstore and not a local socket: vibd may run in a driver domain while
// the administrator's xl runs in dom0, and xenstore is the channel they share
// (dom0 reads every node; nobody else reads these). What bounds the cost:
// one node per device and per context, written at most once per interval,
// only those whose text changed, in one transaction: no write while nothing
// changes, and not even a timer while no context exists.
#pragma once

#include <chrono>
#include <map>
#include <string>

#include "vib/libxl_ib.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::backend {

class StatusPublisher {
 public:
  using Clock = std::chrono::steady_clock;
  // Devices by "<domid>/<devid>".
  using Snapshot = std::map<std::string, toolstack::DeviceStatus>;

  StatusPublisher(platform::XenStore& store, std::string dir, std::chrono::milliseconds interval);

  // Something may have changed: publish at the next opportunity.
  void mark_dirty() { dirty_ = true; }
  // Milliseconds until a publish is due, or -1 when none is (nothing dirty
  // and no context whose counters move): a poll() timeout.
  int timeout(bool counters_move) const;
  // Publishes `snapshot` if a publish is due; returns whether it did.
  bool publish_if_due(const Snapshot& snapshot, bool counters_move);

 private:
  void publish(const Snapshot& snapshot);

  platform::XenStore& store_;
  std::string root_;
  std::chrono::milliseconds interval_;
  Clock::time_point last_;  // the last publish (the first one is due at once)
  bool dirty_ = true;
  std::map<std::string, std::string> written_;  // node path -> text
};

}  // namespace vib::backend
