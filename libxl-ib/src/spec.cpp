// `vib=` specs: the items of an xl config's `vib = [ ... ]` list and the
// argument of `xl vib-attach`, "key=value,key=value" like vif=. Values are
// checked here against the same bounds vibd's read_device_config enforces,
// so a spec that parses is one the back-end accepts.
#include <arpa/inet.h>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <sstream>

extern "C" {
#include <libxlutil.h>
}

#include "internal.hpp"
#include "vib/vibif.h"

namespace vib::toolstack {

namespace {

// Bounds of vibd's parser (backend-daemon/src/device.cpp).
constexpr std::uint64_t kMaxQuota = 0xffff;
constexpr std::uint64_t kMaxPinnedPages = std::uint64_t{1} << 40;
constexpr std::uint64_t kMaxPort = 255;
constexpr std::uint64_t kMaxDevid = 0xffff;
constexpr std::size_t kMaxHcaName = 64;

constexpr const char* kKnownKeys =
    "hca, port, devid, backend, pkeys, gid-indices, max-pds, max-cqs, max-qps, max-srqs, max-mrs, "
    "max-ahs, max-pinned-pages, script, ip";

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool is_list_key(std::string_view key) { return key == VIBIF_XS_PKEYS || key == VIBIF_XS_GID_INDICES; }

class SpecParser {
 public:
  explicit SpecParser(std::string_view item) : item_(item) {}

  DeviceSpec parse() {
    // Split on ',' first: values never contain one, except list values,
    // whose further numbers arrive as bare tokens.
    std::vector<std::pair<std::string, std::string>> pairs;
    std::size_t start = 0;
    while (start <= item_.size()) {
      std::size_t end = item_.find(',', start);
      if (end == std::string_view::npos) end = item_.size();
      const std::string_view token = trim(item_.substr(start, end - start));
      start = end + 1;
      if (token.empty()) {
        if (end == item_.size() && pairs.empty()) break;  // '' is a device with every default
        fail("an empty entry (two commas, or a trailing comma)");
      }
      const auto eq = token.find('=');
      if (eq == std::string_view::npos) {
        if (!pairs.empty() && is_list_key(pairs.back().first)) {
          pairs.back().second += ":" + std::string(token);
          continue;
        }
        fail("'" + std::string(token) + "' is not key=value");
      }
      pairs.emplace_back(std::string(trim(token.substr(0, eq))), std::string(trim(token.substr(eq + 1))));
    }
    std::set<std::string> seen;
    for (auto& [key, value] : pairs) {
      if (!seen.insert(key).second) fail("key '" + key + "' given twice");
      apply(key, value);
    }
    return spec_;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw Error(ErrorCode::invalid, "vib spec '" + std::string(item_) + "': " + why);
  }
  [[noreturn]] void bad(const std::string& key, const std::string& value, const std::string& expected) const {
    fail("bad " + key + " '" + value + "' (" + expected + ")");
  }

  std::uint64_t number(const std::string& key, const std::string& value, std::uint64_t min, std::uint64_t max) {
    auto v = detail::parse_number(value, max);
    if (!v || *v < min) bad(key, value, "a number " + std::to_string(min) + ".." + std::to_string(max));
    return *v;
  }

  template <typename T>
  std::vector<T> list(const std::string& key, const std::string& value, std::uint64_t max, std::size_t max_items) {
    std::vector<T> out;
    std::stringstream ss(value);
    std::string part;
    while (std::getline(ss, part, ':')) {
      auto v = detail::parse_number(part, max);
      if (!v) bad(key, value, "numbers 0.." + std::to_string(max) + " separated by ':'");
      out.push_back(static_cast<T>(*v));
    }
    if (out.empty()) bad(key, value, "at least one number");
    if (out.size() > max_items) bad(key, value, "at most " + std::to_string(max_items) + " values");
    return out;
  }

  void apply(const std::string& key, const std::string& value) {
    if (value.empty()) fail("key '" + key + "' has no value");
    if (key == VIBIF_XS_HCA) {
      // The name reaches sysfs paths in the hotplug script: no '/', no '..'.
      bool ok = value.size() <= kMaxHcaName && value != "." && value != "..";
      for (char c : value)
        ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '-' || c == '.');
      if (!ok) bad(key, value, "an HCA name like mlx5_0, rxe0 or soft: letters, digits, '_', '-', '.'");
      spec_.hca = value;
    } else if (key == VIBIF_XS_PORT) {
      spec_.port = static_cast<unsigned>(number(key, value, 1, kMaxPort));
    } else if (key == "devid") {
      spec_.devid = static_cast<unsigned>(number(key, value, 0, kMaxDevid));
    } else if (key == "backend") {
      for (char c : value)
        if (c == '/' || c == ' ' || c < 0x20) bad(key, value, "a domain name or id");
      spec_.backend = value;
    } else if (key == VIBIF_XS_PKEYS) {
      spec_.pkeys = list<std::uint16_t>(key, value, 0xffff, VIBIF_MAX_PKEYS);
    } else if (key == VIBIF_XS_GID_INDICES) {
      spec_.gid_indices = list<std::uint8_t>(key, value, 255, VIBIF_MAX_GID_INDICES);
    } else if (key == VIBIF_XS_MAX_PDS) {
      spec_.max_pds = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_CQS) {
      spec_.max_cqs = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_QPS) {
      spec_.max_qps = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_SRQS) {
      spec_.max_srqs = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_MRS) {
      spec_.max_mrs = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_AHS) {
      spec_.max_ahs = static_cast<std::uint32_t>(number(key, value, 0, kMaxQuota));
    } else if (key == VIBIF_XS_MAX_PINNED_PAGES) {
      spec_.max_pinned_pages = number(key, value, 0, kMaxPinnedPages);
    } else if (key == VIBIF_XS_IP) {
      // Space-separated addresses, as vif's ip=; vibd's parser takes the same.
      std::size_t at = 0;
      while (at < value.size()) {
        std::size_t end = value.find(' ', at);
        if (end == std::string::npos) end = value.size();
        const std::string one = value.substr(at, end - at);
        unsigned char bytes[16];
        if (!one.empty()) {
          if (::inet_pton(AF_INET, one.c_str(), bytes) != 1 && ::inet_pton(AF_INET6, one.c_str(), bytes) != 1)
            bad(key, value, "IPv4 or IPv6 addresses separated by spaces");
          spec_.ip.push_back(one);
        }
        at = end + 1;
      }
      if (spec_.ip.empty() || spec_.ip.size() > 64) bad(key, value, "1 to 64 addresses");
    } else if (key == "script") {
      for (char c : value)
        if (c < 0x20) bad(key, value, "a script name or path");
      spec_.script = value;
    } else {
      fail("unknown key '" + key + "' (known: " + kKnownKeys + ")");
    }
  }

  std::string_view item_;
  DeviceSpec spec_;
};

std::string hex16(std::uint16_t v) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "0x%04x", static_cast<unsigned>(v));
  return buf;
}

template <typename T, typename F>
std::string join(const std::vector<T>& values, const char* sep, F format) {
  std::string out;
  for (const auto& v : values) {
    if (!out.empty()) out += sep;
    out += format(v);
  }
  return out;
}

// libxlutil's handle, and the memory stream its reports go to: the stream
// must outlive the handle.
class XluConfig {
 public:
  explicit XluConfig(const std::string& filename) {
    report_ = ::open_memstream(&report_buf_, &report_len_);
    if (!report_) throw Error(ErrorCode::failed, "open_memstream failed");
    cfg_ = xlu_cfg_init(report_, filename.c_str());
    if (!cfg_) throw Error(ErrorCode::failed, "xlu_cfg_init: out of memory");
  }
  ~XluConfig() {
    if (cfg_) xlu_cfg_destroy(cfg_);
    if (report_) std::fclose(report_);
    std::free(report_buf_);
  }
  XluConfig(const XluConfig&) = delete;
  XluConfig& operator=(const XluConfig&) = delete;

  XLU_Config* get() { return cfg_; }
  std::string report() {
    std::fflush(report_);
    std::string text(report_buf_ ? report_buf_ : "", report_len_);
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return text;
  }

 private:
  FILE* report_ = nullptr;
  char* report_buf_ = nullptr;
  std::size_t report_len_ = 0;
  XLU_Config* cfg_ = nullptr;
};

}  // namespace

namespace detail {

std::optional<std::uint64_t> parse_number(std::string_view text, std::uint64_t max) {
  const bool hex = text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X');
  if (hex) text.remove_prefix(2);
  if (text.empty() || text.size() > 20) return std::nullopt;
  std::uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v, hex ? 16 : 10);
  if (ec != std::errc{} || end != text.data() + text.size() || v > max) return std::nullopt;
  return v;
}

ConfigScan scan_config(std::string_view config_text, const std::string& filename) {
  XluConfig cfg(filename);
  const std::string text(config_text);
  if (text.size() > 0x7fffffff) throw Error(ErrorCode::invalid, filename + ": too large");
  if (int e = xlu_cfg_readdata(cfg.get(), text.c_str(), static_cast<int>(text.size())); e != 0) {
    const std::string why = cfg.report();
    throw Error(ErrorCode::invalid, why.empty() ? filename + ": " + std::strerror(e) : why);
  }
  ConfigScan scan;
  if (const char* name = nullptr; xlu_cfg_get_string(cfg.get(), "name", &name, /*dont_warn=*/1) == 0 && name)
    scan.name = name;
  XLU_ConfigList* list = nullptr;
  int count = 0;
  const int rc = xlu_cfg_get_list(cfg.get(), "vib", &list, &count, /*dont_warn=*/1);
  if (rc == ESRCH) return scan;
  if (rc != 0) throw Error(ErrorCode::invalid, filename + ": vib= must be a list: vib = [ 'hca=soft', ... ]");
  for (int i = 0; i < count; ++i) {
    const char* item = xlu_cfg_get_listitem(list, i);
    if (!item) throw Error(ErrorCode::invalid, filename + ": vib= item " + std::to_string(i) + " is not a string");
    scan.specs.push_back(parse_spec(item));
  }
  // Memory registration needs grant entries; Xen's default (64 frames,
  // 32768 grants) suits most guests, a lowered limit does not.
  long frames = 0;
  if (!scan.specs.empty() && xlu_cfg_get_long(cfg.get(), "max_grant_frames", &frames, 1) == 0 && frames < 64)
    scan.warnings.push_back(filename + ": max_grant_frames=" + std::to_string(frames) +
                            " limits how much memory the guest can register with its vib devices; 64 or more "
                            "is recommended");
  return scan;
}

}  // namespace detail

DeviceSpec parse_spec(std::string_view item) { return SpecParser(item).parse(); }

std::vector<DeviceSpec> parse_config(std::string_view config_text, const std::string& filename) {
  return detail::scan_config(config_text, filename).specs;
}

std::vector<std::pair<std::string, std::string>> DeviceSpec::backend_keys() const {
  std::vector<std::pair<std::string, std::string>> keys;
  if (hca) keys.emplace_back(VIBIF_XS_HCA, *hca);
  keys.emplace_back(VIBIF_XS_PORT, std::to_string(port));
  if (!pkeys.empty()) keys.emplace_back(VIBIF_XS_PKEYS, join(pkeys, ",", hex16));
  if (!gid_indices.empty())
    keys.emplace_back(VIBIF_XS_GID_INDICES,
                      join(gid_indices, ",", [](std::uint8_t v) { return std::to_string(unsigned{v}); }));
  const std::pair<const char*, const std::optional<std::uint32_t>*> quotas[] = {
      {VIBIF_XS_MAX_PDS, &max_pds}, {VIBIF_XS_MAX_CQS, &max_cqs}, {VIBIF_XS_MAX_QPS, &max_qps},
      {VIBIF_XS_MAX_SRQS, &max_srqs}, {VIBIF_XS_MAX_MRS, &max_mrs}, {VIBIF_XS_MAX_AHS, &max_ahs}};
  for (const auto& [key, value] : quotas)
    if (*value) keys.emplace_back(key, std::to_string(**value));
  if (max_pinned_pages) keys.emplace_back(VIBIF_XS_MAX_PINNED_PAGES, std::to_string(*max_pinned_pages));
  if (script) keys.emplace_back("script", *script);
  if (!ip.empty()) keys.emplace_back(VIBIF_XS_IP, join(ip, " ", [](const std::string& a) { return a; }));
  return keys;
}

std::string DeviceSpec::to_string() const {
  std::string out;
  auto add = [&](const std::string& key, const std::string& value) {
    if (!out.empty()) out += ",";
    out += key + "=" + value;
  };
  if (devid) add("devid", std::to_string(*devid));
  if (backend != "0") add("backend", backend);
  for (auto [key, value] : backend_keys()) {
    // Lists print with ':' so the result parses back as one item.
    for (auto& c : value)
      if (c == ',') c = ':';
    add(key, value);
  }
  return out;
}

}  // namespace vib::toolstack
