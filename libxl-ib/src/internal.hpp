// What the libxl-ib sources share and do not publish.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "vib/libxl_ib.hpp"

namespace vib::toolstack::detail {

struct ConfigScan {
  std::vector<DeviceSpec> specs;
  std::vector<std::string> warnings;
  std::optional<std::string> name;  // the config's name=, if any
};

// parse_config, plus advice about the rest of the domain's config.
ConfigScan scan_config(std::string_view config_text, const std::string& filename);

// Decimal or 0x-hex, no sign, at most `max`.
std::optional<std::uint64_t> parse_number(std::string_view text, std::uint64_t max);

struct ProgramResult {
  int exit_status = -1;  // -1: killed (timeout) or did not start
  bool timed_out = false;
  std::string output;  // stdout and stderr, for error messages
};

// Runs argv[0] with the current environment plus `extra_env` ("K=V"),
// killing it after `timeout`.
ProgramResult run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                          std::chrono::milliseconds timeout);

// The fields of what vibd publishes, by the key both its text
// (format_status) and `xl vib-list --json` use: f(key, field&).
template <typename Counts, typename F>
void object_fields(Counts& c, F&& f) {
  f("pds", c.pds);
  f("cqs", c.cqs);
  f("qps", c.qps);
  f("srqs", c.srqs);
  f("mrs", c.mrs);
  f("ahs", c.ahs);
}
template <typename Context, typename F>
void context_counters(Context& c, F&& f) {
  f("pinned-pages", c.pinned_pages);
  f("requests", c.requests);
  f("request-errors", c.request_errors);
  f("wqes", c.wqes);
  f("completions", c.completions);
  f("completion-errors", c.completion_errors);
  f("last-activity", c.last_activity);
}

// Paths of the three directories of one device.
std::string backend_path(platform::DomId backend, platform::DomId domid, unsigned devid);
std::string frontend_path(platform::DomId domid, unsigned devid);
std::string libxl_path(platform::DomId domid, unsigned devid);

// Parses a back-end path and accepts it only if it is the one of
// (domid, devid) in some back-end domain: a guest-writable "backend" node
// must not point the toolstack at another guest's device.
std::optional<platform::DomId> backend_of(std::string_view path, platform::DomId domid, unsigned devid);

}  // namespace vib::toolstack::detail
