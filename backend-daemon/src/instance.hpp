// One vibd per back-end domain, as xen-9pfsd: a running vibd announces
// itself in xenstore (toolstack::vibd_dir: state "running", pid), written in
// one transaction when it starts and removed when it stops, so the toolstack
// tells at once whether a vibd serves a domain.
//
// The announcement alone cannot decide who runs: a vibd that crashed leaves
// it behind, and 9pfsd's "already there, exit" would then block every
// restart. A lock file decides instead (flock, dropped by the kernel when the
// process dies, however it dies); the announcement of a vibd that no longer
// holds the lock is stale and replaced.
#pragma once

#include <stdexcept>
#include <string>

#include "vib/platform/types.hpp"
#include "vib/platform/unique_fd.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::backend {

// Another vibd serves the domain: the message names it.
class AlreadyRunning : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Where the lock of the vibd of `xen`'s domain lives: /run/vib/vibd.lock on
// Xen (one kernel per domain), <local_dir>/vibd-dom<N>.lock on the host-local
// Xen (one kernel for every simulated domain).
std::string instance_lock_path(const platform::XenTarget& xen);

class Instance {
 public:
  // Takes the lock (throws AlreadyRunning when another vibd holds it), then
  // writes the announcement of `self` in `store`, replacing a stale one.
  Instance(const platform::XenTarget& xen, platform::XenStore& store, platform::DomId self);
  ~Instance();  // removes the announcement (and the status below it)
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  const std::string& dir() const { return dir_; }
  // The pid of a crashed vibd whose announcement was replaced, if any.
  const std::string& replaced() const { return replaced_; }

 private:
  platform::UniqueFd lock_;
  platform::XenStore& store_;
  std::string dir_;
  std::string replaced_;
};

}  // namespace vib::backend
