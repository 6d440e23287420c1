// XenStore over the real libxenstore.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>

extern "C" {
#include <xenstore.h>
}

#include "real_xen.hpp"

namespace vib::platform::real {

namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using Malloced = std::unique_ptr<T, FreeDeleter>;

struct HandleCloser {
  void operator()(xs_handle* h) const { xs_close(h); }
};

[[noreturn]] void fail(const char* what, std::string_view path) {
  throw std::system_error(errno, std::generic_category(),
                          std::string("xenstore ") + what + " " + std::string(path));
}

unsigned to_xs_bits(Access a) {
  switch (a) {
    case Access::none: return XS_PERM_NONE;
    case Access::read: return XS_PERM_READ;
    case Access::write: return XS_PERM_WRITE;
    case Access::both: return XS_PERM_READ | XS_PERM_WRITE;
  }
  return XS_PERM_NONE;
}

Access from_xs_bits(unsigned bits) {
  const bool r = bits & XS_PERM_READ, w = bits & XS_PERM_WRITE;
  return r && w ? Access::both : r ? Access::read : w ? Access::write : Access::none;
}

class LibXenStore final : public XenStore {
 public:
  explicit LibXenStore(xs_handle* h) : h_(h) {}

  std::optional<std::string> read(TransactionId tx, std::string_view path) override {
    const std::string p(path);
    unsigned len = 0;
    Malloced<char> value(static_cast<char*>(xs_read(h_.get(), tx, p.c_str(), &len)));
    if (!value) {
      if (errno == ENOENT) return std::nullopt;
      fail("read", path);
    }
    return std::string(value.get(), len);
  }

  void write(TransactionId tx, std::string_view path, std::string_view value) override {
    const std::string p(path);
    if (!xs_write(h_.get(), tx, p.c_str(), value.data(), static_cast<unsigned>(value.size())))
      fail("write", path);
  }

  void mkdir(TransactionId tx, std::string_view path) override {
    const std::string p(path);
    if (!xs_mkdir(h_.get(), tx, p.c_str())) fail("mkdir", path);
  }

  void remove(TransactionId tx, std::string_view path) override {
    const std::string p(path);
    if (!xs_rm(h_.get(), tx, p.c_str()) && errno != ENOENT) fail("rm", path);
  }

  std::optional<std::vector<std::string>> directory(TransactionId tx,
                                                    std::string_view path) override {
    const std::string p(path);
    unsigned num = 0;
    Malloced<char*> entries(xs_directory(h_.get(), tx, p.c_str(), &num));
    if (!entries) {
      if (errno == ENOENT) return std::nullopt;
      fail("directory", path);
    }
    return std::vector<std::string>(entries.get(), entries.get() + num);
  }

  std::optional<NodePermissions> get_permissions(TransactionId tx,
                                                 std::string_view path) override {
    const std::string p(path);
    unsigned num = 0;
    Malloced<xs_permissions> perms(xs_get_permissions(h_.get(), tx, p.c_str(), &num));
    if (!perms) {
      if (errno == ENOENT) return std::nullopt;
      fail("get-perms", path);
    }
    NodePermissions out;
    for (unsigned i = 0; i < num; ++i)
      out.push_back({static_cast<DomId>(perms.get()[i].id), from_xs_bits(perms.get()[i].perms)});
    return out;
  }

  void set_permissions(TransactionId tx, std::string_view path,
                       const NodePermissions& perms) override {
    const std::string p(path);
    std::vector<xs_permissions> raw;
    for (const auto& perm : perms) raw.push_back({perm.domid, to_xs_bits(perm.access)});
    if (!xs_set_permissions(h_.get(), tx, p.c_str(), raw.data(), static_cast<unsigned>(raw.size())))
      fail("set-perms", path);
  }

  TransactionId transaction_start() override {
    const xs_transaction_t t = xs_transaction_start(h_.get());
    if (t == XBT_NULL) fail("transaction-start", "");
    return t;
  }

  bool transaction_end(TransactionId tx, bool abort) override {
    if (xs_transaction_end(h_.get(), tx, abort)) return true;
    if (errno == EAGAIN && !abort) return false;
    fail("transaction-end", "");
  }

  void watch(std::string_view path, std::string_view token) override {
    const std::string p(path), t(token);
    if (!xs_watch(h_.get(), p.c_str(), t.c_str())) fail("watch", path);
  }

  void unwatch(std::string_view path, std::string_view token) override {
    const std::string p(path), t(token);
    if (!xs_unwatch(h_.get(), p.c_str(), t.c_str())) fail("unwatch", path);
  }

  int watch_fd() override { return xs_fileno(h_.get()); }

  std::optional<WatchEvent> next_watch_event() override {
    Malloced<char*> event(xs_check_watch(h_.get()));
    if (!event) {
      if (errno == EAGAIN) return std::nullopt;
      fail("check-watch", "");
    }
    return WatchEvent{event.get()[XS_WATCH_PATH], event.get()[XS_WATCH_TOKEN]};
  }

  std::string domain_path(DomId domid) override {
    Malloced<char> path(xs_get_domain_path(h_.get(), domid));
    if (!path) fail("get-domain-path", std::to_string(domid));
    return path.get();
  }

  bool domain_introduced(DomId domid) override { return xs_is_domain_introduced(h_.get(), domid); }

 private:
  std::unique_ptr<xs_handle, HandleCloser> h_;
};

// libxenstore takes a socket path only from XENSTORED_PATH. Setting it for the
// duration of xs_open, under a lock, lets one process hold connections to
// several host-local domains' sockets.
std::mutex env_lock;

}  // namespace

std::unique_ptr<XenStore> open_libxenstore(const std::optional<std::string>& socket_path) {
  xs_handle* h = nullptr;
  if (socket_path) {
    std::lock_guard lock(env_lock);
    const char* old = std::getenv("XENSTORED_PATH");
    const std::optional<std::string> saved = old ? std::optional<std::string>(old) : std::nullopt;
    ::setenv("XENSTORED_PATH", socket_path->c_str(), 1);
    h = xs_open(XS_OPEN_SOCKETONLY);
    const int err = errno;
    if (saved) ::setenv("XENSTORED_PATH", saved->c_str(), 1);
    else ::unsetenv("XENSTORED_PATH");
    errno = err;
  } else {
    h = xs_open(0);
  }
  if (!h)
    throw std::system_error(errno, std::generic_category(),
                            "cannot connect to xenstore" +
                                (socket_path ? " at " + *socket_path : std::string()));
  return std::make_unique<LibXenStore>(h);
}

}  // namespace vib::platform::real
