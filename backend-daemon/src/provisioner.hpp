// Provisioning at domain creation: `xl create` of a config with vib= lines
// gets its devices without any extra command.
//
// xl knows nothing of vib and keeps no copy of the lines it does not know,
// so the xl front keeps the config of each domain it creates, by name
// (stash_create_config). When a domain is introduced, vibd finds that
// config by the domain's name (or, failing that, the "xl" userdata xl
// writes after `xl config-update`) and adds the domain's vib devices
// through libxl-ib, exactly as `xl vib-attach` would; when a domain is
// released, it removes the back-end directories libxl leaves behind for
// device kinds it does not know. Both happen on the provisioner's own
// thread with its own xenstore connection, so the main thread (handshakes,
// HCA events) never waits for a config to appear.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "vib/platform/types.hpp"

namespace vib::backend {

struct ProvisionerSettings {
  platform::XenTarget xen;
  std::string stash_dir;  // the xl front's kept configs, by domain name
  std::string userdata_dir = "/var/lib/xen";
  // How long after its introduction a domain's saved config may appear.
  std::chrono::milliseconds userdata_wait{30000};
};

class Provisioner {
 public:
  // Looks at the domains that exist now (created while vibd was down) and
  // starts its thread. Domains already provisioned are left alone.
  explicit Provisioner(ProvisionerSettings settings);
  ~Provisioner();
  Provisioner(const Provisioner&) = delete;
  Provisioner& operator=(const Provisioner&) = delete;

  // From the main thread's watch events; they only wake the thread.
  void domains_introduced();
  void domains_released();

 private:
  void run();

  ProvisionerSettings settings_;
  std::mutex mu_;
  std::condition_variable wake_;
  bool introduced_ = true;  // the first pass looks at every domain
  bool released_ = true;    // and cleans up after those that died meanwhile
  bool stop_ = false;
  std::thread thread_;  // last: started once the rest exists
};

}  // namespace vib::backend
