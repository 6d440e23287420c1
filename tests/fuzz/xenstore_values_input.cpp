#include "xenstore_values_input.hpp"

#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "cm_broker.hpp"
#include "device.hpp"
#include "vib/libxl_ib.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::test {

namespace {

using platform::TransactionId;

// A store that only answers reads, from a map: what read_device_config and
// device_addresses need, without a store server in the fuzzing loop.
class MapStore final : public platform::XenStore {
 public:
  std::map<std::string, std::string, std::less<>> nodes;

  std::optional<std::string> read(TransactionId, std::string_view path) override {
    auto it = nodes.find(path);
    if (it == nodes.end()) return std::nullopt;
    return it->second;
  }
  std::optional<std::vector<std::string>> directory(TransactionId, std::string_view path) override {
    const std::string prefix = std::string(path) + "/";
    std::vector<std::string> out;
    for (auto it = nodes.lower_bound(prefix); it != nodes.end() && it->first.starts_with(prefix); ++it) {
      const std::string rest = it->first.substr(prefix.size());
      const std::string child = rest.substr(0, rest.find('/'));
      if (out.empty() || out.back() != child) out.push_back(child);
    }
    if (out.empty()) return std::nullopt;
    return out;
  }
  void write(TransactionId, std::string_view, std::string_view) override { std::abort(); }
  void mkdir(TransactionId, std::string_view) override { std::abort(); }
  void remove(TransactionId, std::string_view) override { std::abort(); }
  std::optional<platform::NodePermissions> get_permissions(TransactionId, std::string_view) override {
    return std::nullopt;
  }
  void set_permissions(TransactionId, std::string_view, const platform::NodePermissions&) override { std::abort(); }
  TransactionId transaction_start() override { std::abort(); }
  bool transaction_end(TransactionId, bool) override { std::abort(); }
  void watch(std::string_view, std::string_view) override { std::abort(); }
  void unwatch(std::string_view, std::string_view) override { std::abort(); }
  int watch_fd() override { return -1; }
  std::optional<platform::WatchEvent> next_watch_event() override { return std::nullopt; }
  std::string domain_path(platform::DomId domid) override { return "/local/domain/" + std::to_string(domid); }
  bool domain_introduced(platform::DomId) override { return true; }
};

void check(bool invariant) {
  if (!invariant) std::abort();
}

// parse_decimal's promise: digits only, at most 20 of them, within `max`,
// and the value the digits say.
void check_decimal(std::string_view text, std::uint64_t max) {
  const auto v = platform::parse_decimal(text, max);
  if (!v) return;
  check(!text.empty() && text.size() <= 20 && *v <= max);
  std::uint64_t again = 0;
  for (char c : text) {
    check(c >= '0' && c <= '9');
    again = again * 10 + static_cast<std::uint64_t>(c - '0');
  }
  check(again == *v);
}

void check_device_config(MapStore& store, const std::string& be) {
  const auto config = backend::read_device_config(store, be, "soft");
  if (const auto* c = std::get_if<backend::DeviceConfig>(&config)) {
    check(!c->hca.empty() && c->hca.size() <= 64 && c->port >= 1);
    check(!c->pkeys.empty() && c->pkeys.size() <= VIBIF_MAX_PKEYS);
    check(!c->gid_indices.empty() && c->gid_indices.size() <= VIBIF_MAX_GID_INDICES);
    for (auto g : c->gid_indices) check(g <= 255);
    for (auto q : {c->max_pds, c->max_cqs, c->max_qps, c->max_srqs, c->max_mrs, c->max_ahs}) check(q <= 0xffff);
    check(c->max_pinned_pages <= (std::uint64_t{1} << 40));
    if (c->ip) check(c->ip->size() <= 2048 && backend::parse_ip_list(*c->ip));
    const auto addresses = backend::device_addresses(store, be, *c);
    check(addresses.size() <= 65);
  }
}

void check_ip_list(std::string_view text) {
  const auto list = backend::parse_ip_list(text);
  if (!list) return;
  check(list->size() <= 64);
  for (const auto& ip : *list) {
    check(!ip.wildcard());
    // What str() prints parses back to the same address.
    const auto again = backend::IpAddress::parse(ip.str());
    check(again && *again == ip);
  }
}

void check_status(std::string_view text) {
  const auto device = toolstack::parse_device_status(text);
  const auto again = toolstack::parse_device_status(toolstack::format_status(device));
  check(again.state == device.state && again.hca == device.hca && again.port == device.port &&
        again.max_pinned_pages == device.max_pinned_pages);
  const auto context = toolstack::parse_context_status(7, text);
  check(toolstack::parse_context_status(7, toolstack::format_status(context)) == context);
}

void check_spec(std::string_view text) {
  toolstack::DeviceSpec spec;
  try {
    spec = toolstack::parse_spec(text);
  } catch (const toolstack::Error&) {
    return;  // refused, with a reason
  }
  // The normalised spec means the same device.
  const std::string normal = spec.to_string();
  try {
    check(toolstack::parse_spec(normal).to_string() == normal);
  } catch (const toolstack::Error&) {
    std::abort();
  }
}

}  // namespace

void run_xenstore_values_input(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> values;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  for (std::size_t at = 0; at <= input.size() && values.size() < 16;) {
    const std::size_t end = std::min(input.find('\0', at), input.size());
    values.emplace_back(input.substr(at, end - at));
    at = end + 1;
  }

  static const char* const kKeys[] = {VIBIF_XS_HCA,      VIBIF_XS_PORT,     VIBIF_XS_PKEYS,   VIBIF_XS_GID_INDICES,
                                      VIBIF_XS_MAX_PDS,  VIBIF_XS_MAX_CQS,  VIBIF_XS_MAX_QPS, VIBIF_XS_MAX_SRQS,
                                      VIBIF_XS_MAX_MRS,  VIBIF_XS_MAX_AHS,  VIBIF_XS_MAX_PINNED_PAGES,
                                      VIBIF_XS_IP};
  MapStore store;
  const std::string be = "/local/domain/0/backend/vib/5/0";
  for (std::size_t i = 0; i < values.size() && i < std::size(kKeys); ++i)
    if (!(values[i].size() == 1 && values[i][0] == '\x01'))  // "\x01": the node is absent
      store.nodes[be + "/" + kKeys[i]] = values[i];
  if (values.size() > std::size(kKeys)) store.nodes["/local/domain/0/backend/vif/5/0/ip"] = values[std::size(kKeys)];
  check_device_config(store, be);

  for (const auto& v : values) {
    for (std::uint64_t max : {std::uint64_t{8}, std::uint64_t{255}, std::uint64_t{0xffff}, std::uint64_t{0xffffffff},
                              ~std::uint64_t{0}})
      check_decimal(v, max);
    if (auto s = platform::parse_state(v)) check(static_cast<unsigned>(*s) <= 8);
    check_ip_list(v);
    check_status(v);
    check_spec(v);
  }
}

}  // namespace vib::test
