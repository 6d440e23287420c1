// A guest process that speaks the protocol by hand (vibif.h), so it can do
// what libvibfront never would: keep the ring full, lie in its xenstore
// nodes, close while requests are in flight.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/types.hpp"
#include "vib/platform/xenstore.hpp"
#include "vib/vibif.h"

namespace vib::test {

class RawGuest {
 public:
  // Opens context `ctxid` of device 0 of `domid` (served by dom0): shares a
  // one-page ring, binds an event channel, writes the nodes and waits for
  // the back-end's answer. Throws std::runtime_error if refused.
  RawGuest(const platform::XenTarget& xen, platform::DomId domid, unsigned ctxid);
  ~RawGuest();

  vibif_ctrl_sring& sring() { return *reinterpret_cast<vibif_ctrl_sring*>(ring_->bytes().data()); }
  // Entries in the one-page ring.
  unsigned ring_size() const { return RING_SIZE(&ring_view_); }
  void kick() { events_->notify(port_); }
  // One request as the protocol says (next slot, producer, kick); the
  // response, or nullopt if none came within `timeout`.
  std::optional<vibif_response> call(const vibif_request& req,
                                     std::chrono::milliseconds timeout = std::chrono::seconds(5));
  // Whether vibd still has this context open (its back-end state node).
  bool open_at_backend();
  // Writes ctx/<id>/state (the guest's own node).
  void set_state(unsigned state);
  const std::string& frontend_ctx() const { return fe_ctx_; }
  // Pages this process grants (to dom0 for queues and registrations, or to
  // anyone it likes).
  platform::GrantSharer& sharer() { return *sharer_; }
  vibif_doorbell_page& doorbell() { return *reinterpret_cast<vibif_doorbell_page*>(doorbell_->bytes().data()); }
  platform::XenStore& store() { return *store_; }

 private:
  std::unique_ptr<platform::XenStore> store_;
  std::string fe_ctx_, be_ctx_;
  std::unique_ptr<platform::EventChannels> events_;
  platform::EventPort port_ = 0;
  std::unique_ptr<platform::GrantSharer> sharer_;
  std::unique_ptr<platform::SharedPages> ring_;
  std::unique_ptr<platform::SharedPages> doorbell_;
  vibif_ctrl_front_ring ring_view_{};
};

}  // namespace vib::test
