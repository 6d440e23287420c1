// The xenstore as vib uses it: a narrow interface over libxenstore.
//
// There is one implementation, over the real libxenstore. On Xen it talks to
// xenstored; on the host-local Xen it talks to vib-localxen's store, which
// speaks the same wire protocol (xen/io/xs_wire.h) on a per-domain socket.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "vib/platform/types.hpp"

namespace vib::platform {

// Xen's node permission letters: n(one), r(ead), w(rite), b(oth).
enum class Access : char { none = 'n', read = 'r', write = 'w', both = 'b' };

struct NodePermission {
  DomId domid;
  Access access;
  bool operator==(const NodePermission&) const = default;
};

// Xen semantics: the first entry names the owner and the access of every
// domain not listed; the following entries grant listed domains access.
using NodePermissions = std::vector<NodePermission>;

// Transaction id; kNoTransaction means "outside any transaction".
using TransactionId = std::uint32_t;
inline constexpr TransactionId kNoTransaction = 0;

struct WatchEvent {
  std::string path;   // the node that changed (or the watched path when armed)
  std::string token;  // the token given to watch()
};

// Failures other than "no such node" throw std::system_error carrying the
// errno xenstored returned (EACCES, EINVAL, E2BIG, ...).
class XenStore {
 public:
  virtual ~XenStore() = default;

  // nullopt when the node does not exist.
  virtual std::optional<std::string> read(TransactionId tx, std::string_view path) = 0;
  virtual void write(TransactionId tx, std::string_view path, std::string_view value) = 0;
  virtual void mkdir(TransactionId tx, std::string_view path) = 0;
  // Removes the node and everything below it; absent nodes are not an error.
  virtual void remove(TransactionId tx, std::string_view path) = 0;
  // nullopt when the node does not exist.
  virtual std::optional<std::vector<std::string>> directory(TransactionId tx,
                                                            std::string_view path) = 0;
  virtual std::optional<NodePermissions> get_permissions(TransactionId tx,
                                                         std::string_view path) = 0;
  virtual void set_permissions(TransactionId tx, std::string_view path,
                               const NodePermissions& perms) = 0;

  virtual TransactionId transaction_start() = 0;
  // Commits (abort=false) or aborts. Returns false when a commit lost a race
  // (EAGAIN): the caller redoes the whole transaction.
  virtual bool transaction_end(TransactionId tx, bool abort) = 0;

  // Watches fire once when armed, then for every change at or below `path`.
  // Special paths @introduceDomain and @releaseDomain are supported.
  virtual void watch(std::string_view path, std::string_view token) = 0;
  virtual void unwatch(std::string_view path, std::string_view token) = 0;
  // Pollable (POLLIN) while watch events are queued.
  virtual int watch_fd() = 0;
  // Non-blocking: nullopt when no event is queued.
  virtual std::optional<WatchEvent> next_watch_event() = 0;

  // "/local/domain/<domid>".
  virtual std::string domain_path(DomId domid) = 0;
  // Whether the store still knows the domain (XS_IS_DOMAIN_INTRODUCED): false
  // from the moment it is released, before the toolstack removes its home.
  virtual bool domain_introduced(DomId domid) = 0;
};

// Opens the store of `target`: the real xenstored (socket, or /dev/xen/xenbus
// in a guest) or the host-local store's socket for target.local_domid.
std::unique_ptr<XenStore> open_xenstore(const XenTarget& target);

// Waits, through a watch, until done(value of `path`) holds (the value is
// nullopt while the node is absent) and returns that value. Throws
// std::system_error(ETIMEDOUT) naming the path after `timeout`. Consumes
// watch events queued on `store` meanwhile: use a handle of its own when
// other watches matter.
std::optional<std::string> wait_for_node(
    XenStore& store, const std::string& path,
    const std::function<bool(const std::optional<std::string>&)>& done,
    std::chrono::milliseconds timeout);

// Runs `body(tx)` in a transaction, retrying while the commit loses races.
template <typename Body>
void with_transaction(XenStore& store, Body&& body) {
  for (;;) {
    const TransactionId tx = store.transaction_start();
    try {
      body(tx);
    } catch (...) {
      store.transaction_end(tx, /*abort=*/true);
      throw;
    }
    if (store.transaction_end(tx, /*abort=*/false)) return;
  }
}

}  // namespace vib::platform
