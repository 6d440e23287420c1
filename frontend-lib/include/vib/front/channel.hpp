// libvibfront: the guest side of a vib device. A Channel is one process's
// context on one device: its own request ring, event channel and doorbell
// page, negotiated through xenstore (see vibif.h, PER-PROCESS CONTEXTS).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "vib/platform/grants.hpp"
#include "vib/platform/types.hpp"
#include "vib/vibif.h"

namespace vib::front {

struct ChannelOptions {
  platform::XenTarget xen = platform::XenTarget::real();
  unsigned devid = 0;
  std::chrono::milliseconds timeout{5000};
};

class Channel {
 public:
  // Connects the device (if no process did yet) and opens this process's
  // context. Throws std::system_error naming what failed (no such device,
  // back-end error text, timeout).
  static std::unique_ptr<Channel> open(const ChannelOptions& options);
  virtual ~Channel() = default;  // closes the context; the back-end frees its objects

  // Sends one control request and waits for its response (hdr.id is set here).
  virtual vibif_response call(vibif_request request) = 0;
  virtual unsigned context_id() const = 0;
  // True when the back-end announced feature `key` ("feature-*" = "1").
  virtual bool backend_feature(const char* key) = 0;
  virtual platform::DomId backend_domid() const = 0;

  // The fast path's shared state (vibif.h, FAST PATH).
  virtual vibif_doorbell_page& doorbell() = 0;
  // Grants pages to the back-end (queue buffers, registered memory).
  virtual platform::GrantSharer& sharer() = 0;
  // A page granted read-only to the back-end to carry one request's page
  // list (vibif.h, vibif_page_list), the caller's until it gives it back
  // once the request has been answered. Given-back pages stay granted for
  // the next request, as blkfront keeps its persistent grants: a list page
  // costs no allocation, grant or end per registration.
  virtual std::unique_ptr<platform::SharedPages> take_list_page() = 0;
  virtual void give_back_list_page(std::unique_ptr<platform::SharedPages> page) = 0;
  // Notifies the back-end (after posting, when it is not polling).
  virtual void kick() = 0;
  // Pollable (POLLIN) when the back-end notified this context; consume()
  // clears it.
  virtual int event_fd() = 0;
  virtual void consume_notifications() = 0;
  // True once the back-end closed this context or is gone (detached device,
  // a vibd that stopped, or one that restarted and closed what it could not
  // know). One xenstore read; not concurrently with call().
  virtual bool backend_closed() = 0;
};

}  // namespace vib::front
