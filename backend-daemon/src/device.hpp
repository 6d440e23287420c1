// One vib device of one guest, and the per-process contexts opened on it.
#pragma once

#include <map>
#include <optional>
#include <variant>
#include <memory>
#include <string>
#include <vector>

#include "control.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"
#include "vib/vibif.h"

namespace vib::backend {

// What the daemon gives every device: the Xen it runs on and its HCAs.
class DeviceEnvironment {
 public:
  virtual ~DeviceEnvironment() = default;
  virtual platform::XenStore& store() = 0;
  virtual platform::GrantMapper& mapper() = 0;
  virtual platform::GrantSharer& sharer() = 0;
  virtual std::unique_ptr<platform::EventChannels> open_event_channels() = 0;
  // Shared by the devices using it; throws std::system_error if absent.
  virtual platform::Hca& hca(const std::string& name) = 0;
  virtual const std::string& default_hca() const = 0;
};

// Reads and checks the configuration; on a bad value, returns the reason.
std::variant<DeviceConfig, std::string> read_device_config(platform::XenStore& store,
                                                           const std::string& backend_path,
                                                           const std::string& default_hca);

struct DeviceId {
  platform::DomId domid;
  unsigned devid;
  auto operator<=>(const DeviceId&) const = default;
};

class Context;

class Device {
 public:
  Device(DeviceEnvironment& env, DeviceId id, std::string backend_path);
  ~Device();

  // Advances the handshake from what xenstore says now. Returns false once
  // the device is gone (its back-end directory removed) and may be dropped.
  bool refresh();
  // The frontend's domain died: free everything at once.
  void domain_gone();

  std::vector<Context*> contexts();
  void close_context(unsigned ctxid, const char* why);
  const std::string& frontend_path() const { return frontend_path_; }
  DeviceId id() const { return id_; }

 private:
  void fail(const std::string& why);
  void set_state(platform::XenbusState s);
  void refresh_contexts();
  void close_all_contexts(const char* why);

  DeviceEnvironment& env_;
  DeviceId id_;
  std::string backend_path_;
  std::string frontend_path_;
  std::string subject_;
  platform::XenbusState state_ = platform::XenbusState::initialising;
  bool failed_ = false;
  std::optional<DeviceConfig> config_;
  platform::Hca* hca_ = nullptr;
  std::map<unsigned, std::unique_ptr<Context>> contexts_;
};

// One guest process's channel: its ring, event channel, doorbell page and
// every verbs object it created, all freed with it.
class Context {
 public:
  Context(DeviceEnvironment& env, const DeviceConfig& config, platform::Hca& hca, DeviceId device,
          unsigned ctxid, const std::string& frontend_ctx, const std::string& backend_ctx);
  ~Context();

  int event_fd() { return events_->fd(); }
  // Serves whatever the guest queued. Returns false when the guest process
  // has gone (its event channel's peer closed).
  bool service();
  unsigned id() const { return ctxid_; }

 private:
  unsigned ctxid_;
  std::string subject_;
  std::unique_ptr<platform::EventChannels> events_;
  platform::EventPort port_ = 0;
  std::unique_ptr<platform::GrantMapping> ring_pages_;
  vibif_ctrl_back_ring ring_{};
  std::unique_ptr<platform::SharedPages> doorbell_;
  std::unique_ptr<GuestMemory> memory_;  // before control_, which uses it
  ControlPath control_;
  std::uint64_t requests_ = 0;
};

}  // namespace vib::backend
