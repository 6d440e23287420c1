#include "store_server.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <map>
#include <system_error>
#include <thread>
#include <vector>

extern "C" {
#include <xen/io/xs_wire.h>
}

#include "store_tree.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::platform::local {

using vib::platform::UniqueFd;

namespace {

constexpr std::size_t kMaxQueuedOutput = 4u << 20;  // a client that never reads is dropped
constexpr std::size_t kMaxWatchesPerConnection = 256;
constexpr std::size_t kMaxTransactionsPerConnection = 16;

const char* errno_name(int err) {
  for (const auto& e : xsd_errors)
    if (e.errnum == err) return e.errstring;
  return "EIO";
}

// Splits a payload into NUL-terminated fields; the last may be unterminated.
std::vector<std::string_view> split_fields(std::string_view payload) {
  std::vector<std::string_view> fields;
  std::size_t start = 0;
  while (start < payload.size()) {
    const auto nul = payload.find('\0', start);
    if (nul == std::string_view::npos) {
      fields.push_back(payload.substr(start));
      break;
    }
    fields.push_back(payload.substr(start, nul - start));
    start = nul + 1;
  }
  return fields;
}

std::optional<unsigned> parse_unsigned(std::string_view s) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc{} || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return value;
}

UniqueFd listen_on(const std::string& path) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  ::unlink(path.c_str());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) throw std::system_error(errno, std::generic_category(), "xenstore socket");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    throw std::system_error(ENAMETOOLONG, std::generic_category(), "xenstore socket " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd.get(), 64) != 0)
    throw std::system_error(errno, std::generic_category(), "xenstore socket " + path);
  return fd;
}

struct Watch {
  std::string given;      // as the client wrote it (relative or absolute)
  std::string canonical;  // absolute, or @special
  std::string token;
};

struct Connection {
  std::uint32_t id;
  DomId domid;
  UniqueFd fd;
  std::string in;
  std::string out;
  std::vector<Watch> watches;
  bool closing = false;
};

struct Domain {
  UniqueFd listener;
  std::string socket_path;
};

class StoreServerImpl final : public StoreServer {
 public:
  StoreServerImpl(std::string dir, DomainHooks hooks)
      : dir_(std::move(dir)), hooks_(std::move(hooks)), wake_(::eventfd(0, EFD_CLOEXEC)) {
    if (!wake_) throw std::system_error(errno, std::generic_category(), "eventfd");
    add_domain(kDom0);
    thread_ = std::thread([this] { run(); });
  }

  ~StoreServerImpl() override {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
    thread_.join();
    for (auto& [domid, domain] : domains_) ::unlink(domain.socket_path.c_str());
  }

 private:
  void add_domain(DomId domid) {
    Domain d;
    d.socket_path = local_xenstore_socket(dir_, domid);
    d.listener = listen_on(d.socket_path);
    domains_[domid] = std::move(d);
  }

  void run() {
    for (;;) {
      std::vector<pollfd> fds;
      fds.push_back({wake_.get(), POLLIN, 0});
      std::vector<DomId> listener_of;
      for (auto& [domid, d] : domains_) {
        fds.push_back({d.listener.get(), POLLIN, 0});
        listener_of.push_back(domid);
      }
      const std::size_t first_conn = fds.size();
      std::vector<std::uint32_t> conn_of;
      for (auto& [id, c] : connections_) {
        short events = POLLIN;
        if (!c.out.empty()) events |= POLLOUT;
        fds.push_back({c.fd.get(), events, 0});
        conn_of.push_back(id);
      }
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[0].revents) return;
      for (std::size_t i = 0; i < listener_of.size(); ++i)
        if (fds[1 + i].revents & POLLIN) accept_on(listener_of[i]);
      for (std::size_t i = 0; i < conn_of.size(); ++i) {
        auto it = connections_.find(conn_of[i]);
        if (it == connections_.end()) continue;  // dropped by an earlier event
        const short re = fds[first_conn + i].revents;
        if (re & (POLLIN | POLLHUP | POLLERR)) receive(it->second);
        if (re & POLLOUT) flush(it->second);
      }
      std::erase_if(connections_, [this](auto& kv) {
        if (!kv.second.closing) return false;
        store_.drop_transactions(kv.first);
        return true;
      });
    }
  }

  void accept_on(DomId domid) {
    auto d = domains_.find(domid);
    if (d == domains_.end()) return;
    UniqueFd fd(::accept4(d->second.listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!fd) return;
    const std::uint32_t id = next_conn_++;
    connections_.emplace(id, Connection{id, domid, std::move(fd), {}, {}, {}, false});
  }

  void receive(Connection& c) {
    char buf[8192];
    for (;;) {
      const ssize_t n = ::read(c.fd.get(), buf, sizeof(buf));
      if (n > 0) {
        c.in.append(buf, static_cast<std::size_t>(n));
        if (c.in.size() > 2 * (sizeof(xsd_sockmsg) + kMaxPayload)) break;
        continue;
      }
      if (n == 0 || (errno != EAGAIN && errno != EINTR)) c.closing = true;
      break;
    }
    // Every message is length-checked before it is looked at; a malformed
    // one ends this connection only.
    while (!c.closing && c.in.size() >= sizeof(xsd_sockmsg)) {
      xsd_sockmsg hdr;
      std::memcpy(&hdr, c.in.data(), sizeof(hdr));
      if (hdr.len > kMaxPayload || hdr.type >= XS_TYPE_COUNT) {
        c.closing = true;
        break;
      }
      if (c.in.size() < sizeof(hdr) + hdr.len) break;
      const std::string payload = c.in.substr(sizeof(hdr), hdr.len);
      c.in.erase(0, sizeof(hdr) + hdr.len);
      handle(c, hdr, payload);
    }
    flush(c);
  }

  void flush(Connection& c) {
    while (!c.out.empty()) {
      const ssize_t n = ::send(c.fd.get(), c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        c.out.erase(0, static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
      c.closing = true;
      return;
    }
    if (c.out.size() > kMaxQueuedOutput) c.closing = true;
  }

  void send_message(Connection& c, std::uint32_t type, std::uint32_t req_id, std::uint32_t tx_id,
                    std::string_view payload) {
    xsd_sockmsg hdr{type, req_id, tx_id, static_cast<std::uint32_t>(payload.size())};
    c.out.append(reinterpret_cast<const char*>(&hdr), sizeof(hdr));
    c.out.append(payload);
  }

  void reply(Connection& c, const xsd_sockmsg& req, std::string_view payload) {
    send_message(c, req.type, req.req_id, req.tx_id, payload);
  }
  void reply_ok(Connection& c, const xsd_sockmsg& req) { reply(c, req, std::string_view("OK", 3)); }
  void reply_error(Connection& c, const xsd_sockmsg& req, int err) {
    const char* name = errno_name(err);
    send_message(c, XS_ERROR, req.req_id, req.tx_id, std::string_view(name, std::strlen(name) + 1));
  }

  void handle(Connection& c, const xsd_sockmsg& req, const std::string& payload) {
    const Caller who{c.domid};
    const auto fields = split_fields(payload);
    auto path_arg = [&]() -> std::optional<std::string> {
      if (fields.empty()) return std::nullopt;
      auto p = canonical_path(who, fields[0]);
      if (p && (*p)[0] == '@') return std::nullopt;  // special paths are only for watches
      return p;
    };

    switch (req.type) {
      case XS_WATCH:
      case XS_UNWATCH: {
        if (fields.size() < 2) return reply_error(c, req, EINVAL);
        auto path = canonical_path(who, fields[0]);
        if (!path) return reply_error(c, req, EINVAL);
        return req.type == XS_WATCH ? add_watch(c, req, std::string(fields[0]), *path,
                                                std::string(fields[1]))
                                    : remove_watch(c, req, fields[0], fields[1]);
      }
      case XS_RESET_WATCHES:
        c.watches.clear();
        store_.drop_transactions(c.id);
        return reply_ok(c, req);
      case XS_TRANSACTION_START: {
        if (store_.transactions_of(c.id) >= kMaxTransactionsPerConnection)
          return reply_error(c, req, ENOSPC);
        const std::string id = std::to_string(store_.begin(c.id));
        return reply(c, req, std::string_view(id.c_str(), id.size() + 1));
      }
      case XS_TRANSACTION_END: {
        if (fields.empty() || (fields[0] != "T" && fields[0] != "F"))
          return reply_error(c, req, EINVAL);
        std::vector<Change> changes;
        if (int err = store_.end(c.id, req.tx_id, fields[0] == "T", changes))
          return reply_error(c, req, err);
        reply_ok(c, req);
        return fire(changes);
      }
      case XS_GET_DOMAIN_PATH: {
        auto domid = fields.empty() ? std::nullopt : parse_unsigned(fields[0]);
        if (!domid || *domid > 0xFFFF) return reply_error(c, req, EINVAL);
        const std::string path = domain_home(static_cast<DomId>(*domid));
        return reply(c, req, std::string_view(path.c_str(), path.size() + 1));
      }
      case XS_INTRODUCE:
      case XS_RELEASE:
      case XS_IS_DOMAIN_INTRODUCED:
        return domain_request(c, req, fields);
      default:
        break;
    }

    // Node operations, inside a transaction when the header names one.
    NodeMap* nodes = &store_.nodes();
    std::uint64_t* generation = &store_.generation();
    Store::Transaction* tx = nullptr;
    if (req.tx_id != 0) {
      tx = store_.find_transaction(c.id, req.tx_id);
      if (!tx) return reply_error(c, req, ENOENT);
      nodes = &tx->snapshot;
      generation = &tx->generation;
    }
    StoreView view(*nodes, *generation);
    std::vector<Change> changes;
    const auto path = path_arg();
    if (!path) return reply_error(c, req, EINVAL);
    int err = 0;
    std::string answer;
    switch (req.type) {
      case XS_READ: {
        err = view.read(who, *path, answer);
        break;
      }
      case XS_WRITE: {
        const auto nul = payload.find('\0');
        if (nul == std::string::npos) return reply_error(c, req, EINVAL);
        err = view.write(who, *path, std::string_view(payload).substr(nul + 1), changes);
        answer.assign("OK", 3);
        break;
      }
      case XS_MKDIR:
        err = view.mkdir(who, *path, changes);
        answer.assign("OK", 3);
        break;
      case XS_RM:
        err = view.remove(who, *path, changes);
        answer.assign("OK", 3);
        break;
      case XS_DIRECTORY:
      case XS_DIRECTORY_PART: {
        std::vector<std::string> children;
        err = view.directory(who, *path, children);
        std::size_t offset = 0;
        if (req.type == XS_DIRECTORY_PART) {
          auto off = fields.size() > 1 ? parse_unsigned(fields[1]) : std::nullopt;
          if (!off) return reply_error(c, req, EINVAL);
          offset = *off;
          answer = std::to_string(*generation) + '\0';
        }
        std::string all;
        for (const auto& child : children) all += child + '\0';
        if (req.type == XS_DIRECTORY) {
          if (all.size() > kMaxPayload) err = err ? err : E2BIG;
          answer = all;
        } else if (!err) {
          // Whole names only, ending with an empty name once everything was sent.
          std::size_t pos = std::min(offset, all.size());
          std::size_t end = pos;
          while (end < all.size()) {
            const std::size_t next = all.find('\0', end) + 1;
            if (answer.size() + (next - pos) + 1 > kMaxPayload) break;
            end = next;
          }
          answer += all.substr(pos, end - pos);
          if (end == all.size()) answer += '\0';
        }
        break;
      }
      case XS_GET_PERMS: {
        NodePermissions perms;
        err = view.get_perms(who, *path, perms);
        for (const auto& p : perms) answer += format_perm(p) + '\0';
        break;
      }
      case XS_SET_PERMS: {
        auto perms = parse_perms({fields.begin() + 1, fields.end()});
        if (!perms) return reply_error(c, req, EINVAL);
        err = view.set_perms(who, *path, *perms, changes);
        answer.assign("OK", 3);
        break;
      }
      default:
        return reply_error(c, req, EINVAL);
    }
    if (tx) {
      tx->touched.insert(view.touched().begin(), view.touched().end());
      tx->modified.insert(view.modified().begin(), view.modified().end());
      tx->changes.insert(tx->changes.end(), changes.begin(), changes.end());
    }
    if (err) return reply_error(c, req, err);
    reply(c, req, answer);
    if (!tx) fire(changes);
  }

  void add_watch(Connection& c, const xsd_sockmsg& req, std::string given, std::string canonical,
                 std::string token) {
    for (const auto& w : c.watches)
      if (w.given == given && w.token == token) return reply_error(c, req, EEXIST);
    if (c.watches.size() >= kMaxWatchesPerConnection) return reply_error(c, req, E2BIG);
    reply_ok(c, req);
    // A new watch fires once, so the watcher can read the initial state.
    send_watch_event(c, given, token);
    c.watches.push_back({std::move(given), std::move(canonical), std::move(token)});
  }

  void remove_watch(Connection& c, const xsd_sockmsg& req, std::string_view given,
                    std::string_view token) {
    const auto before = c.watches.size();
    std::erase_if(c.watches, [&](const Watch& w) { return w.given == given && w.token == token; });
    if (c.watches.size() == before) return reply_error(c, req, ENOENT);
    reply_ok(c, req);
  }

  void send_watch_event(Connection& c, std::string_view path, std::string_view token) {
    std::string payload;
    payload.append(path).push_back('\0');
    payload.append(token).push_back('\0');
    send_message(c, XS_WATCH_EVENT, 0, 0, payload);
  }

  // Tells every watcher that may read a changed node. Removing a node also
  // fires the watches set below it (Xen does the same).
  void fire(const std::vector<Change>& changes) {
    for (auto& [id, c] : connections_) {
      const Caller who{c.domid};
      for (const auto& w : c.watches) {
        if (w.canonical[0] == '@') continue;
        for (const auto& ch : changes) {
          std::string event_path;
          if (is_child_or_same(ch.path, w.canonical))
            event_path = ch.path;
          else if (ch.removed && is_child_or_same(w.canonical, ch.path))
            event_path = w.canonical;
          else
            continue;
          if (!allows_read(effective_access(who, ch.perms))) continue;
          const std::string home = domain_home(c.domid) + "/";
          if (w.given[0] != '/' && event_path.starts_with(home)) event_path.erase(0, home.size());
          send_watch_event(c, event_path, w.token);
        }
      }
      flush(c);
    }
  }

  void fire_special(std::string_view special) {
    for (auto& [id, c] : connections_) {
      if (c.domid != kDom0) continue;
      for (const auto& w : c.watches)
        if (w.canonical == special) send_watch_event(c, w.given, w.token);
      flush(c);
    }
  }

  void domain_request(Connection& c, const xsd_sockmsg& req,
                      const std::vector<std::string_view>& fields) {
    auto domid = fields.empty() ? std::nullopt : parse_unsigned(fields[0]);
    if (!domid || *domid >= 0x7FF0) return reply_error(c, req, EINVAL);
    const auto id = static_cast<DomId>(*domid);
    if (req.type == XS_IS_DOMAIN_INTRODUCED)
      return reply(c, req, domains_.count(id) ? std::string_view("T", 2) : std::string_view("F", 2));
    if (c.domid != kDom0) return reply_error(c, req, EACCES);
    if (req.type == XS_INTRODUCE) {
      if (fields.size() < 3) return reply_error(c, req, EINVAL);
      if (domains_.count(id)) return reply_ok(c, req);
      try {
        add_domain(id);
      } catch (const std::system_error& e) {
        return reply_error(c, req, e.code().value());
      }
      reply_ok(c, req);
      if (hooks_.introduced) hooks_.introduced(id);
      return fire_special("@introduceDomain");
    }
    // XS_RELEASE: the domain is gone; its connections go with it.
    if (id == kDom0) return reply_error(c, req, EINVAL);
    auto d = domains_.find(id);
    if (d == domains_.end()) return reply_error(c, req, ENOENT);
    ::unlink(d->second.socket_path.c_str());
    domains_.erase(d);
    for (auto& [cid, other] : connections_)
      if (other.domid == id) other.closing = true;
    reply_ok(c, req);
    if (hooks_.released) hooks_.released(id);
    std::error_code ignored;
    std::filesystem::remove(std::filesystem::path(local_xenstore_socket(dir_, id)).parent_path(), ignored);
    fire_special("@releaseDomain");
  }

  std::string dir_;
  DomainHooks hooks_;
  UniqueFd wake_;
  Store store_;
  std::map<DomId, Domain> domains_;
  std::map<std::uint32_t, Connection> connections_;
  std::uint32_t next_conn_ = 1;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<StoreServer> StoreServer::start(const std::string& dir, DomainHooks hooks) {
  return std::make_unique<StoreServerImpl>(dir, std::move(hooks));
}

}  // namespace vib::platform::local
