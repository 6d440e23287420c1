// Clients of the host-local hypervisor: grants and event channels for a
// process acting as one simulated domain.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>

#include "hypervisor/seqpacket.hpp"
#include "hypervisor/wire.hpp"
#include "local/local_xen.hpp"

namespace vib::platform::local {

namespace {

using wire::Op;

[[noreturn]] void fail(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), what);
}

// One connection to the domain's hypervisor socket. Calls are synchronous;
// event messages that arrive meanwhile are queued for pending().
class Channel {
 public:
  Channel(const std::string& dir, DomId self)
      : fd_(connect_seqpacket(local_hypervisor_socket(dir, self))) {}

  struct Answer {
    std::uint32_t value = 0;
    std::vector<std::uint32_t> entries;
    std::vector<UniqueFd> fds;
  };

  // Returns 0 or the errno the hypervisor answered with.
  int call(wire::Request req, std::span<const std::uint32_t> args, std::span<const int> fds,
           Answer& answer) {
    std::lock_guard lock(mutex_);
    req.count = static_cast<std::uint32_t>(args.size());
    std::vector<std::byte> msg(sizeof(req) + args.size_bytes());
    std::memcpy(msg.data(), &req, sizeof(req));
    if (!args.empty()) std::memcpy(msg.data() + sizeof(req), args.data(), args.size_bytes());
    if (!send_message(fd_.get(), msg, fds)) return EPIPE;
    std::vector<std::byte> bytes;
    for (;;) {
      if (!receive_message(fd_.get(), bytes, answer.fds, wire::kMaxMessage, wire::kMaxFdsPerMessage))
        return errno ? errno : EPIPE;
      wire::Reply reply;
      if (bytes.size() < sizeof(reply)) return EPROTO;
      std::memcpy(&reply, bytes.data(), sizeof(reply));
      if (reply.op == Op::event) {
        queue_event(reply.value);
        continue;
      }
      if (reply.op != req.op || reply.count > (bytes.size() - sizeof(reply)) / 4) return EPROTO;
      answer.value = reply.value;
      answer.entries.resize(reply.count);
      if (reply.count != 0) std::memcpy(answer.entries.data(), bytes.data() + sizeof(reply), reply.count * 4);
      return reply.status;
    }
  }

  void call_or_throw(wire::Request req, const std::string& what, Answer& answer,
                     std::span<const std::uint32_t> args = {}, std::span<const int> fds = {}) {
    if (int err = call(req, args, fds, answer)) fail(err, what);
  }

  int fd() const { return fd_.get(); }

  // Event channels only: moves arrived events into the queue, pops one.
  std::optional<EventPort> next_event() {
    std::lock_guard lock(mutex_);
    std::vector<std::byte> bytes;
    std::vector<UniqueFd> fds;
    while (receive_message(fd_.get(), bytes, fds, wire::kMaxMessage, 0, /*nonblocking=*/true)) {
      wire::Reply reply;
      if (bytes.size() >= sizeof(reply)) {
        std::memcpy(&reply, bytes.data(), sizeof(reply));
        if (reply.op == Op::event) queue_event(reply.value);
      }
    }
    if (events_.empty()) return std::nullopt;
    const EventPort port = events_.front();
    events_.pop_front();
    if (events_.empty() && queued_signal_) {
      std::uint64_t v;
      [[maybe_unused]] auto n = ::read(queued_signal_.get(), &v, sizeof(v));
    }
    return port;
  }

  // An eventfd readable while events wait in the queue (set up on demand).
  int queued_signal() {
    std::lock_guard lock(mutex_);
    if (!queued_signal_) queued_signal_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    return queued_signal_.get();
  }

 private:
  void queue_event(EventPort port) {
    events_.push_back(port);
    if (queued_signal_) {
      const std::uint64_t one = 1;
      [[maybe_unused]] auto n = ::write(queued_signal_.get(), &one, sizeof(one));
    }
  }

  UniqueFd fd_;
  std::mutex mutex_;
  std::deque<EventPort> events_;
  UniqueFd queued_signal_;
};

wire::Request request(Op op) { return wire::Request{op, 0, 0, 0, 0, 0, 0, 0}; }

void add_notify(wire::Request& req, const UnmapNotify& notify) {
  if (notify.clear_byte_offset) {
    if (*notify.clear_byte_offset >= kPageSize) fail(EINVAL, "unmap notify offset beyond the page");
    req.flags |= wire::kNotifyByte;
    req.notify_offset = static_cast<std::uint32_t>(*notify.clear_byte_offset);
  }
  if (notify.port) {
    req.flags |= wire::kNotifyPort;
    req.notify_port = *notify.port;
  }
}

class Region {
 public:
  explicit Region(std::size_t bytes) : size_(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail(errno, "reserving address space");
    base_ = static_cast<std::byte*>(p);
  }
  ~Region() { ::munmap(base_, size_); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  std::byte* base() const { return base_; }
  std::size_t size() const { return size_; }

 private:
  std::byte* base_;
  std::size_t size_;
};

class LocalMapping final : public GrantMapping {
 public:
  LocalMapping(std::shared_ptr<Channel> channel, std::size_t pages)
      : channel_(std::move(channel)), region_(pages * kPageSize) {}
  ~LocalMapping() override {
    for (auto id : ids_) {
      auto req = request(Op::unmap);
      req.id = id;
      Channel::Answer a;
      channel_->call(req, {}, {}, a);
    }
  }
  std::span<std::byte> bytes() override { return {region_.base(), region_.size()}; }

  std::shared_ptr<Channel> channel_;
  Region region_;  // unmapped after the ids are released (declaration order)
  std::vector<std::uint32_t> ids_;
};

class LocalMapper final : public GrantMapper {
 public:
  LocalMapper(const std::string& dir, DomId self) : channel_(std::make_shared<Channel>(dir, self)) {}

  std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable,
                                    const UnmapNotify& notify) override {
    if (refs.empty()) fail(EINVAL, "mapping no grant refs");
    if (refs.size() > 1 && (notify.clear_byte_offset || notify.port))
      fail(EINVAL, "unmap notify needs a single-page mapping");
    auto mapping = std::make_unique<LocalMapping>(channel_, refs.size());
    const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    for (std::size_t done = 0; done < refs.size();) {
      const auto chunk = refs.subspan(done, std::min<std::size_t>(wire::kMaxEntries, refs.size() - done));
      auto req = request(Op::map);
      req.domid = granter;
      req.flags = writable ? wire::kWritable : 0;
      if (done == 0) add_notify(req, notify);
      Channel::Answer a;
      if (int err = channel_->call(req, chunk, {}, a))
        fail(err, "mapping grants of domain " + std::to_string(granter));
      mapping->ids_.push_back(a.value);
      if (a.entries.size() != 2 * chunk.size()) fail(EPROTO, "hypervisor map reply");
      for (std::size_t i = 0; i < chunk.size(); ++i) {
        const auto file = a.entries[2 * i], page = a.entries[2 * i + 1];
        if (file >= a.fds.size()) fail(EPROTO, "hypervisor map reply");
        void* at = mapping->region_.base() + (done + i) * kPageSize;
        if (::mmap(at, kPageSize, prot, MAP_SHARED | MAP_FIXED, a.fds[file].get(),
                   static_cast<off_t>(page) * static_cast<off_t>(kPageSize)) == MAP_FAILED)
          fail(errno, "mapping a granted page");
      }
      done += chunk.size();
    }
    return mapping;
  }

 private:
  std::shared_ptr<Channel> channel_;
};

class LocalShare final : public SharedPages {
 public:
  LocalShare(std::shared_ptr<Channel> channel, std::size_t pages)
      : channel_(std::move(channel)), size_(pages * kPageSize) {}
  ~LocalShare() override {
    for (auto id : ids_) {
      auto req = request(Op::end_grant);
      req.id = id;
      Channel::Answer a;
      channel_->call(req, {}, {}, a);
    }
    if (base_) ::munmap(base_, size_);
  }
  std::span<std::byte> bytes() override { return {base_, size_}; }
  std::span<const GrantRef> refs() const override { return refs_; }
  void move_to(std::byte* address) override {
    void* moved = ::mremap(base_, size_, size_, MREMAP_MAYMOVE | MREMAP_FIXED, address);
    if (moved == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mremap of granted pages");
    base_ = static_cast<std::byte*>(moved);
  }
  void forget_mapping() override { base_ = nullptr; }

  std::shared_ptr<Channel> channel_;
  std::size_t size_;
  std::byte* base_ = nullptr;
  std::vector<GrantRef> refs_;
  std::vector<std::uint32_t> ids_;
};

class LocalSharer final : public GrantSharer {
 public:
  LocalSharer(const std::string& dir, DomId self) : channel_(std::make_shared<Channel>(dir, self)) {}

  std::unique_ptr<SharedPages> share(DomId grantee, std::size_t pages, bool writable,
                                     const UnmapNotify& notify) override {
    if (pages == 0) fail(EINVAL, "sharing no pages");
    if (pages > 1 && (notify.clear_byte_offset || notify.port))
      fail(EINVAL, "unmap notify needs a single-page share");
    UniqueFd file(::memfd_create("vib-grant", MFD_CLOEXEC));
    if (!file || ::ftruncate(file.get(), static_cast<off_t>(pages * kPageSize)) != 0)
      fail(errno, "allocating pages to grant");
    auto share = std::make_unique<LocalShare>(channel_, pages);
    void* p = ::mmap(nullptr, pages * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, file.get(), 0);
    if (p == MAP_FAILED) fail(errno, "mapping pages to grant");
    share->base_ = static_cast<std::byte*>(p);
    for (std::size_t done = 0; done < pages;) {
      const std::size_t n = std::min<std::size_t>(wire::kMaxEntries, pages - done);
      auto req = request(Op::grant);
      req.domid = grantee;
      req.flags = writable ? wire::kWritable : 0;
      req.id = static_cast<std::uint32_t>(done);
      add_notify(req, notify);
      // The count travels as entries so the service can bound it.
      std::vector<std::uint32_t> slots(n, 0);
      const int fd = file.get();
      Channel::Answer a;
      if (int err = channel_->call(req, slots, std::span(&fd, 1), a))
        fail(err, "granting pages to domain " + std::to_string(grantee));
      if (a.entries.size() != n) fail(EPROTO, "hypervisor grant reply");
      share->ids_.push_back(a.value);
      share->refs_.insert(share->refs_.end(), a.entries.begin(), a.entries.end());
      done += n;
    }
    return share;
  }

 private:
  std::shared_ptr<Channel> channel_;
};

class LocalEventChannels final : public EventChannels {
 public:
  LocalEventChannels(const std::string& dir, DomId self) : channel_(dir, self) {
    epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_) fail(errno, "epoll");
    for (int fd : {channel_.fd(), channel_.queued_signal()}) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) fail(errno, "epoll_ctl");
    }
  }

  EventPort bind_unbound(DomId remote) override {
    auto req = request(Op::alloc_unbound);
    req.domid = remote;
    Channel::Answer a;
    channel_.call_or_throw(req, "allocating an event channel for domain " + std::to_string(remote), a);
    return a.value;
  }

  EventPort bind_interdomain(DomId remote, EventPort remote_port) override {
    auto req = request(Op::bind_interdomain);
    req.domid = remote;
    req.port = remote_port;
    Channel::Answer a;
    channel_.call_or_throw(req, "binding to port " + std::to_string(remote_port) + " of domain " +
                                    std::to_string(remote), a);
    return a.value;
  }

  void unbind(EventPort port) override { simple(Op::unbind, port, "unbinding"); }
  void notify(EventPort port) override { simple(Op::notify, port, "notifying"); }
  void unmask(EventPort port) override { simple(Op::unmask, port, "unmasking"); }
  int fd() override { return epoll_.get(); }
  std::optional<EventPort> pending() override { return channel_.next_event(); }

  std::optional<bool> peer_closed(EventPort port) override {
    auto req = request(Op::peer_status);
    req.port = port;
    Channel::Answer a;
    channel_.call_or_throw(req, "port status " + std::to_string(port), a);
    return a.value != 0;
  }

 private:
  void simple(Op op, EventPort port, const char* what) {
    auto req = request(op);
    req.port = port;
    Channel::Answer a;
    channel_.call_or_throw(req, std::string(what) + " port " + std::to_string(port), a);
  }

  Channel channel_;
  UniqueFd epoll_;
};

}  // namespace

std::unique_ptr<GrantMapper> open_grant_mapper(const std::string& dir, DomId self) {
  return std::make_unique<LocalMapper>(dir, self);
}
std::unique_ptr<GrantSharer> open_grant_sharer(const std::string& dir, DomId self) {
  return std::make_unique<LocalSharer>(dir, self);
}
std::unique_ptr<EventChannels> open_event_channels(const std::string& dir, DomId self) {
  return std::make_unique<LocalEventChannels>(dir, self);
}

}  // namespace vib::platform::local
