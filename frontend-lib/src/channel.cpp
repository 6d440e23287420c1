#include "vib/front/channel.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <system_error>
#include <vector>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::front {

using platform::kNoTransaction;
using platform::XenbusState;

namespace {

[[noreturn]] void fail(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), "vib: " + what);
}

std::string str(XenbusState s) { return std::to_string(static_cast<int>(s)); }

// Whether `versions`, the back-end's comma-separated protocol-versions,
// lists `version`.
bool speaks(const std::string& versions, unsigned version) {
  std::size_t at = 0;
  while (at <= versions.size()) {
    const auto comma = std::min(versions.find(',', at), versions.size());
    if (platform::parse_decimal(versions.substr(at, comma - at), 0xffff) == version) return true;
    at = comma + 1;
  }
  return false;
}

using Clock = std::chrono::steady_clock;

class XenChannel final : public Channel {
 public:
  explicit XenChannel(const ChannelOptions& options)
      : options_(options), store_(platform::open_xenstore(options.xen)) {
    const auto self = store_->read(kNoTransaction, "domid");
    if (!self) fail(ENOENT, "cannot read this domain's id from xenstore");
    frontend_ = store_->domain_path(static_cast<platform::DomId>(std::stoul(*self))) + "/device/" +
                VIBIF_XS_DEVICE_TYPE + "/" + std::to_string(options.devid);
    const auto backend = store_->read(kNoTransaction, frontend_ + "/backend");
    const auto backend_id = store_->read(kNoTransaction, frontend_ + "/backend-id");
    auto be_id = backend_id ? platform::parse_decimal(*backend_id, 0x7FEF) : std::nullopt;
    if (!backend || !be_id) fail(ENODEV, "no vib device " + std::to_string(options.devid) + " in this domain");
    backend_ = *backend;
    backend_domid_ = static_cast<platform::DomId>(*be_id);
    connect_device();
    open_context();
  }

  ~XenChannel() override {
    try {
      store_->write(kNoTransaction, ctx_path_ + "/state", str(XenbusState::closing));
      // Wait (briefly) for the back-end to free our objects, then tidy up.
      wait_for(backend_ctx_ + "/state", std::chrono::milliseconds(1000),
               [](const std::optional<std::string>& v) { return !v; });
      store_->remove(kNoTransaction, ctx_path_);
    } catch (const std::exception&) {
      // Closing must not throw; the back-end also notices the ring's unmap.
    }
  }

  vibif_response call(vibif_request request) override {
    request.hdr.id = ++last_id_;
    if (RING_FULL(&ring_)) fail(EBUSY, "request ring full");
    std::memcpy(RING_GET_REQUEST(&ring_, ring_.req_prod_pvt), &request, sizeof(request));
    ring_.req_prod_pvt++;
    if (vibif_ctrl_front_push(&ring_)) events_->notify(port_);
    const auto deadline = Clock::now() + options_.timeout;
    auto next_liveness_check = Clock::now() + kLivenessInterval;
    for (;;) {
      if (vibif_ctrl_front_final_check(&ring_)) {
        vibif_response rsp;
        std::memcpy(&rsp, RING_GET_RESPONSE(&ring_, ring_.rsp_cons), sizeof(rsp));
        ring_.rsp_cons++;
        if (rsp.hdr.id != request.hdr.id) fail(EPROTO, "response to an unknown request");
        return rsp;
      }
      const auto now = Clock::now();
      if (now >= deadline) fail(ETIMEDOUT, "no response from the back-end");
      // A back-end that closed this context (device detached, domain dying,
      // context refused for abuse) will never answer: say so now rather
      // than after the whole timeout.
      if (now >= next_liveness_check) {
        if (backend_closed_context())
          fail(ENODEV, "vib device " + std::to_string(options_.devid) + ": the back-end closed this context");
        next_liveness_check = now + kLivenessInterval;
      }
      const auto wait = std::min(deadline, next_liveness_check) - now;
      pollfd p{events_->fd(), POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(wait).count()));
      while (auto port = events_->pending()) events_->unmask(*port);
    }
  }

  unsigned context_id() const override { return ctxid_; }
  bool backend_feature(const char* key) override {
    return store_->read(kNoTransaction, backend_ + "/" + key) == std::optional<std::string>("1");
  }
  platform::DomId backend_domid() const override { return backend_domid_; }
  vibif_doorbell_page& doorbell() override {
    return *reinterpret_cast<vibif_doorbell_page*>(doorbell_->bytes().data());
  }
  platform::GrantSharer& sharer() override { return *sharer_; }
  std::unique_ptr<platform::SharedPages> take_list_page() override {
    {
      std::lock_guard lock(list_pages_mutex_);
      if (!list_pages_.empty()) {
        auto page = std::move(list_pages_.back());
        list_pages_.pop_back();
        return page;
      }
    }
    return sharer_->share(backend_domid_, 1, /*writable=*/false);
  }
  void give_back_list_page(std::unique_ptr<platform::SharedPages> page) override {
    std::lock_guard lock(list_pages_mutex_);
    if (list_pages_.size() < kKeptListPages) list_pages_.push_back(std::move(page));
  }
  void kick() override { events_->notify(port_); }
  int event_fd() override { return events_->fd(); }
  void consume_notifications() override {
    while (auto port = events_->pending()) events_->unmask(*port);
  }
  bool backend_closed() override { return backend_closed_context(); }

 private:
  template <typename Done>
  std::optional<std::string> wait_for(const std::string& path, std::chrono::milliseconds timeout, Done done) {
    return platform::wait_for_node(*store_, path, done, timeout);
  }

  static constexpr std::chrono::milliseconds kLivenessInterval{100};

  bool backend_closed_context() {
    const auto state = platform::parse_state(store_->read(kNoTransaction, backend_ctx_ + "/state").value_or(""));
    return !state || *state == XenbusState::closing || *state == XenbusState::closed;
  }

  // The device-level handshake: any process may complete it, once.
  void connect_device() {
    auto be_state = wait_for(backend_ + "/state", options_.timeout, [](const std::optional<std::string>& v) {
      auto s = v ? platform::parse_state(*v) : std::nullopt;
      return s && (*s == XenbusState::init_wait || *s == XenbusState::connected || *s == XenbusState::closed ||
                   *s == XenbusState::closing);
    });
    auto s = platform::parse_state(*be_state);
    if (*s == XenbusState::closed || *s == XenbusState::closing) {
      const auto why = store_->read(kNoTransaction, backend_ + "/" VIBIF_XS_ERROR);
      fail(ENODEV, "vib device " + std::to_string(options_.devid) + " is closed by its back-end" +
                       (why ? ": " + *why : std::string()));
    }
    const auto versions = store_->read(kNoTransaction, backend_ + "/" VIBIF_XS_PROTOCOL_VERSIONS).value_or("");
    if (!speaks(versions, VIBIF_PROTOCOL_VERSION))
      fail(EPROTO, "the back-end of vib device " + std::to_string(options_.devid) + " speaks protocol versions '" +
                       versions + "'; this libvibfront speaks " + std::to_string(VIBIF_PROTOCOL_VERSION) +
                       ": install the same vib release in dom0 and the guest");
    const auto mine = platform::parse_state(store_->read(kNoTransaction, frontend_ + "/state").value_or(""));
    if (!mine || *mine != XenbusState::connected) {
      platform::with_transaction(*store_, [&](platform::TransactionId tx) {
        store_->write(tx, frontend_ + "/" VIBIF_XS_PROTOCOL_VERSION, std::to_string(VIBIF_PROTOCOL_VERSION));
        store_->write(tx, frontend_ + "/state", str(XenbusState::connected));
      });
    }
    wait_for(backend_ + "/state", options_.timeout, [](const std::optional<std::string>& v) {
      auto st = v ? platform::parse_state(*v) : std::nullopt;
      return st && *st == XenbusState::connected;
    });
  }

  // The pid names the context; an id in use (another process's, or a stale
  // node of an earlier pid) is skipped. Looking and claiming happen in one
  // transaction: two processes that open at the same moment (both
  // reopening after their back-end restarted) would otherwise both find an
  // id free and write the same context's nodes.
  void claim_context_id() {
    platform::with_transaction(*store_, [&](platform::TransactionId tx) {
      ctxid_ = static_cast<unsigned>(::getpid()) % VIBIF_MAX_CTXID;
      while (store_->read(tx, frontend_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid_) + "/state"))
        ctxid_ = (ctxid_ + 1) % VIBIF_MAX_CTXID;
      store_->write(tx, frontend_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid_) + "/state",
                    str(XenbusState::initialising));
    });
    ctx_path_ = frontend_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid_);
    backend_ctx_ = backend_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid_);
  }

  void open_context() {
    claim_context_id();
    try {
      connect_context();
    } catch (...) {
      try {
        store_->remove(kNoTransaction, ctx_path_);  // the claim goes with the attempt
      } catch (const std::exception&) {
      }
      throw;
    }
  }

  void connect_context() {
    events_ = platform::open_frontend_event_channels(options_.xen);
    port_ = events_->bind_unbound(backend_domid_);
    // If this process dies, the ring's unmap clears its alive byte, and the
    // back-end is notified: by the event channel's own device where it does
    // that (vibgrant: right after a restore, gntalloc's notification would
    // reach whatever port carries the number now), else by the unmap.
    sharer_ = platform::open_grant_sharer(options_.xen);
    platform::UnmapNotify notify{VIBIF_RING_ALIVE_OFFSET, port_};
    if (events_->notifies_peer_on_exit()) notify.port.reset();
    ring_pages_ = sharer_->share(backend_domid_, 1, true, notify);
    auto* shared = reinterpret_cast<vibif_ctrl_sring*>(ring_pages_->bytes().data());
    SHARED_RING_INIT(shared);
    ring_pages_->bytes()[VIBIF_RING_ALIVE_OFFSET] = std::byte{1};
    vibif_ctrl_front_ring_init(&ring_, shared, ring_pages_->bytes().size());
    // Shared by this process and mapped by the back-end, as the ring is: a
    // guest that mapped dom0's memory could not be saved, restored or
    // migrated with the mapping in place.
    doorbell_ = sharer_->share(backend_domid_, 1, true);
    platform::with_transaction(*store_, [&](platform::TransactionId tx) {
      store_->write(tx, ctx_path_ + "/" VIBIF_XS_RING_PAGE_ORDER, "0");
      store_->write(tx, ctx_path_ + "/" VIBIF_XS_RING_REF, std::to_string(ring_pages_->refs()[0]));
      store_->write(tx, ctx_path_ + "/" VIBIF_XS_EVENT_CHANNEL, std::to_string(port_));
      store_->write(tx, ctx_path_ + "/" VIBIF_XS_DOORBELL_REF, std::to_string(doorbell_->refs()[0]));
      store_->write(tx, ctx_path_ + "/state", str(XenbusState::initialised));
    });
    auto state = wait_for(backend_ctx_ + "/state", options_.timeout, [](const std::optional<std::string>& v) {
      auto st = v ? platform::parse_state(*v) : std::nullopt;
      return st && (*st == XenbusState::connected || *st == XenbusState::closed);
    });
    if (platform::parse_state(*state) != XenbusState::connected) {
      const auto why = store_->read(kNoTransaction, backend_ctx_ + "/" VIBIF_XS_ERROR);
      fail(ECONNREFUSED, "the back-end refused the context" + (why ? ": " + *why : std::string()));
    }
    store_->write(kNoTransaction, ctx_path_ + "/state", str(XenbusState::connected));
  }

  ChannelOptions options_;
  std::unique_ptr<platform::XenStore> store_;
  std::string frontend_, backend_, ctx_path_, backend_ctx_;
  platform::DomId backend_domid_ = 0;
  unsigned ctxid_ = 0;
  std::unique_ptr<platform::EventChannels> events_;
  platform::EventPort port_ = 0;
  std::unique_ptr<platform::GrantSharer> sharer_;
  // Enough for the page list of a 16 MiB registration (8 pages of refs)
  // or of several smaller ones at once.
  static constexpr std::size_t kKeptListPages = 8;
  std::mutex list_pages_mutex_;
  std::vector<std::unique_ptr<platform::SharedPages>> list_pages_;
  std::unique_ptr<platform::SharedPages> ring_pages_;
  vibif_ctrl_front_ring ring_{};
  std::unique_ptr<platform::SharedPages> doorbell_;
  std::uint64_t last_id_ = 0;
};

}  // namespace

std::unique_ptr<Channel> Channel::open(const ChannelOptions& options) {
  return std::make_unique<XenChannel>(options);
}

}  // namespace vib::front
