// The host-local Xen's grant tables and event channels. The service is the
// only party that sees every domain, so it is where isolation is enforced:
// a page file is handed only to the domain it was granted to.
#include "hypervisor_service.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <algorithm>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <system_error>
#include <thread>
#include <vector>

#include "seqpacket.hpp"
#include "vib/platform/unique_fd.hpp"
#include "wire.hpp"

namespace vib::platform::local {

namespace {

using wire::Op;

constexpr std::uint32_t kFirstReservedDomId = 0x7FF0;  // DOMID_FIRST_RESERVED

struct PageFile {
  UniqueFd fd;
  std::size_t pages;
};

struct Grant {
  DomId grantee;
  bool writable;
  std::shared_ptr<PageFile> file;  // null for a page granted in place (grant_range)
  std::size_t page;
  std::uint32_t owner_conn;
  pid_t process = 0;             // grant_range: the granting process
  std::uint64_t address = 0;     // and the page's address in it
};

// What to do when a share or a mapping ends (see UnmapNotify).
struct Notify {
  std::shared_ptr<PageFile> file;  // the page holding the byte
  std::size_t page = 0;
  std::optional<std::uint32_t> byte;
  std::optional<EventPort> port;  // in `domain`'s port space
  DomId domain = 0;
};

// One grant or grant_range message's refs, all reserved by the connection
// (they stay reserved when the share ends).
struct Share {
  std::vector<GrantRef> refs;
  Notify notify;
};

struct Mapping {
  std::uint32_t conn;
  Notify notify;
};

struct Port {
  std::uint32_t owner_conn;
  enum class State { unbound, connected, peer_gone } state = State::unbound;
  DomId remote_dom;
  EventPort remote_port = 0;
  bool owner_gone = false;  // kept only so a pending unmap-notify can still fire
  // Written to raise the port (wire.hpp); the owner and, once bound, the
  // peer hold it too.
  std::shared_ptr<UniqueFd> signal;
};

std::shared_ptr<UniqueFd> make_signal() {
  auto fd = std::make_shared<UniqueFd>(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!*fd) throw std::system_error(errno, std::generic_category(), "eventfd");
  return fd;
}

void raise(const UniqueFd& signal) {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(signal.get(), &one, sizeof one);
}

// The domain's max_grant_frames, when `vib-localxen create-domain` was given
// one: it leaves it in the domain's directory before introducing the
// domain, as libxl hands it to Xen when it creates one. Out of range or
// absent: the default table.
std::optional<std::size_t> max_grant_frames(const std::filesystem::path& home) {
  std::ifstream in(home / "max_grant_frames");
  std::size_t frames = 0;
  if (!(in >> frames) || frames == 0 || frames > wire::kMaxGrantsPerDomain / wire::kGrantsPerFrame) return std::nullopt;
  return frames;
}

struct Connection {
  DomId domid;
  UniqueFd fd;
  pid_t process;  // the peer, as the kernel reports it (SO_PEERCRED)
  std::map<GrantRef, std::uint32_t> reserved;  // runs of refs reserved: first -> count
  std::map<GrantRef, std::uint32_t> shares;    // first ref -> id into shares_
};

struct Domain {
  UniqueFd listener;
  std::string socket_path;
  GrantRef next_ref = 8;  // Xen reserves the first few entries for the toolstack
  std::size_t max_grants = wire::kMaxGrantsPerDomain;  // the table's size, as max_grant_frames * 512
  std::size_t held = 0;  // entries not free: reserved by a connection (granted or not)
  std::map<GrantRef, Grant> grants;
  EventPort next_port = 1;
  std::map<EventPort, Port> ports;
};

class Service final : public HypervisorService {
 public:
  explicit Service(std::string dir)
      : dir_(std::move(dir)), wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), epoll_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (!wake_ || !epoll_) throw std::system_error(errno, std::generic_category(), "eventfd");
    watch(wake_.get(), kWake);
    domain_created(kDom0);
    thread_ = std::thread([this] { run(); });
  }

  ~Service() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake();
    thread_.join();
    for (auto& [id, d] : domains_) ::unlink(d.socket_path.c_str());
  }

  void domain_created(DomId domid) override {
    std::lock_guard lock(mutex_);
    if (domains_.count(domid)) return;
    Domain d;
    d.socket_path = local_hypervisor_socket(dir_, domid);
    const auto home = std::filesystem::path(d.socket_path).parent_path();
    std::filesystem::create_directories(home);
    if (auto frames = max_grant_frames(home)) d.max_grants = *frames * wire::kGrantsPerFrame;
    ::unlink(d.socket_path.c_str());
    d.listener = UniqueFd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, d.socket_path.c_str(), sizeof(addr.sun_path) - 1);
    if (!d.listener || ::bind(d.listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(d.listener.get(), 64) != 0)
      throw std::system_error(errno, std::generic_category(), "hypervisor socket " + d.socket_path);
    watch(d.listener.get(), kListener | domid);
    domains_.emplace(domid, std::move(d));
    wake();
  }

  void domain_destroyed(DomId domid) override {
    std::lock_guard lock(mutex_);
    auto d = domains_.find(domid);
    if (d == domains_.end() || domid == kDom0) return;
    ::unlink(d->second.socket_path.c_str());
    std::vector<std::uint32_t> dying;
    for (auto& [id, c] : connections_)
      if (c.domid == domid) dying.push_back(id);
    for (auto id : dying) close_connection(id);
    // Whatever the domain granted is revoked; its ports are gone for good.
    for (auto& [port, p] : d->second.ports) peer_gone(p);
    domains_.erase(d);
    wake();
  }

 private:
  void wake() {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }

  // Ready sockets come from one epoll set: one message costs the same with
  // two connections as with thousands (a guest context alone has three).
  static constexpr std::uint64_t kListener = std::uint64_t{1} << 32;
  static constexpr std::uint64_t kWake = std::uint64_t{1} << 33;

  void watch(int fd, std::uint64_t what) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = what;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      throw std::system_error(errno, std::generic_category(), "hypervisor epoll_ctl");
  }

  void run() {
    epoll_event evs[64];
    for (;;) {
      const int n = ::epoll_wait(epoll_.get(), evs, 64, -1);
      if (n < 0 && errno != EINTR) return;
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      for (int i = 0; i < n; ++i) {
        const std::uint64_t what = evs[i].data.u64;
        if (what == kWake) {
          std::uint64_t v;
          [[maybe_unused]] auto r = ::read(wake_.get(), &v, sizeof(v));
        } else if (what & kListener) {
          accept_on(static_cast<DomId>(what & 0xffffffffu));
        } else if (connections_.count(static_cast<std::uint32_t>(what))) {
          serve(static_cast<std::uint32_t>(what));
        }
      }
    }
  }

  void accept_on(DomId domid) {
    auto d = domains_.find(domid);
    if (d == domains_.end()) return;
    UniqueFd fd(::accept4(d->second.listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd) return;
    ucred peer{};
    socklen_t len = sizeof(peer);
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0) return;
    const std::uint32_t id = next_conn_++;
    watch(fd.get(), id);
    connections_.emplace(id, Connection{domid, std::move(fd), peer.pid, {}, {}});
  }

  // Serves one message of the connection, if one is there; true if it was
  // served and the connection is still open.
  bool serve(std::uint32_t conn_id) {
    Connection& c = connections_.at(conn_id);
    auto hang_up = [&] {
      close_connection(conn_id);
      return false;
    };
    std::vector<std::byte> bytes;
    std::vector<UniqueFd> fds;
    if (!receive_message(c.fd.get(), bytes, fds, wire::kMaxMessage, 1, /*nonblocking=*/true))
      return errno == EAGAIN ? false : hang_up();
    wire::Request req;
    if (bytes.size() < sizeof(req)) return hang_up();
    std::memcpy(&req, bytes.data(), sizeof(req));  // copied once, then checked
    const std::size_t entries = (bytes.size() - sizeof(req)) / sizeof(std::uint32_t);
    if (req.count > wire::kMaxEntries || req.count > entries) return hang_up();
    std::vector<std::uint32_t> args(req.count);
    if (!args.empty()) std::memcpy(args.data(), bytes.data() + sizeof(req), req.count * sizeof(std::uint32_t));

    // Never answered (wire.hpp): what cannot be done closes the connection.
    switch (req.op) {
      case Op::grant: return grant(conn_id, req, args, fds) == 0 || hang_up();
      case Op::grant_range: return grant_range(conn_id, req, args) == 0 || hang_up();
      case Op::release_refs: return release_refs(conn_id, args) == 0 || hang_up();
      case Op::end_grant:
        if (req.flags & wire::kNoReply) return end_grants(conn_id, args) == 0 || hang_up();
        break;
      default: break;
    }
    wire::Reply reply{req.op, 0, 0, 0};
    std::vector<std::uint32_t> out;
    std::vector<int> out_fds;
    switch (req.op) {
      case Op::reserve_refs: reply.status = reserve_refs(conn_id, req.id, reply.value); break;
      case Op::end_grant: reply.status = end_grants(conn_id, args); break;
      case Op::map: reply.status = map(conn_id, req, args, out, out_fds, reply.value); break;
      case Op::unmap: reply.status = unmap(conn_id, req.id); break;
      case Op::alloc_unbound: reply.status = alloc_unbound(conn_id, req, reply.value, out_fds); break;
      case Op::bind_interdomain: reply.status = bind_interdomain(conn_id, req, reply.value, out_fds); break;
      case Op::unbind: reply.status = unbind(conn_id, req.port); break;
      case Op::notify: reply.status = notify(c.domid, req.port); break;
      case Op::peer_status: reply.status = peer_status(c.domid, req.port, reply.value); break;
      case Op::query_size: reply.status = query_size(conn_id, c.domid, out, reply.value); break;
      default: return hang_up();
    }
    if ((req.flags & wire::kNoReply) && req.op == Op::unmap) return true;
    reply.count = static_cast<std::uint32_t>(out.size());
    std::vector<std::byte> msg(sizeof(reply) + out.size() * sizeof(std::uint32_t));
    std::memcpy(msg.data(), &reply, sizeof(reply));
    if (!out.empty()) std::memcpy(msg.data() + sizeof(reply), out.data(), out.size() * sizeof(std::uint32_t));
    return send_message(connections_.at(conn_id).fd.get(), msg, out_fds) || hang_up();
  }

  Domain* domain(DomId id) {
    auto it = domains_.find(id);
    return it == domains_.end() ? nullptr : &it->second;
  }

  std::optional<Notify> make_notify(DomId self, const wire::Request& req,
                                    std::shared_ptr<PageFile> file, std::size_t page) {
    Notify n{std::move(file), page, std::nullopt, std::nullopt, self};
    if (req.flags & wire::kNotifyByte) {
      if (req.notify_offset >= kPageSize) return std::nullopt;
      n.byte = req.notify_offset;
    }
    if (req.flags & wire::kNotifyPort) n.port = req.notify_port;
    return n;
  }

  // A share of the caller's own pages (the fd it sent) under refs it chose
  // from its reservations.
  int grant(std::uint32_t conn_id, const wire::Request& req, const std::vector<std::uint32_t>& refs,
            std::vector<UniqueFd>& fds) {
    Connection& c = connections_.at(conn_id);
    Domain* self = domain(c.domid);
    if (fds.size() != 1 || refs.empty() || !self) return EINVAL;
    if (req.domid >= kFirstReservedDomId) return ESRCH;  // Xen does not check more at grant time
    if (refs.size() > 1 && (req.flags & (wire::kNotifyByte | wire::kNotifyPort))) return EINVAL;
    struct stat st;
    // `id` is the first page of the file this message grants (large shares
    // come in several messages over one file).
    const std::size_t first = req.id;
    if (first > (std::size_t{1} << 30) || ::fstat(fds[0].get(), &st) != 0 ||
        static_cast<std::size_t>(st.st_size) < (first + refs.size()) * kPageSize)
      return EINVAL;
    auto file = std::make_shared<PageFile>(PageFile{std::move(fds[0]), first + refs.size()});
    auto notify = make_notify(c.domid, req, file, first);
    if (!notify) return EINVAL;
    Share share{{}, *notify};
    const bool writable = req.flags & wire::kWritable;
    return enter(c, *self, std::move(share), refs.size(), [&](std::size_t i) {
      return std::pair{GrantRef{refs[i]}, Grant{static_cast<DomId>(req.domid), writable, file, first + i, conn_id}};
    });
  }

  // Enters `count` grants, entry(i) -> (ref, grant), as one share of `c`
  // known by its first ref: all or none (EINVAL), each ref reserved by `c`
  // and not granted already (or twice here).
  template <typename Entry>
  int enter(Connection& c, Domain& self, Share share, std::size_t count, Entry entry) {
    if (c.shares.count(entry(0).first)) return EINVAL;
    for (std::size_t i = 0; i < count; ++i) {
      auto [ref, grant] = entry(i);
      if (!reserved_run(c, ref, 1) || !self.grants.emplace(ref, std::move(grant)).second) {
        for (GrantRef done : share.refs) self.grants.erase(done);
        return EINVAL;
      }
      share.refs.push_back(ref);
    }
    const GrantRef first = share.refs.front();
    const std::uint32_t id = next_share_++;
    shares_[id] = std::move(share);
    c.shares[first] = id;
    return 0;
  }

  int query_size(std::uint32_t conn_id, DomId self_id, std::vector<std::uint32_t>& out, std::uint32_t& size) {
    settle(self_id, conn_id);
    Domain* self = domain(self_id);
    if (!self) return ESRCH;
    size = static_cast<std::uint32_t>(self->max_grants);
    out.push_back(static_cast<std::uint32_t>(self->held));
    return 0;
  }

  // A run of `count` free entries of the caller's table, for it to choose
  // refs from in grant and grant_range.
  int reserve_refs(std::uint32_t conn_id, std::uint32_t count, std::uint32_t& first) {
    Connection& c = connections_.at(conn_id);
    Domain* self = domain(c.domid);
    if (!self || count == 0 || count > wire::kMaxGrantsPerDomain) return EINVAL;
    if (self->held + count > self->max_grants) return ENOSPC;
    first = self->next_ref;
    self->next_ref += count;
    self->held += count;
    // Runs are handed out in order: one that follows the last is merged.
    auto last = c.reserved.empty() ? c.reserved.end() : std::prev(c.reserved.end());
    if (last != c.reserved.end() && last->first + last->second == first)
      last->second += count;
    else
      c.reserved.emplace(first, count);
    return 0;
  }

  // The reserved run of `conn` holding [first, first + count), if one does.
  static std::optional<std::map<GrantRef, std::uint32_t>::iterator> reserved_run(
      Connection& conn, GrantRef first, std::uint64_t count) {
    auto it = conn.reserved.upper_bound(first);
    if (it == conn.reserved.begin()) return std::nullopt;
    --it;
    if (std::uint64_t{first} + count > std::uint64_t{it->first} + it->second) return std::nullopt;
    return it;
  }

  int release_refs(std::uint32_t conn_id, const std::vector<std::uint32_t>& args) {
    Connection& c = connections_.at(conn_id);
    Domain* self = domain(c.domid);
    if (!self || args.empty() || args.size() % 2 != 0) return EINVAL;
    for (std::size_t i = 0; i < args.size(); i += 2) {
      const GrantRef first = args[i];
      const std::uint32_t count = args[i + 1];
      auto run = count == 0 ? std::nullopt : reserved_run(c, first, count);
      if (!run) return EINVAL;
      // None of them may be granted: the entry would be lost to accounting.
      if (auto g = self->grants.lower_bound(first); g != self->grants.end() && g->first - first < count)
        return EBUSY;
      const GrantRef run_first = (*run)->first;
      const std::uint32_t run_count = (*run)->second;
      c.reserved.erase(*run);
      if (first > run_first) c.reserved.emplace(run_first, first - run_first);
      const std::uint64_t run_end = std::uint64_t{run_first} + run_count, end = std::uint64_t{first} + count;
      if (end < run_end) c.reserved.emplace(static_cast<GrantRef>(end), static_cast<std::uint32_t>(run_end - end));
      self->held -= count;
    }
    return 0;
  }

  // A share of the caller's own pages where they are, under refs it chose
  // from its reservations: recorded with the process the kernel says is on
  // the connection, never one the caller names.
  int grant_range(std::uint32_t conn_id, const wire::Request& req, const std::vector<std::uint32_t>& args) {
    Connection& c = connections_.at(conn_id);
    Domain* self = domain(c.domid);
    constexpr std::size_t kPer = wire::kGrantRangeEntriesPerPage;
    if (args.empty() || args.size() % kPer != 0 || !self || c.process <= 0) return EINVAL;
    if (req.flags & (wire::kNotifyByte | wire::kNotifyPort)) return EINVAL;
    if (req.domid >= kFirstReservedDomId) return ESRCH;  // Xen does not check more at grant time
    for (std::size_t i = 0; i < args.size(); i += kPer)
      if ((args[i + 1] | (std::uint64_t{args[i + 2]} << 32)) % kPageSize != 0) return EINVAL;
    Share share{{}, Notify{nullptr, 0, std::nullopt, std::nullopt, c.domid}};
    const bool writable = req.flags & wire::kWritable;
    return enter(c, *self, std::move(share), args.size() / kPer, [&](std::size_t i) {
      Grant g{static_cast<DomId>(req.domid), writable, nullptr, 0, conn_id};
      g.process = c.process;
      g.address = args[kPer * i + 1] | (std::uint64_t{args[kPer * i + 2]} << 32);
      return std::pair{GrantRef{args[kPer * i]}, g};
    });
  }

  // The shares whose first refs `firsts` names; ENOENT at the first that
  // is not one of the connection's.
  int end_grants(std::uint32_t conn_id, const std::vector<std::uint32_t>& firsts) {
    Connection& c = connections_.at(conn_id);
    if (firsts.empty()) return EINVAL;
    for (const GrantRef first : firsts) {
      auto it = c.shares.find(first);
      if (it == c.shares.end()) return ENOENT;
      const std::uint32_t share_id = it->second;
      c.shares.erase(it);
      end_share(share_id);
    }
    return 0;
  }

  // Ending a share revokes its refs for new maps; pages already mapped stay
  // with the mapper (the page file lives as long as any mapping of it).
  void end_share(std::uint32_t share_id) {
    auto it = shares_.find(share_id);
    if (it == shares_.end()) return;
    if (Domain* d = domain(it->second.notify.domain))
      for (GrantRef ref : it->second.refs) d->grants.erase(ref);
    // Gone before its notification fires, so a port kept alive only for it
    // can be released by fire().
    const Notify notify = std::move(it->second.notify);
    shares_.erase(it);
    fire(notify);
  }

  // Serves what `dom`'s other connections have already sent, before a
  // request that reads its grants: a grant or an end posted without an
  // answer (wire::kNoReply) takes effect before any map or query it could
  // have caused, as on Xen, where a grant is in the table once written and
  // ended when the call returns. At most kSettleMessages per connection,
  // and one more per ref a map names (each could need its own grant
  // message): a flood delays only this request, by a bounded amount. Not
  // nested (what it serves settles nothing more).
  static constexpr std::size_t kSettleMessages = 64;
  void settle(DomId dom, std::uint32_t except, std::size_t budget = kSettleMessages) {
    if (settling_) return;
    settling_ = true;
    std::vector<std::uint32_t> ids;
    for (const auto& [id, c] : connections_)
      if (c.domid == dom && id != except) ids.push_back(id);
    for (const auto id : ids) {
      std::size_t served = 0;
      while (served < budget && connections_.count(id) && serve(id)) ++served;
    }
    settling_ = false;
  }

  int map(std::uint32_t conn_id, const wire::Request& req, const std::vector<std::uint32_t>& refs,
          std::vector<std::uint32_t>& out, std::vector<int>& out_fds, std::uint32_t& mapping_id) {
    settle(static_cast<DomId>(req.domid), conn_id, kSettleMessages + refs.size());
    const DomId self = connections_.at(conn_id).domid;
    Domain* granter = domain(static_cast<DomId>(req.domid));
    if (refs.empty()) return EINVAL;
    if (!granter) return ESRCH;
    const bool writable = req.flags & wire::kWritable;
    std::vector<const PageFile*> files;
    std::shared_ptr<PageFile> first_file;
    std::size_t first_page = 0;
    // All or nothing: every ref must be granted to the caller, writable if asked.
    for (std::size_t i = 0; i < refs.size(); ++i) {
      auto g = granter->grants.find(refs[i]);
      if (g == granter->grants.end()) return ENOENT;
      if (g->second.grantee != self) return EACCES;
      if (writable && !g->second.writable) return EACCES;
      if (i == 0) {
        first_file = g->second.file;
        first_page = g->second.page;
      }
      if (!g->second.file) {
        out.insert(out.end(), {wire::kProcessPage, static_cast<std::uint32_t>(g->second.address),
                               static_cast<std::uint32_t>(g->second.address >> 32),
                               static_cast<std::uint32_t>(g->second.process)});
        continue;
      }
      auto pos = std::find(files.begin(), files.end(), g->second.file.get());
      if (pos == files.end()) {
        if (files.size() == wire::kMaxFdsPerMessage) return E2BIG;
        files.push_back(g->second.file.get());
        out_fds.push_back(g->second.file->fd.get());
        pos = files.end() - 1;
      }
      out.insert(out.end(), {static_cast<std::uint32_t>(pos - files.begin()),
                             static_cast<std::uint32_t>(g->second.page), 0, 0});
    }
    auto notify = make_notify(self, req, first_file, first_page);
    if (!notify) return EINVAL;
    mapping_id = next_mapping_++;
    mappings_[mapping_id] = Mapping{conn_id, *notify};
    return 0;
  }

  int unmap(std::uint32_t conn_id, std::uint32_t mapping_id) {
    auto it = mappings_.find(mapping_id);
    if (it == mappings_.end() || it->second.conn != conn_id) return ENOENT;
    const Notify notify = std::move(it->second.notify);
    mappings_.erase(it);
    fire(notify);
    return 0;
  }

  void fire(const Notify& n) {
    if (n.byte && n.file) {
      void* page = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, n.file->fd.get(),
                          static_cast<off_t>(n.page * kPageSize));
      if (page != MAP_FAILED) {
        static_cast<volatile unsigned char*>(page)[*n.byte] = 0;
        ::munmap(page, kPageSize);
      }
    }
    if (n.port) {
      notify(n.domain, *n.port);
      release_zombie(n.domain, *n.port);
    }
  }

  int alloc_unbound(std::uint32_t conn_id, const wire::Request& req, std::uint32_t& port_out,
                    std::vector<int>& out_fds) {
    Domain* self = domain(connections_.at(conn_id).domid);
    if (!self || !domain(static_cast<DomId>(req.domid))) return ESRCH;
    if (self->ports.size() >= wire::kMaxPortsPerDomain) return ENOSPC;
    const EventPort port = self->next_port++;
    self->ports[port] = Port{conn_id, Port::State::unbound, static_cast<DomId>(req.domid), 0, false, make_signal()};
    Port& p = self->ports[port];
    out_fds.push_back(p.signal->get());
    port_out = port;
    return 0;
  }

  // Tells the owner of `port` of domain `dom` something unasked (wire::Op::bound, peer_closed).
  void tell_owner(DomId dom, EventPort port, const Port& p, Op what, std::span<const int> fds = {}) {
    if (p.owner_gone) return;
    auto c = connections_.find(p.owner_conn);
    if (c == connections_.end() || c->second.domid != dom) return;
    const wire::Reply message{what, 0, port, 0};
    send_message(c->second.fd.get(), std::as_bytes(std::span(&message, 1)), fds);
  }

  int bind_interdomain(std::uint32_t conn_id, const wire::Request& req, std::uint32_t& port_out,
                       std::vector<int>& out_fds) {
    const DomId self_id = connections_.at(conn_id).domid;
    Domain* self = domain(self_id);
    Domain* remote = domain(static_cast<DomId>(req.domid));
    if (!self || !remote) return ESRCH;
    auto rp = remote->ports.find(req.port);
    // The remote port must be waiting for exactly this domain.
    if (rp == remote->ports.end() || rp->second.state != Port::State::unbound ||
        rp->second.remote_dom != self_id || rp->second.owner_gone)
      return EINVAL;
    if (self->ports.size() >= wire::kMaxPortsPerDomain) return ENOSPC;
    const EventPort port = self->next_port++;
    self->ports[port] =
        Port{conn_id, Port::State::connected, static_cast<DomId>(req.domid), req.port, false, make_signal()};
    Port& p = self->ports[port];
    rp->second.state = Port::State::connected;
    rp->second.remote_port = port;
    // Each end gets the other's signal fd: from now on a notify is a write.
    const int mine = p.signal->get();
    tell_owner(static_cast<DomId>(req.domid), req.port, rp->second, Op::bound, std::span(&mine, 1));
    out_fds.push_back(mine);
    out_fds.push_back(rp->second.signal->get());
    port_out = port;
    return 0;
  }

  void peer_gone(Port& p) {
    if (p.state != Port::State::connected) return;
    if (Domain* r = domain(p.remote_dom)) {
      auto rp = r->ports.find(p.remote_port);
      if (rp != r->ports.end() && rp->second.state == Port::State::connected) {
        rp->second.state = Port::State::peer_gone;
        tell_owner(p.remote_dom, p.remote_port, rp->second, Op::peer_closed);
      }
    }
  }

  bool referenced_by_notify(DomId dom, EventPort port) const {
    auto refers = [&](const Notify& n) { return n.port && *n.port == port && n.domain == dom; };
    for (const auto& [id, s] : shares_) if (refers(s.notify)) return true;
    for (const auto& [id, m] : mappings_) if (refers(m.notify)) return true;
    return false;
  }

  // Closes a port; one that an unmap-notify still needs lingers, ownerless,
  // until that notify has fired (gntalloc keeps such a port alive too).
  void close_port(DomId dom, EventPort port) {
    Domain* d = domain(dom);
    if (!d) return;
    auto it = d->ports.find(port);
    if (it == d->ports.end()) return;
    if (referenced_by_notify(dom, port)) {
      it->second.owner_gone = true;
      return;
    }
    peer_gone(it->second);
    d->ports.erase(it);
  }

  void release_zombie(DomId dom, EventPort port) {
    Domain* d = domain(dom);
    if (!d) return;
    auto it = d->ports.find(port);
    if (it != d->ports.end() && it->second.owner_gone && !referenced_by_notify(dom, port)) {
      peer_gone(it->second);
      d->ports.erase(it);
    }
  }

  int unbind(std::uint32_t conn_id, EventPort port) {
    Domain* d = domain(connections_.at(conn_id).domid);
    if (!d) return ESRCH;
    auto it = d->ports.find(port);
    if (it == d->ports.end() || it->second.owner_conn != conn_id || it->second.owner_gone) return ENOENT;
    close_port(connections_.at(conn_id).domid, port);
    return 0;
  }

  // Raises the event on the other end of `port` (a port of domain `dom`).
  int notify(DomId dom, EventPort port) {
    Domain* d = domain(dom);
    if (!d) return ESRCH;
    auto it = d->ports.find(port);
    if (it == d->ports.end()) return ENOENT;
    if (it->second.state != Port::State::connected) return 0;  // Xen drops it too
    Domain* r = domain(it->second.remote_dom);
    if (!r) return 0;
    auto rp = r->ports.find(it->second.remote_port);
    if (rp == r->ports.end() || rp->second.owner_gone) return 0;
    raise(*rp->second.signal);
    return 0;
  }


  int peer_status(DomId dom, EventPort port, std::uint32_t& gone) {
    Domain* d = domain(dom);
    if (!d) return ESRCH;
    auto it = d->ports.find(port);
    if (it == d->ports.end()) return ENOENT;
    gone = it->second.state == Port::State::peer_gone ? 1 : 0;
    return 0;
  }

  // A process that dies (or closes its handle) loses its ports, ends its
  // shares and drops its mappings; the notifications it asked for fire now.
  void close_connection(std::uint32_t conn_id) {
    auto it = connections_.find(conn_id);
    if (it == connections_.end()) return;
    const DomId dom = it->second.domid;
    std::vector<std::uint32_t> shares;
    for (const auto& [first, id] : it->second.shares) shares.push_back(id);
    std::size_t reserved = 0;
    for (const auto& [first, count] : it->second.reserved) reserved += count;
    connections_.erase(it);
    if (Domain* d = domain(dom)) {
      d->held -= reserved;
      std::vector<EventPort> ports;
      for (auto& [port, p] : d->ports)
        if (p.owner_conn == conn_id) ports.push_back(port);
      for (auto port : ports) close_port(dom, port);
    }
    for (auto id : shares) end_share(id);
    std::vector<std::uint32_t> maps;
    for (auto& [id, m] : mappings_)
      if (m.conn == conn_id) maps.push_back(id);
    for (auto id : maps) {
      auto m = mappings_.find(id);
      Notify n = m->second.notify;
      mappings_.erase(m);
      fire(n);
    }
  }

  std::string dir_;
  UniqueFd wake_;
  UniqueFd epoll_;  // the listeners and connections (closing an fd leaves it)
  std::mutex mutex_;
  bool stopping_ = false;
  bool settling_ = false;  // settle() is serving other connections
  std::map<DomId, Domain> domains_;
  std::map<std::uint32_t, Connection> connections_;
  std::map<std::uint32_t, Share> shares_;
  std::map<std::uint32_t, Mapping> mappings_;
  std::uint32_t next_conn_ = 1, next_share_ = 1, next_mapping_ = 1;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<HypervisorService> HypervisorService::start(const std::string& dir) {
  return std::make_unique<Service>(dir);
}

}  // namespace vib::platform::local
