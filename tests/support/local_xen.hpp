// Test support: a real vib-localxen process on a temporary directory, and
// helpers to create and destroy simulated domains through it.
#pragma once

#include <string>
#include <sys/types.h>

#include "vib/platform/types.hpp"

namespace vib::test {

class LocalXen {
 public:
  LocalXen();   // starts `vib-localxen serve` and waits until it is ready
  ~LocalXen();  // stops it and removes the directory
  LocalXen(const LocalXen&) = delete;
  LocalXen& operator=(const LocalXen&) = delete;

  const std::string& dir() const { return dir_; }
  pid_t pid() const { return pid_; }  // the vib-localxen process
  platform::XenTarget as(platform::DomId domid) const { return platform::XenTarget::local(dir_, domid); }
  // With max_grant_frames, the domain's grant table holds that many frames
  // of 512 grants (as xl's max_grant_frames); without, vib-localxen's default.
  void create_domain(platform::DomId domid, unsigned max_grant_frames = 0);
  void destroy_domain(platform::DomId domid);
  // Runs a command with XENSTORED_PATH set to dom0's socket; returns stdout.
  std::string xenstore_tool(const std::string& command, int* status = nullptr) const;

 private:
  std::string dir_;
  pid_t pid_ = -1;
};

}  // namespace vib::test
