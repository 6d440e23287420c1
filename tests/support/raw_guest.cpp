#include "raw_guest.hpp"

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "vib/platform/xenbus.hpp"
#include "vibd_process.hpp"

namespace vib::test {

using platform::kNoTransaction;

RawGuest::RawGuest(const platform::XenTarget& xen, platform::DomId domid, unsigned ctxid)
    : store_(platform::open_xenstore(xen)),
      fe_ctx_(frontend_path(domid) + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid)),
      be_ctx_(backend_path(domid) + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid)) {
  events_ = platform::open_event_channels(xen);
  port_ = events_->bind_unbound(platform::kDom0);
  sharer_ = platform::open_grant_sharer(xen);
  ring_ = sharer_->share(platform::kDom0, 1, true, platform::UnmapNotify{VIBIF_RING_ALIVE_OFFSET, port_});
  SHARED_RING_INIT(&sring());
  ring_->bytes()[VIBIF_RING_ALIVE_OFFSET] = std::byte{1};
  vibif_ctrl_front_ring_init(&ring_view_, &sring(), ring_->bytes().size());
  doorbell_ = sharer_->share(platform::kDom0, 1, true);
  platform::with_transaction(*store_, [&](platform::TransactionId tx) {
    store_->write(tx, fe_ctx_ + "/" VIBIF_XS_RING_PAGE_ORDER, "0");
    store_->write(tx, fe_ctx_ + "/" VIBIF_XS_RING_REF, std::to_string(ring_->refs()[0]));
    store_->write(tx, fe_ctx_ + "/" VIBIF_XS_EVENT_CHANNEL, std::to_string(port_));
    store_->write(tx, fe_ctx_ + "/" VIBIF_XS_DOORBELL_REF, std::to_string(doorbell_->refs()[0]));
    store_->write(tx, fe_ctx_ + "/state", "3");
  });
  const auto state = platform::wait_for_node(
      *store_, be_ctx_ + "/state", [](const std::optional<std::string>& v) { return v == "4" || v == "6"; },
      std::chrono::seconds(10));
  if (state != "4") throw std::runtime_error("context " + std::to_string(ctxid) + " refused");
}

RawGuest::~RawGuest() {
  try {
    store_->remove(kNoTransaction, fe_ctx_);
  } catch (const std::exception&) {
  }
}

std::optional<vibif_response> RawGuest::call(const vibif_request& req, std::chrono::milliseconds timeout) {
  std::memcpy(RING_GET_REQUEST(&ring_view_, ring_view_.req_prod_pvt), &req, sizeof(req));
  ring_view_.req_prod_pvt++;
  if (vibif_ctrl_front_push(&ring_view_)) kick();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (vibif_ctrl_front_final_check(&ring_view_)) {
      vibif_response rsp;
      std::memcpy(&rsp, RING_GET_RESPONSE(&ring_view_, ring_view_.rsp_cons), sizeof(rsp));
      ring_view_.rsp_cons++;
      return rsp;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return std::nullopt;
}

bool RawGuest::open_at_backend() { return store_->read(kNoTransaction, be_ctx_ + "/state") == "4"; }

void RawGuest::set_state(unsigned state) { store_->write(kNoTransaction, fe_ctx_ + "/state", std::to_string(state)); }

}  // namespace vib::test
