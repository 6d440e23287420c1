// The data model of the host-local xenstore: nodes, Xen's permission rules and
// transactions. No I/O here, so it can be tested and fuzzed on its own.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "vib/platform/xenstore.hpp"

namespace vib::platform::local {

// Limits from xen/io/xs_wire.h.
inline constexpr std::size_t kMaxPathLength = 3072;   // XENSTORE_ABS_PATH_MAX
inline constexpr std::size_t kMaxPayload = 4096;      // XENSTORE_PAYLOAD_MAX
inline constexpr std::size_t kMaxNodesPerDomain = 1000;

struct Node {
  std::string value;
  NodePermissions perms;
  std::uint64_t generation = 0;  // bumped on every change, for transaction conflicts
};

// A flat map of canonical absolute paths. Children are derived from the keys,
// which keeps snapshots and conflict checks simple.
using NodeMap = std::map<std::string, Node, std::less<>>;

// Who asks: the domain the connection belongs to.
struct Caller {
  DomId domid;
  bool privileged() const { return domid == kDom0; }
};

// The result of a change: the paths whose watches must fire, each with
// the permissions the node had (so a watcher that cannot read it is not told).
struct Change {
  std::string path;
  NodePermissions perms;
  bool removed = false;
};

// A view of the store: the live tree, or a transaction's snapshot of it.
class StoreView {
 public:
  explicit StoreView(NodeMap& nodes, std::uint64_t& generation)
      : nodes_(nodes), generation_(generation) {}

  // Each returns 0 or an errno value (ENOENT, EACCES, EINVAL, E2BIG, EEXIST...).
  int read(const Caller& who, const std::string& path, std::string& value);
  int write(const Caller& who, const std::string& path, std::string_view value,
            std::vector<Change>& changes);
  int mkdir(const Caller& who, const std::string& path, std::vector<Change>& changes);
  int remove(const Caller& who, const std::string& path, std::vector<Change>& changes);
  int directory(const Caller& who, const std::string& path, std::vector<std::string>& children);
  int get_perms(const Caller& who, const std::string& path, NodePermissions& perms);
  int set_perms(const Caller& who, const std::string& path, const NodePermissions& perms,
                std::vector<Change>& changes);

  bool can_read(const Caller& who, const NodePermissions& perms) const;

  // Paths read or modified through this view (for transaction conflicts).
  const std::set<std::string>& touched() const { return touched_; }
  const std::set<std::string>& modified() const { return modified_; }

 private:
  int create_path(const Caller& who, const std::string& path, std::vector<Change>& changes);
  Node* find(const std::string& path);
  void touch(const std::string& path) { touched_.insert(path); }
  void modify(const std::string& path) {
    touched_.insert(path);
    modified_.insert(path);
  }
  std::uint64_t next_generation() { return ++generation_; }

  NodeMap& nodes_;
  std::uint64_t& generation_;
  std::set<std::string> touched_;
  std::set<std::string> modified_;
};

// Xen's access rule: privileged callers and the owner may do anything; a
// listed domain gets its entry's access; everyone else the default (entry 0).
Access effective_access(const Caller& who, const NodePermissions& perms);
bool allows_read(Access a);
bool allows_write(Access a);

// "/a/b" for absolute paths; relative ones resolve under /local/domain/<id>.
// Returns nullopt for a malformed path (bad characters, "//", trailing "/",
// too long). Special watch paths (@...) are returned unchanged.
std::optional<std::string> canonical_path(const Caller& who, std::string_view path);
std::string domain_home(DomId domid);
bool is_child_or_same(std::string_view path, std::string_view ancestor);
std::string parent_path(const std::string& path);

// Perms on the wire: "b0\0r5\0" -> list; nullopt when malformed.
std::optional<NodePermissions> parse_perms(const std::vector<std::string_view>& fields);
std::string format_perm(const NodePermission& p);

// The whole store: the live tree plus the transactions under way.
class Store {
 public:
  Store();

  NodeMap& nodes() { return nodes_; }
  std::uint64_t& generation() { return generation_; }

  struct Transaction {
    NodeMap snapshot;        // private copy the transaction works on
    NodeMap base;            // the live tree as it was at start (to detect conflicts)
    std::uint64_t generation;
    std::set<std::string> touched;
    std::set<std::string> modified;
    std::vector<Change> changes;
  };

  // Opens a transaction; the id is unique in this store.
  std::uint32_t begin(std::uint32_t owner_conn);
  Transaction* find_transaction(std::uint32_t owner_conn, std::uint32_t id);
  // Ends: commit=false aborts. Returns 0, EAGAIN (lost a race) or ENOENT.
  int end(std::uint32_t owner_conn, std::uint32_t id, bool commit, std::vector<Change>& changes);
  void drop_transactions(std::uint32_t owner_conn);
  std::size_t transactions_of(std::uint32_t owner_conn) const;

 private:
  NodeMap nodes_;
  std::uint64_t generation_ = 1;
  std::uint32_t next_tx_ = 1;
  std::map<std::pair<std::uint32_t, std::uint32_t>, Transaction> transactions_;
};

}  // namespace vib::platform::local
