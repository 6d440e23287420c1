#include "store_tree.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>

namespace vib::platform::local {

namespace {

bool valid_node_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '_' || c == '@' ||
         c == '-';
}

// The first entry of a node's permissions names its owner.
DomId owner_of(const NodePermissions& perms) { return perms.empty() ? kDom0 : perms[0].domid; }

std::size_t nodes_owned_by(const NodeMap& nodes, DomId domid) {
  return static_cast<std::size_t>(std::count_if(
      nodes.begin(), nodes.end(), [&](const auto& kv) { return owner_of(kv.second.perms) == domid; }));
}

}  // namespace

std::string domain_home(DomId domid) { return "/local/domain/" + std::to_string(domid); }

bool is_child_or_same(std::string_view path, std::string_view ancestor) {
  if (ancestor == "/") return !path.empty() && path[0] == '/';
  if (path.size() < ancestor.size() || path.substr(0, ancestor.size()) != ancestor) return false;
  return path.size() == ancestor.size() || path[ancestor.size()] == '/';
}

std::string parent_path(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == 0 || slash == std::string::npos) return "/";
  return path.substr(0, slash);
}

std::optional<std::string> canonical_path(const Caller& who, std::string_view path) {
  if (path.empty()) return std::nullopt;
  if (path[0] == '@') {
    if (path == "@introduceDomain" || path == "@releaseDomain") return std::string(path);
    return std::nullopt;
  }
  std::string full = path[0] == '/' ? std::string(path) : domain_home(who.domid) + "/" + std::string(path);
  if (full.size() > kMaxPathLength) return std::nullopt;
  if (!std::all_of(full.begin(), full.end(), valid_node_char)) return std::nullopt;
  if (full.find("//") != std::string::npos) return std::nullopt;
  if (full.size() > 1 && full.back() == '/') return std::nullopt;
  return full;
}

Access effective_access(const Caller& who, const NodePermissions& perms) {
  if (who.privileged() || perms.empty()) return Access::both;
  if (perms[0].domid == who.domid) return Access::both;
  for (std::size_t i = 1; i < perms.size(); ++i)
    if (perms[i].domid == who.domid) return perms[i].access;
  return perms[0].access;
}

bool allows_read(Access a) { return a == Access::read || a == Access::both; }
bool allows_write(Access a) { return a == Access::write || a == Access::both; }

std::optional<NodePermissions> parse_perms(const std::vector<std::string_view>& fields) {
  NodePermissions perms;
  for (auto f : fields) {
    if (f.size() < 2) return std::nullopt;
    Access a;
    switch (f[0]) {
      case 'n': a = Access::none; break;
      case 'r': a = Access::read; break;
      case 'w': a = Access::write; break;
      case 'b': a = Access::both; break;
      default: return std::nullopt;
    }
    unsigned value = 0;
    const auto digits = f.substr(1);
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (ec != std::errc{} || end != digits.data() + digits.size() || value > 0x7FF0)
      return std::nullopt;
    perms.push_back({static_cast<DomId>(value), a});
  }
  if (perms.empty()) return std::nullopt;
  return perms;
}

std::string format_perm(const NodePermission& p) {
  return std::string(1, static_cast<char>(p.access)) + std::to_string(p.domid);
}

Node* StoreView::find(const std::string& path) {
  auto it = nodes_.find(path);
  return it == nodes_.end() ? nullptr : &it->second;
}

bool StoreView::can_read(const Caller& who, const NodePermissions& perms) const {
  return allows_read(effective_access(who, perms));
}

int StoreView::read(const Caller& who, const std::string& path, std::string& value) {
  touch(path);
  const Node* node = find(path);
  if (!node) return ENOENT;
  if (!can_read(who, node->perms)) return EACCES;
  value = node->value;
  return 0;
}

// Creates `path` and any missing ancestors. Permission is checked on the
// nearest existing ancestor; new nodes inherit its permissions, owned by an
// unprivileged creator (Xen's rule, so a guest owns what it creates).
int StoreView::create_path(const Caller& who, const std::string& path,
                           std::vector<Change>& changes) {
  std::vector<std::string> missing;
  std::string cursor = path;
  while (!find(cursor)) {
    missing.push_back(cursor);
    cursor = parent_path(cursor);
  }
  touch(cursor);
  Node& ancestor = *find(cursor);
  if (!allows_write(effective_access(who, ancestor.perms))) return EACCES;
  if (!who.privileged() && nodes_owned_by(nodes_, who.domid) + missing.size() > kMaxNodesPerDomain)
    return EDQUOT;
  NodePermissions perms = ancestor.perms;
  if (!who.privileged()) {
    perms[0].domid = who.domid;
    // The new owner needs no separate entry of its own.
    std::erase_if(perms, [&, first = true](const NodePermission& p) mutable {
      const bool drop = !first && p.domid == who.domid;
      first = false;
      return drop;
    });
  }
  ancestor.generation = next_generation();  // its children changed
  modify(cursor);
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    nodes_[*it] = Node{"", perms, next_generation()};
    modify(*it);
  }
  // Like xenstored, one event for the requested node: watches above it match
  // it anyway, and the ancestors it had to create are implied.
  changes.push_back({path, perms, false});
  return 0;
}

int StoreView::write(const Caller& who, const std::string& path, std::string_view value,
                     std::vector<Change>& changes) {
  if (value.size() > kMaxPayload) return E2BIG;
  if (Node* node = find(path)) {
    touch(path);
    if (!allows_write(effective_access(who, node->perms))) return EACCES;
    node->value.assign(value);
    node->generation = next_generation();
    modify(path);
    changes.push_back({path, node->perms, false});
    return 0;
  }
  std::vector<Change> created;
  if (int err = create_path(who, path, created)) return err;
  find(path)->value.assign(value);
  changes.insert(changes.end(), created.begin(), created.end());
  return 0;
}

int StoreView::mkdir(const Caller& who, const std::string& path, std::vector<Change>& changes) {
  if (find(path)) {
    touch(path);
    return 0;
  }
  return create_path(who, path, changes);
}

int StoreView::remove(const Caller& who, const std::string& path, std::vector<Change>& changes) {
  if (path == "/") return EINVAL;
  touch(path);
  Node* node = find(path);
  if (!node) return ENOENT;
  if (!allows_write(effective_access(who, node->perms))) return EACCES;
  changes.push_back({path, node->perms, true});
  const std::string prefix = path + "/";
  for (auto it = nodes_.lower_bound(prefix); it != nodes_.end() && it->first.starts_with(prefix);) {
    modify(it->first);
    it = nodes_.erase(it);
  }
  nodes_.erase(path);
  modify(path);
  const std::string parent = parent_path(path);
  if (Node* p = find(parent)) {
    p->generation = next_generation();
    modify(parent);
  }
  return 0;
}

int StoreView::directory(const Caller& who, const std::string& path,
                         std::vector<std::string>& children) {
  touch(path);
  const Node* node = find(path);
  if (!node) return ENOENT;
  if (!can_read(who, node->perms)) return EACCES;
  const std::string prefix = path == "/" ? "/" : path + "/";
  for (auto it = nodes_.lower_bound(prefix); it != nodes_.end() && it->first.starts_with(prefix);
       ++it) {
    const std::string_view rest = std::string_view(it->first).substr(prefix.size());
    if (!rest.empty() && rest.find('/') == std::string_view::npos) children.emplace_back(rest);
  }
  return 0;
}

int StoreView::get_perms(const Caller& who, const std::string& path, NodePermissions& perms) {
  touch(path);
  const Node* node = find(path);
  if (!node) return ENOENT;
  if (!can_read(who, node->perms)) return EACCES;
  perms = node->perms;
  return 0;
}

int StoreView::set_perms(const Caller& who, const std::string& path, const NodePermissions& perms,
                         std::vector<Change>& changes) {
  touch(path);
  Node* node = find(path);
  if (!node) return ENOENT;
  // Only the owner (or a privileged domain) may change permissions, and an
  // unprivileged owner may not give the node away.
  if (!who.privileged()) {
    if (owner_of(node->perms) != who.domid) return EACCES;
    if (perms[0].domid != who.domid) return EPERM;
  }
  node->perms = perms;
  node->generation = next_generation();
  modify(path);
  changes.push_back({path, perms, false});
  return 0;
}

Store::Store() {
  const NodePermissions dom0_only{{kDom0, Access::none}};
  const NodePermissions readable{{kDom0, Access::read}};
  nodes_["/"] = Node{"", dom0_only, generation_};
  nodes_["/local"] = Node{"", readable, generation_};
  nodes_["/local/domain"] = Node{"", readable, generation_};
  // Dom0's home is private to it; the toolstack opens up what guests may read.
  nodes_["/local/domain/0"] = Node{"", dom0_only, generation_};
  nodes_["/tool"] = Node{"", dom0_only, generation_};
}

std::uint32_t Store::begin(std::uint32_t owner_conn) {
  std::uint32_t id = next_tx_++;
  if (next_tx_ == 0) next_tx_ = 1;  // 0 means "no transaction" on the wire
  transactions_[{owner_conn, id}] = Transaction{nodes_, nodes_, generation_, {}, {}, {}};
  return id;
}

Store::Transaction* Store::find_transaction(std::uint32_t owner_conn, std::uint32_t id) {
  auto it = transactions_.find({owner_conn, id});
  return it == transactions_.end() ? nullptr : &it->second;
}

int Store::end(std::uint32_t owner_conn, std::uint32_t id, bool commit,
               std::vector<Change>& changes) {
  auto it = transactions_.find({owner_conn, id});
  if (it == transactions_.end()) return ENOENT;
  Transaction tx = std::move(it->second);
  transactions_.erase(it);
  if (!commit) return 0;
  // Conflict: any node the transaction looked at changed in the live tree.
  for (const auto& path : tx.touched) {
    auto live = nodes_.find(path);
    auto base = tx.base.find(path);
    const bool live_exists = live != nodes_.end();
    const bool base_exists = base != tx.base.end();
    if (live_exists != base_exists) return EAGAIN;
    if (live_exists && live->second.generation != base->second.generation) return EAGAIN;
  }
  for (const auto& path : tx.modified) {
    auto mine = tx.snapshot.find(path);
    if (mine == tx.snapshot.end()) {
      nodes_.erase(path);
    } else {
      Node node = mine->second;
      node.generation = ++generation_;
      nodes_[path] = std::move(node);
    }
  }
  changes = std::move(tx.changes);
  return 0;
}

void Store::drop_transactions(std::uint32_t owner_conn) {
  std::erase_if(transactions_, [&](const auto& kv) { return kv.first.first == owner_conn; });
}

std::size_t Store::transactions_of(std::uint32_t owner_conn) const {
  return static_cast<std::size_t>(std::count_if(
      transactions_.begin(), transactions_.end(),
      [&](const auto& kv) { return kv.first.first == owner_conn; }));
}

}  // namespace vib::platform::local
