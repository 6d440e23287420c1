// The C API: a handle around Toolstack, every exception turned into a code
// and a message at this boundary.
#include "vib/libxl_ib.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <system_error>

#include "vib/libxl_ib.hpp"

using vib::toolstack::Error;
using vib::toolstack::ErrorCode;

struct vib_tk {
  std::unique_ptr<vib::toolstack::Toolstack> toolstack;
  std::string error;
};

namespace {

int code_of(ErrorCode c) {
  switch (c) {
    case ErrorCode::invalid: return VIB_TK_ERR_INVALID;
    case ErrorCode::not_found: return VIB_TK_ERR_NOT_FOUND;
    case ErrorCode::exists: return VIB_TK_ERR_EXISTS;
    case ErrorCode::timed_out: return VIB_TK_ERR_TIMEDOUT;
    case ErrorCode::backend: return VIB_TK_ERR_BACKEND;
    case ErrorCode::xenstore: return VIB_TK_ERR_XENSTORE;
    case ErrorCode::failed: return VIB_TK_ERR_FAIL;
  }
  return VIB_TK_ERR_FAIL;
}

// Runs body, storing the message of whatever it throws in `error`.
template <typename Body>
int guarded(std::string& error, Body&& body) noexcept {
  try {
    error.clear();
    body();
    return VIB_TK_OK;
  } catch (const Error& e) {
    error = e.what();
    return code_of(e.code());
  } catch (const std::system_error& e) {
    error = e.what();
    return VIB_TK_ERR_XENSTORE;
  } catch (const std::bad_alloc&) {
    error = "out of memory";
    return VIB_TK_ERR_FAIL;
  } catch (const std::exception& e) {
    error = e.what();
    return VIB_TK_ERR_FAIL;
  } catch (...) {
    error = "unknown failure";
    return VIB_TK_ERR_FAIL;
  }
}

void copy_out(const std::string& text, char* buf, std::size_t len) {
  if (!buf || len == 0) return;
  const std::size_t n = std::min(len - 1, text.size());
  std::memcpy(buf, text.data(), n);
  buf[n] = '\0';
}

vib::platform::DomId domid_of(unsigned domid) {
  if (domid > 0x7FEF) throw Error(ErrorCode::invalid, "bad domain id " + std::to_string(domid));
  return static_cast<vib::platform::DomId>(domid);
}

}  // namespace

extern "C" {

int vib_tk_open(vib_tk** out, const char* local_xen_dir, unsigned local_domid,
                char* errbuf, std::size_t errlen) {
  if (!out) return VIB_TK_ERR_INVALID;
  *out = nullptr;
  std::string error;
  std::unique_ptr<vib_tk> tk;
  const int rc = guarded(error, [&] {
    const auto target = local_xen_dir ? vib::platform::XenTarget::local(local_xen_dir, domid_of(local_domid))
                                      : vib::platform::XenTarget::real();
    tk = std::make_unique<vib_tk>();
    tk->toolstack = std::make_unique<vib::toolstack::Toolstack>(target);
  });
  copy_out(error, errbuf, errlen);
  if (rc == VIB_TK_OK) *out = tk.release();
  return rc;
}

void vib_tk_close(vib_tk* tk) { delete tk; }

const char* vib_tk_error(const vib_tk* tk) { return tk ? tk->error.c_str() : "no handle"; }

int vib_spec_check(const char* spec, char* errbuf, std::size_t errlen) {
  std::string error;
  const int rc = guarded(error, [&] { vib::toolstack::parse_spec(spec ? spec : ""); });
  copy_out(error, errbuf, errlen);
  return rc;
}

int vib_tk_resolve_domain(vib_tk* tk, const char* domain, unsigned* domid_out) {
  if (!tk || !domain || !domid_out) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] { *domid_out = tk->toolstack->resolve_domain(domain); });
}

int vib_tk_attach(vib_tk* tk, unsigned domid, const char* spec, unsigned timeout_ms, unsigned* devid_out) {
  if (!tk || !spec) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] {
    vib::toolstack::AttachOptions options;
    options.wait = timeout_ms != 0;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto dev = tk->toolstack->attach(domid_of(domid), vib::toolstack::parse_spec(spec), options);
    if (devid_out) *devid_out = dev.devid;
  });
}

int vib_tk_detach(vib_tk* tk, unsigned domid, unsigned devid, int force, unsigned timeout_ms, int* forced_out) {
  if (!tk) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] {
    vib::toolstack::DetachOptions options;
    options.force = force != 0;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto result = tk->toolstack->detach(domid_of(domid), devid, options);
    if (forced_out) *forced_out = result.forced ? 1 : 0;
  });
}

int vib_tk_list_json(vib_tk* tk, unsigned domid, char** json_out) {
  if (!tk || !json_out) return VIB_TK_ERR_INVALID;
  *json_out = nullptr;
  return guarded(tk->error, [&] {
    const std::string json = vib::toolstack::devices_to_json(tk->toolstack->list(domid_of(domid)));
    *json_out = ::strdup(json.c_str());
    if (!*json_out) throw std::bad_alloc();
  });
}

int vib_tk_provision(vib_tk* tk, unsigned domid, const char* config_text, unsigned* count_out) {
  if (!tk || !config_text) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] {
    auto result = tk->toolstack->provision_from_config(domid_of(domid), config_text);
    if (count_out) *count_out = static_cast<unsigned>(result.devices.size());
  });
}

int vib_tk_provision_domain(vib_tk* tk, unsigned domid, const char* userdata_dir, unsigned wait_ms,
                            unsigned* count_out) {
  if (!tk) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] {
    auto result = tk->toolstack->provision_domain(domid_of(domid), userdata_dir ? userdata_dir : "/var/lib/xen",
                                                  std::chrono::milliseconds(wait_ms));
    if (count_out) *count_out = static_cast<unsigned>(result.devices.size());
  });
}

int vib_tk_cleanup(vib_tk* tk, unsigned* removed_out) {
  if (!tk) return VIB_TK_ERR_INVALID;
  return guarded(tk->error, [&] {
    const unsigned n = tk->toolstack->cleanup_dead_domains();
    if (removed_out) *removed_out = n;
  });
}

}  // extern "C"
