// What vibd publishes about the devices it serves, and how a running vibd
// is recognised: the text both sides agree on.
#include <signal.h>

#include <cerrno>
#include <charconv>
#include <sstream>

#include "internal.hpp"
#include "vib/platform/xenbus.hpp"

namespace vib::toolstack {

namespace {

// "key=value key=value": calls f(key, value) for each word.
using detail::context_counters;
using detail::object_fields;

template <typename F>
void for_each_pair(std::string_view text, F&& f) {
  while (!text.empty()) {
    const auto space = text.find(' ');
    const std::string_view word = text.substr(0, space);
    text = space == std::string_view::npos ? std::string_view{} : text.substr(space + 1);
    const auto eq = word.find('=');
    if (eq != std::string_view::npos) f(word.substr(0, eq), word.substr(eq + 1));
  }
}

template <typename T>
void number(std::string_view value, T& out) {
  T v{};
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
  if (ec == std::errc{} && end == value.data() + value.size()) out = v;
}

}  // namespace

std::string vibd_dir(platform::DomId backend) { return "/local/domain/" + std::to_string(backend) + "/libxl/vibd"; }

ObjectCounts& ObjectCounts::operator+=(const ObjectCounts& o) {
  pds += o.pds;
  cqs += o.cqs;
  qps += o.qps;
  srqs += o.srqs;
  mrs += o.mrs;
  ahs += o.ahs;
  return *this;
}

ObjectCounts DeviceStatus::objects() const {
  ObjectCounts sum;
  for (const auto& c : contexts) sum += c.objects;
  return sum;
}

std::uint64_t DeviceStatus::pinned_pages() const {
  std::uint64_t sum = 0;
  for (const auto& c : contexts) sum += c.pinned_pages;
  return sum;
}

std::string format_status(const DeviceStatus& device) {
  std::ostringstream out;
  out << "state=" << device.state << " hca=" << (device.hca.empty() ? "-" : device.hca) << " port=" << device.port;
  object_fields(device.quotas, [&](const char* key, std::uint64_t v) { out << " max-" << key << "=" << v; });
  out << " max-pinned-pages=" << device.max_pinned_pages;
  return out.str();
}

std::string format_status(const ContextStatus& context) {
  std::ostringstream out;
  const char* sep = "";
  auto put = [&](const char* key, auto v) {
    out << sep << key << "=" << v;
    sep = " ";
  };
  object_fields(context.objects, put);
  context_counters(context, put);
  return out.str();
}

DeviceStatus parse_device_status(std::string_view text) {
  DeviceStatus d;
  for_each_pair(text, [&](std::string_view key, std::string_view value) {
    if (key == "state") number(value, d.state);
    else if (key == "hca") d.hca = value == "-" ? "" : std::string(value);
    else if (key == "port") number(value, d.port);
    else if (key == "max-pinned-pages") number(value, d.max_pinned_pages);
    else
      object_fields(d.quotas, [&](const char* k, std::uint64_t& v) {
        if (key.starts_with("max-") && key.substr(4) == k) number(value, v);
      });
  });
  return d;
}

ContextStatus parse_context_status(unsigned id, std::string_view text) {
  ContextStatus c;
  c.id = id;
  for_each_pair(text, [&](std::string_view key, std::string_view value) {
    auto take = [&](const char* k, auto& v) {
      if (key == k) number(value, v);
    };
    object_fields(c.objects, take);
    context_counters(c, take);
  });
  return c;
}

bool Toolstack::vibd_running(platform::DomId backend) {
  const std::string dir = vibd_dir(backend);
  if (store_->read(platform::kNoTransaction, dir + "/state") != "running") return false;
  // A vibd of this domain is a process here: one that crashed left its
  // announcement behind. Another domain's processes cannot be seen.
  if (backend != self_) return true;
  const auto pid = store_->read(platform::kNoTransaction, dir + "/pid");
  const auto v = pid ? platform::parse_decimal(*pid, 0x3fffffff) : std::nullopt;
  if (!v || *v == 0) return true;
  return !(::kill(static_cast<pid_t>(*v), 0) < 0 && errno == ESRCH);
}

}  // namespace vib::toolstack
