// Xenbus conventions both ends of a split device share: the state values of
// xen/io/xenbus.h, and strict parsing of the numbers found in xenstore.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <string_view>

namespace vib::platform {

enum class XenbusState : int {
  unknown = 0,
  initialising = 1,
  init_wait = 2,
  initialised = 3,
  connected = 4,
  closing = 5,
  closed = 6,
};

// Decimal, no sign, no spaces, no trailing text, at most `max`. Every number
// read from a node another domain can write goes through this.
inline std::optional<std::uint64_t> parse_decimal(std::string_view text, std::uint64_t max) {
  std::uint64_t value = 0;
  if (text.empty() || text.size() > 20) return std::nullopt;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value > max) return std::nullopt;
  return value;
}

inline std::optional<XenbusState> parse_state(std::string_view text) {
  auto v = parse_decimal(text, 8);
  if (!v) return std::nullopt;
  return static_cast<XenbusState>(*v);
}

inline std::string_view state_name(XenbusState s) {
  switch (s) {
    case XenbusState::initialising: return "Initialising";
    case XenbusState::init_wait: return "InitWait";
    case XenbusState::initialised: return "Initialised";
    case XenbusState::connected: return "Connected";
    case XenbusState::closing: return "Closing";
    case XenbusState::closed: return "Closed";
    default: return "Unknown";
  }
}

}  // namespace vib::platform
