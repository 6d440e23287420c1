// Clients of the host-local hypervisor: grants and event channels for a
// process acting as one simulated domain.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
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

wire::Request request(Op op) { return wire::Request{op, 0, 0, 0, 0, 0, 0, 0}; }

// One connection to the domain's hypervisor socket. Calls are synchronous;
// messages the service sends unasked (wire::Op::bound, peer_closed) that
// arrive meanwhile are queued for next_notice().
class Channel {
 public:
  Channel(const std::string& dir, DomId self)
      : fd_(connect_seqpacket(local_hypervisor_socket(dir, self))) {}

  struct Answer {
    std::uint32_t value = 0;
    std::vector<std::uint32_t> entries;
    std::vector<UniqueFd> fds;
  };

  // Something the service said unasked.
  struct Notice {
    Op what;
    EventPort port;
    UniqueFd fd;
  };

  // Returns 0 or the errno the hypervisor answered with.
  int call(wire::Request req, std::span<const std::uint32_t> args, std::span<const int> fds,
           Answer& answer) {
    std::lock_guard lock(mutex_);
    if (!send_locked(req, args, fds)) return EPIPE;
    std::vector<std::byte> bytes;
    for (;;) {
      answer.fds.clear();
      if (!receive_message(fd_.get(), bytes, answer.fds, wire::kMaxMessage, wire::kMaxFdsPerMessage))
        return errno ? errno : EPIPE;
      wire::Reply reply;
      if (bytes.size() < sizeof(reply)) return EPROTO;
      std::memcpy(&reply, bytes.data(), sizeof(reply));
      if (queue_notice(reply, answer.fds)) continue;
      if (reply.op != req.op || reply.count > (bytes.size() - sizeof(reply)) / 4) return EPROTO;
      answer.value = reply.value;
      answer.entries.resize(reply.count);
      if (reply.count != 0) std::memcpy(answer.entries.data(), bytes.data() + sizeof(reply), reply.count * 4);
      return reply.status;
    }
  }

  // Ending a mapping (by its id) or shares (by their first refs). Without
  // an unmap notification nothing can come of it to wait for: one message
  // the service does not answer (wire::kNoReply). With one, the answer is
  // waited for, so that nothing this process asks afterwards on another
  // connection (unbinding the port it notifies) overtakes its firing.
  void end_mapping(std::uint32_t id, bool notifies) {
    auto req = request(Op::unmap);
    req.id = id;
    end(req, {}, notifies);
  }
  void end_grants(std::span<const std::uint32_t> firsts, bool notifies) { end(request(Op::end_grant), firsts, notifies); }

  // A message the service never answers; false when it could not be sent.
  bool post(wire::Request req, std::span<const std::uint32_t> args, std::span<const int> fds = {}) {
    std::lock_guard lock(mutex_);
    return send_locked(req, args, fds);
  }

  void call_or_throw(wire::Request req, const std::string& what, Answer& answer,
                     std::span<const std::uint32_t> args = {}, std::span<const int> fds = {}) {
    if (int err = call(req, args, fds, answer)) fail(err, what);
  }

  int fd() const { return fd_.get(); }

  // Moves arrived notices into the queue, pops one.
  std::optional<Notice> next_notice() {
    std::lock_guard lock(mutex_);
    std::vector<std::byte> bytes;
    std::vector<UniqueFd> fds;
    while (receive_message(fd_.get(), bytes, fds, wire::kMaxMessage, 1, /*nonblocking=*/true)) {
      wire::Reply reply;
      if (bytes.size() >= sizeof(reply)) {
        std::memcpy(&reply, bytes.data(), sizeof(reply));
        queue_notice(reply, fds);
      }
    }
    if (notices_.empty()) return std::nullopt;
    Notice notice = std::move(notices_.front());
    notices_.pop_front();
    if (notices_.empty() && queued_signal_) {
      std::uint64_t v;
      [[maybe_unused]] auto n = ::read(queued_signal_.get(), &v, sizeof(v));
    }
    return notice;
  }

  // An eventfd readable while notices wait in the queue (set up on demand).
  int queued_signal() {
    std::lock_guard lock(mutex_);
    if (!queued_signal_) queued_signal_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    return queued_signal_.get();
  }

 private:
  bool queue_notice(const wire::Reply& reply, std::vector<UniqueFd>& fds) {
    if (reply.op != Op::bound && reply.op != Op::peer_closed) return false;
    Notice n{reply.op, reply.value, {}};
    if (reply.op == Op::bound && !fds.empty()) n.fd = std::move(fds.front());
    fds.clear();
    notices_.push_back(std::move(n));
    if (queued_signal_) {
      const std::uint64_t one = 1;
      [[maybe_unused]] auto w = ::write(queued_signal_.get(), &one, sizeof(one));
    }
    return true;
  }

  bool send_locked(wire::Request req, std::span<const std::uint32_t> args, std::span<const int> fds) {
    req.count = static_cast<std::uint32_t>(args.size());
    std::vector<std::byte> msg(sizeof(req) + args.size_bytes());
    std::memcpy(msg.data(), &req, sizeof(req));
    if (!args.empty()) std::memcpy(msg.data() + sizeof(req), args.data(), args.size_bytes());
    return send_message(fd_.get(), msg, fds);
  }

  void end(wire::Request req, std::span<const std::uint32_t> args, bool notifies) {
    if (notifies) {
      Answer ignored;
      call(req, args, {}, ignored);
      return;
    }
    req.flags |= wire::kNoReply;
    post(req, args);
  }

  UniqueFd fd_;
  std::mutex mutex_;
  std::deque<Notice> notices_;
  UniqueFd queued_signal_;
};

bool has_notification(const UnmapNotify& notify) { return notify.clear_byte_offset || notify.port; }

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

// Mappings the hypervisor counts as held by us (its mapping ids), released
// on destruction.
struct HeldMappings {
  explicit HeldMappings(std::shared_ptr<Channel> c) : channel(std::move(c)) {}
  ~HeldMappings() {
    for (auto id : ids) channel->end_mapping(id, notifies);
  }
  HeldMappings(const HeldMappings&) = delete;
  HeldMappings& operator=(const HeldMappings&) = delete;
  std::shared_ptr<Channel> channel;
  std::vector<std::uint32_t> ids;
  bool notifies = false;  // one of them has an unmap notification (Channel::end_mapping)
};

class LocalMapping final : public GrantMapping {
 public:
  LocalMapping(std::shared_ptr<Channel> channel, std::size_t pages)
      : region_(pages * kPageSize), held_(std::move(channel)) {}
  std::span<std::byte> bytes() override { return {region_.base(), region_.size()}; }

  Region region_;  // unmapped after the ids are released (declaration order)
  HeldMappings held_;
};

class LocalMapper final : public GrantMapper {
 public:
  LocalMapper(const std::string& dir, DomId self) : channel_(std::make_shared<Channel>(dir, self)) {}

  std::unique_ptr<GrantMapping> map(DomId granter, std::span<const GrantRef> refs, bool writable,
                                    const UnmapNotify& notify) override {
    auto mapping = std::make_unique<LocalMapping>(channel_, refs.size());
    mapping->held_.notifies = has_notification(notify);
    const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    look_up(granter, refs, writable, notify, mapping->held_.ids, [&](std::size_t i, const Page& page) {
      if (page.file < 0) fail(EFAULT, "a page granted in place by domain " + std::to_string(granter) + " cannot be mapped");
      if (::mmap(mapping->region_.base() + i * kPageSize, kPageSize, prot, MAP_SHARED | MAP_FIXED, page.file,
                 static_cast<off_t>(page.offset)) == MAP_FAILED)
        fail(errno, "mapping a granted page");
    });
    return mapping;
  }

  // Pages shared from page files are mapped; pages granted in place (all of
  // them one process's) are reached by cross-memory access to that process.
  std::unique_ptr<MemoryAccess> access(DomId granter, std::span<const GrantRef> refs, bool writable) override {
    auto held = std::make_shared<HeldMappings>(channel_);
    std::vector<ProcessMemory::Piece> pieces;
    pid_t process = 0;
    bool mappable = false;
    look_up(granter, refs, writable, {}, held->ids, [&](std::size_t, const Page& page) {
      if (page.file >= 0) {
        mappable = true;
        return;
      }
      if (process != 0 && page.process != process)
        fail(EFAULT, "grants of more than one process of domain " + std::to_string(granter));
      process = page.process;
      pieces.push_back({page.offset, kPageSize});
    });
    if (pieces.empty()) {
      held.reset();
      return GrantMapper::access(granter, refs, writable);
    }
    if (mappable) fail(EFAULT, "grants in place mixed with shared pages of domain " + std::to_string(granter));
    return holding(std::make_unique<ProcessMemory>(process, pieces), std::move(held));
  }

 private:
  // One granted page as the hypervisor describes it: a page of a file, or
  // (file < 0) a page of `process` at address `offset`.
  struct Page {
    int file;
    std::uint64_t offset;
    pid_t process;
  };

  // Looks `refs` up (all or nothing), recording the hypervisor's mapping ids
  // in `ids`, and calls each(index, page) for every ref in order.
  template <typename Each>
  void look_up(DomId granter, std::span<const GrantRef> refs, bool writable, const UnmapNotify& notify,
               std::vector<std::uint32_t>& ids, Each each) {
    if (refs.empty()) fail(EINVAL, "mapping no grant refs");
    if (refs.size() > 1 && has_notification(notify))
      fail(EINVAL, "unmap notify needs a single-page mapping");
    for (std::size_t done = 0; done < refs.size();) {
      const auto chunk = refs.subspan(done, std::min<std::size_t>(wire::kMaxEntries, refs.size() - done));
      auto req = request(Op::map);
      req.domid = granter;
      req.flags = writable ? wire::kWritable : 0;
      if (done == 0) add_notify(req, notify);
      Channel::Answer a;
      if (int err = channel_->call(req, chunk, {}, a))
        fail(err, "mapping grants of domain " + std::to_string(granter));
      ids.push_back(a.value);
      if (a.entries.size() != wire::kMapReplyEntriesPerRef * chunk.size()) fail(EPROTO, "hypervisor map reply");
      for (std::size_t i = 0; i < chunk.size(); ++i) {
        const std::uint32_t* e = a.entries.data() + wire::kMapReplyEntriesPerRef * i;
        if (e[0] == wire::kProcessPage) {
          each(done + i, Page{-1, e[1] | (std::uint64_t{e[2]} << 32), static_cast<pid_t>(e[3])});
          continue;
        }
        if (e[0] >= a.fds.size()) fail(EPROTO, "hypervisor map reply");
        each(done + i, Page{a.fds[e[0]].get(), std::uint64_t{e[1]} * kPageSize, 0});
      }
      done += chunk.size();
    }
  }

  std::shared_ptr<Channel> channel_;
};

// From /proc/self/maps: its cost is the kernel writing out every mapping
// (about 80 us for 140 of them on this project's machines), whatever the
// range's size.
int check_mapped_in_maps(std::uintptr_t start, std::size_t bytes, bool writable) {
  std::FILE* maps = std::fopen("/proc/self/maps", "re");
  if (!maps) return errno;
  std::uintptr_t covered = start;
  const std::uintptr_t end = start + bytes;
  unsigned long lo, hi;
  char perms[5];
  while (covered < end && std::fscanf(maps, "%lx-%lx %4s%*[^\n]", &lo, &hi, perms) == 3) {
    if (hi <= covered) continue;
    if (lo > covered) break;  // a hole
    if (perms[0] != 'r') break;
    if (writable && perms[1] != 'w') break;
    covered = hi;
  }
  std::fclose(maps);
  return covered >= end ? 0 : EFAULT;
}

// Whether this kernel has MADV_POPULATE_READ/WRITE (Linux 5.14): asked once,
// of a page that is surely mapped and readable.
bool kernel_populates() {
  static const bool populates = [] {
    alignas(4096) static const char probe[4096] = {1};
    return ::madvise(const_cast<char*>(probe), sizeof(probe), MADV_POPULATE_READ) == 0;
  }();
  return populates;
}

// Up to this size the range is checked by faulting its pages in, as pinning
// does (about 2 us a page-table walk plus 0.05 us per KiB): cheaper than the
// maps file up to about 1 MiB.
constexpr std::size_t kPopulateCheckLimit = std::size_t{1} << 20;

// 0 when [start, start + bytes) is all mapped in this process (readable,
// and writable if asked), else EFAULT, as pinning the pages reports.
int check_mapped(std::uintptr_t start, std::size_t bytes, bool writable) {
  if (bytes > kPopulateCheckLimit || !kernel_populates()) return check_mapped_in_maps(start, bytes, writable);
  // For write if the grantee may write (breaking copy-on-write, as pinning
  // for write does). An unmapped page fails with ENOMEM, one the process
  // may not read or write with EINVAL or EFAULT: all EFAULT to the caller.
  int rc;
  do {
    rc = ::madvise(reinterpret_cast<void*>(start), bytes, writable ? MADV_POPULATE_WRITE : MADV_POPULATE_READ);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : EFAULT;
}

// Entries of this domain's grant table that the connection reserved
// (wire::Op::reserve_refs) and is not using. A share or a range in place
// takes its refs here and gives them back when it ends, so most grants
// cost no round trip. Beyond kKeptFree they go back to the table: one past
// large registration does not keep entries from the domain's other
// processes.
class RefPool {
 public:
  explicit RefPool(std::shared_ptr<Channel> channel) : channel_(std::move(channel)) {}

  // `n` refs, in `out`; 0 or the errno of reserving more.
  int take(std::size_t n, std::vector<GrantRef>& out) {
    if (n > wire::kMaxGrantsPerDomain) return ENOSPC;  // more than any table holds
    std::lock_guard lock(mu_);
    if (free_.size() < n) {
      const std::size_t short_by = n - free_.size();
      int err = reserve(std::max(short_by, kReserveChunk));
      if (err == ENOSPC && short_by < kReserveChunk) err = reserve(short_by);
      if (err) return err;
    }
    out.assign(free_.end() - static_cast<std::ptrdiff_t>(n), free_.end());
    free_.resize(free_.size() - n);
    return 0;
  }

  void give_back(std::span<const GrantRef> refs) {
    std::lock_guard lock(mu_);
    const std::size_t kept = std::min(refs.size(), kKeptFree - std::min(kKeptFree, free_.size()));
    free_.insert(free_.end(), refs.begin(), refs.begin() + static_cast<std::ptrdiff_t>(kept));
    release(refs.subspan(kept));
  }

  ~RefPool() {
    std::lock_guard lock(mu_);
    release(free_);
  }
  RefPool(const RefPool&) = delete;
  RefPool& operator=(const RefPool&) = delete;

 private:
  static constexpr std::size_t kReserveChunk = 64;
  static constexpr std::size_t kKeptFree = 512;

  int reserve(std::size_t count) {
    auto req = request(Op::reserve_refs);
    req.id = static_cast<std::uint32_t>(count);  // at most kMaxGrantsPerDomain (take)
    Channel::Answer a;
    if (int err = channel_->call(req, {}, {}, a)) return err;
    // In order: a take() from the back gets consecutive refs, which go
    // back to the table as one run.
    for (std::uint32_t i = 0; i < req.id; ++i) free_.push_back(a.value + i);
    return 0;
  }

  // Posts `refs` back to the table as runs of consecutive refs.
  void release(std::span<const GrantRef> refs) {
    std::vector<std::uint32_t> runs;
    auto flush = [&] {
      if (runs.empty()) return;
      channel_->post(request(Op::release_refs), runs);
      runs.clear();
    };
    for (std::size_t i = 0; i < refs.size();) {
      std::size_t j = i + 1;
      while (j < refs.size() && refs[j] == refs[j - 1] + 1) ++j;
      runs.push_back(refs[i]);
      runs.push_back(static_cast<std::uint32_t>(j - i));
      if (runs.size() == wire::kMaxEntries) flush();
      i = j;
    }
    flush();
  }

  std::mutex mu_;
  std::vector<GrantRef> free_;
  std::shared_ptr<Channel> channel_;
};

// Grants of this connection, each message's a share the hypervisor knows
// by its first ref: ended on destruction, their refs back to the pool.
struct HeldGrants {
  HeldGrants(std::shared_ptr<Channel> c, std::shared_ptr<RefPool> p) : channel(std::move(c)), pool(std::move(p)) {}
  ~HeldGrants() {
    for (std::size_t i = 0; i < firsts.size(); i += wire::kMaxEntries)
      channel->end_grants(std::span(firsts).subspan(i, std::min<std::size_t>(wire::kMaxEntries, firsts.size() - i)),
                          notifies);
    pool->give_back(refs);
  }
  HeldGrants(const HeldGrants&) = delete;
  HeldGrants& operator=(const HeldGrants&) = delete;

  std::shared_ptr<Channel> channel;
  std::shared_ptr<RefPool> pool;
  std::vector<GrantRef> refs;    // from the pool
  std::vector<GrantRef> firsts;  // of the shares posted
  bool notifies = false;         // one of them has an unmap notification (Channel::end_grants)
};

class LocalShare final : public SharedPages {
 public:
  LocalShare(std::shared_ptr<Channel> channel, std::shared_ptr<RefPool> pool, std::size_t pages)
      : held_(std::move(channel), std::move(pool)), size_(pages * kPageSize) {}
  ~LocalShare() override {
    if (base_) ::munmap(base_, size_);
  }
  std::span<std::byte> bytes() override { return {base_, size_}; }
  std::span<const GrantRef> refs() const override { return held_.refs; }

  HeldGrants held_;  // grants end before the pages are unmapped
  std::size_t size_;
  std::byte* base_ = nullptr;
};

class LocalRange final : public GrantedRange {
 public:
  LocalRange(std::shared_ptr<Channel> channel, std::shared_ptr<RefPool> pool)
      : held_(std::move(channel), std::move(pool)) {}
  std::span<const GrantRef> refs() const override { return held_.refs; }

  HeldGrants held_;
};

class LocalSharer final : public GrantSharer {
 public:
  LocalSharer(const std::string& dir, DomId self)
      : channel_(std::make_shared<Channel>(dir, self)), pool_(std::make_shared<RefPool>(channel_)) {}

  // Grants are posted, not called: they are in the table before anything
  // the caller sends next can make the grantee map them (the service
  // settles a map's granter first).

  std::unique_ptr<SharedPages> share(DomId grantee, std::size_t pages, bool writable,
                                     const UnmapNotify& notify) override {
    if (pages == 0) fail(EINVAL, "sharing no pages");
    if (pages > 1 && has_notification(notify))
      fail(EINVAL, "unmap notify needs a single-page share");
    UniqueFd file(::memfd_create("vib-grant", MFD_CLOEXEC));
    if (!file || ::ftruncate(file.get(), static_cast<off_t>(pages * kPageSize)) != 0)
      fail(errno, "allocating pages to grant");
    auto share = std::make_unique<LocalShare>(channel_, pool_, pages);
    auto& held = share->held_;
    held.notifies = has_notification(notify);
    void* p = ::mmap(nullptr, pages * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, file.get(), 0);
    if (p == MAP_FAILED) fail(errno, "mapping pages to grant");
    share->base_ = static_cast<std::byte*>(p);
    take(held, pages, "granting " + std::to_string(pages) + " pages to domain " + std::to_string(grantee));
    const int fd = file.get();
    for (std::size_t done = 0; done < pages;) {
      const std::size_t n = std::min<std::size_t>(wire::kMaxEntries, pages - done);
      auto req = request(Op::grant);
      req.domid = grantee;
      req.flags = writable ? wire::kWritable : 0;
      req.id = static_cast<std::uint32_t>(done);  // the file's page the message starts at
      add_notify(req, notify);
      if (!channel_->post(req, std::span(held.refs).subspan(done, n), std::span(&fd, 1)))
        fail(EPIPE, "granting pages to domain " + std::to_string(grantee));
      held.firsts.push_back(held.refs[done]);
      done += n;
    }
    return share;
  }

  std::optional<GrantTableUse> table_use() override {
    Channel::Answer a;
    if (channel_->call(request(Op::query_size), {}, {}, a) != 0 || a.entries.size() != 1) return std::nullopt;
    return GrantTableUse{a.value, a.entries[0]};
  }

  std::unique_ptr<GrantedRange> grant_range(DomId grantee, std::byte* start, std::size_t pages,
                                            bool writable) override {
    const auto first = reinterpret_cast<std::uintptr_t>(start);
    if (pages == 0 || first % kPageSize != 0) fail(EINVAL, "granting " + std::to_string(pages) + " pages in place");
    // As pinning does on real Xen: memory not mapped (or not writable when
    // the grantee may write) is refused now, not at first use.
    if (int err = check_mapped(first, pages * kPageSize, writable))
      fail(err, "granting memory at " + std::to_string(first) + " not mapped" + (writable ? " writable" : ""));
    auto range = std::make_unique<LocalRange>(channel_, pool_);
    auto& held = range->held_;
    take(held, pages, "granting " + std::to_string(pages) + " pages in place to domain " + std::to_string(grantee));
    constexpr std::size_t kPagesPerMessage = wire::kMaxEntries / wire::kGrantRangeEntriesPerPage;
    std::vector<std::uint32_t> entries;
    for (std::size_t done = 0; done < pages;) {
      const std::size_t n = std::min(kPagesPerMessage, pages - done);
      auto req = request(Op::grant_range);
      req.domid = grantee;
      req.flags = writable ? wire::kWritable : 0;
      entries.clear();
      for (std::size_t i = done; i < done + n; ++i) {
        const std::uint64_t a = first + i * kPageSize;
        entries.insert(entries.end(), {held.refs[i], static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(a >> 32)});
      }
      if (!channel_->post(req, entries)) fail(EPIPE, "granting pages in place to domain " + std::to_string(grantee));
      held.firsts.push_back(held.refs[done]);
      done += n;
    }
    return range;
  }

 private:
  // `pages` refs from the pool for `held`; a full table is explained.
  void take(HeldGrants& held, std::size_t pages, std::string what) {
    const int err = pool_->take(pages, held.refs);
    if (err == 0) return;
    if (err == ENOSPC) {
      const auto use = table_use();
      what += ": " + (use ? grant_table_full(pages, use->size, std::to_string(use->held_by_vib) + " in use by this domain")
                          : grant_table_full(pages, 0, {}));
    }
    fail(err, what);
  }

  std::shared_ptr<Channel> channel_;
  std::shared_ptr<RefPool> pool_;
};

// Event channels with Xen's semantics, where a notify is one write(2) to the
// peer port's signal eventfd (wire.hpp) and masking is kept here: a raised
// port's eventfd leaves the epoll set (EPOLLONESHOT) until unmask() puts it
// back, and raises meanwhile add up in its count, seen once on unmask.
class LocalEventChannels final : public EventChannels {
 public:
  LocalEventChannels(const std::string& dir, DomId self)
      : channel_(dir, self), ready_signal_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_ || !ready_signal_) fail(errno, "epoll");
    for (int fd : {channel_.fd(), channel_.queued_signal(), ready_signal_.get()}) watch(fd, EPOLLIN, kNotAPort);
  }

  EventPort bind_unbound(DomId remote) override {
    auto req = request(Op::alloc_unbound);
    req.domid = remote;
    Channel::Answer a;
    channel_.call_or_throw(req, "allocating an event channel for domain " + std::to_string(remote), a);
    if (a.fds.size() != 1) fail(EPROTO, "hypervisor alloc_unbound reply");
    add_port(a.value, std::move(a.fds[0]), {});
    return a.value;
  }

  EventPort bind_interdomain(DomId remote, EventPort remote_port) override {
    auto req = request(Op::bind_interdomain);
    req.domid = remote;
    req.port = remote_port;
    Channel::Answer a;
    channel_.call_or_throw(req, "binding to port " + std::to_string(remote_port) + " of domain " +
                                    std::to_string(remote), a);
    if (a.fds.size() != 2) fail(EPROTO, "hypervisor bind_interdomain reply");
    add_port(a.value, std::move(a.fds[0]), std::move(a.fds[1]));
    return a.value;
  }

  void unbind(EventPort port) override {
    simple(Op::unbind, port, "unbinding");
    std::lock_guard lock(mu_);
    if (auto it = ports_.find(port); it != ports_.end()) {
      ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, it->second.signal.get(), nullptr);
      ports_.erase(it);
    }
    std::erase(ready_, port);
  }

  void notify(EventPort port) override {
    {
      std::lock_guard lock(mu_);
      auto it = ports_.find(port);
      if (it != ports_.end() && !it->second.peer) {
        take_notices();
        it = ports_.find(port);
      }
      if (it != ports_.end() && it->second.peer) {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(it->second.peer.get(), &one, sizeof one);
        return;
      }
    }
    // Not bound yet (Xen drops that notify), or not ours: the service decides.
    simple(Op::notify, port, "notifying");
  }

  void unmask(EventPort port) override {
    std::lock_guard lock(mu_);
    auto it = ports_.find(port);
    if (it == ports_.end()) fail(ENOENT, "unmasking port " + std::to_string(port));
    if (!it->second.masked) return;
    it->second.masked = false;
    // Back in the set: a count that built up while masked raises it at once.
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u64 = port;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, it->second.signal.get(), &ev) != 0) fail(errno, "epoll_ctl");
  }

  int fd() override { return epoll_.get(); }

  std::optional<EventPort> pending() override {
    EventPort port;
    if (take_pending(std::span(&port, 1)) == 0) return std::nullopt;
    return port;
  }

  std::size_t take_pending(std::span<EventPort> out) override {
    std::lock_guard lock(mu_);
    if (ready_.size() < out.size()) {
      epoll_event evs[64];
      const int n = ::epoll_wait(epoll_.get(), evs, 64, 0);
      for (int i = 0; i < n; ++i) {
        if (evs[i].data.u64 == kNotAPort) {
          take_notices();  // the service said something (or a call queued it)
          continue;
        }
        const auto port = static_cast<EventPort>(evs[i].data.u64);
        auto it = ports_.find(port);
        if (it == ports_.end()) continue;
        std::uint64_t count;
        [[maybe_unused]] auto r = ::read(it->second.signal.get(), &count, sizeof count);
        it->second.masked = true;
        ready_.push_back(port);
      }
    }
    std::size_t taken = 0;
    while (taken < out.size() && !ready_.empty()) {
      out[taken++] = ready_.front();
      ready_.pop_front();
    }
    // More raised ports wait here: fd() stays readable for them.
    if (!ready_.empty() && !ready_signalled_) {
      const std::uint64_t one = 1;
      [[maybe_unused]] auto w = ::write(ready_signal_.get(), &one, sizeof one);
      ready_signalled_ = true;
    } else if (ready_.empty() && ready_signalled_) {
      std::uint64_t v;
      [[maybe_unused]] auto r = ::read(ready_signal_.get(), &v, sizeof v);
      ready_signalled_ = false;
    }
    return taken;
  }

  std::optional<bool> peer_closed(EventPort port) override {
    {
      std::lock_guard lock(mu_);
      take_notices();
      if (auto it = ports_.find(port); it != ports_.end()) return it->second.closed;
    }
    auto req = request(Op::peer_status);
    req.port = port;
    Channel::Answer a;
    channel_.call_or_throw(req, "port status " + std::to_string(port), a);
    return a.value != 0;
  }

 private:
  static constexpr std::uint64_t kNotAPort = ~std::uint64_t{0};

  struct PortState {
    UniqueFd signal;  // raised by the peer and the service; read here
    UniqueFd peer;    // the peer port's signal: written to notify it
    bool masked = false;
    bool closed = false;
  };

  void watch(int fd, std::uint32_t events, std::uint64_t data) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = data;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) fail(errno, "epoll_ctl");
  }

  void add_port(EventPort port, UniqueFd signal, UniqueFd peer) {
    std::lock_guard lock(mu_);
    watch(signal.get(), EPOLLIN | EPOLLONESHOT, port);
    ports_[port] = PortState{std::move(signal), std::move(peer)};
  }

  // What the service said unasked; mu_ held.
  void take_notices() {
    while (auto notice = channel_.next_notice()) {
      auto it = ports_.find(notice->port);
      if (it == ports_.end()) continue;
      if (notice->what == Op::bound) it->second.peer = std::move(notice->fd);
      if (notice->what == Op::peer_closed) it->second.closed = true;
    }
  }

  void simple(Op op, EventPort port, const char* what) {
    auto req = request(op);
    req.port = port;
    Channel::Answer a;
    channel_.call_or_throw(req, std::string(what) + " port " + std::to_string(port), a);
  }

  Channel channel_;
  UniqueFd epoll_;
  UniqueFd ready_signal_;  // readable while ready_ holds ports
  std::mutex mu_;
  bool ready_signalled_ = false;
  std::map<EventPort, PortState> ports_;
  std::deque<EventPort> ready_;
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
