// A device's hotplug script, run by vibd in the back-end's own domain.
//
// vibd is the only one that runs vib hotplug scripts, in dom0 as in a
// driver domain (the part `xl devd` plays for a driver domain's vifs): the
// toolstack only waits for hotplug-status, so a script runs exactly once
// per add or remove whichever tool created the device.
//
// A script runs on its own thread: the main thread, which drives every
// device's handshake and routes HCA events, never waits for one.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "vib/platform/process.hpp"

namespace vib::backend {

struct HotplugSettings {
  std::string scripts_dir = "/etc/xen/scripts";  // for relative script= names
  std::chrono::milliseconds timeout{30000};
  std::vector<std::string> extra_env;  // e.g. XENSTORED_PATH for the host-local Xen
};

// Where the script named by a device's `script` node is: absolute paths as
// they are, plain names under the scripts directory. Anything else (a
// relative path with a '/', an empty name) is nullopt.
std::optional<std::string> hotplug_script_path(const std::string& script, const std::string& scripts_dir);

class HotplugRun {
 public:
  // Starts `path action` with XENBUS_PATH=backend_path; `done` is called on
  // the script's thread when it has finished (to wake the main thread).
  HotplugRun(const HotplugSettings& settings, const std::string& path, const std::string& action,
             const std::string& backend_path, std::function<void()> done);
  // Kills a script still running: its device is gone.
  ~HotplugRun();
  HotplugRun(const HotplugRun&) = delete;
  HotplugRun& operator=(const HotplugRun&) = delete;

  const std::string& action() const { return action_; }
  // The outcome once the script has finished.
  std::optional<platform::ProgramResult> result() const;
  // "hotplug script PATH ACTION", for messages.
  std::string describe() const { return "hotplug script " + path_ + " " + action_; }

 private:
  std::string path_, action_;
  std::atomic<bool> cancel_{false};
  mutable std::mutex mu_;
  std::optional<platform::ProgramResult> result_;
  std::thread thread_;  // last: started once the rest exists
};

}  // namespace vib::backend
