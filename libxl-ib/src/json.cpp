// `xl vib-list --json`, generated with YAJL as xl generates its own JSON.
#include <yajl/yajl_gen.h>

#include <memory>

#include "internal.hpp"

namespace vib::toolstack {

namespace {

struct GenFree {
  void operator()(yajl_gen_t* g) const { yajl_gen_free(g); }
};

class Json {
 public:
  explicit Json(bool beautify) : g_(yajl_gen_alloc(nullptr)) {
    if (!g_) throw Error(ErrorCode::failed, "yajl_gen_alloc: out of memory");
    yajl_gen_config(g_.get(), yajl_gen_beautify, beautify ? 1 : 0);
    // The store's values are guest-influenced bytes: never emit invalid JSON.
    yajl_gen_config(g_.get(), yajl_gen_validate_utf8, 1);
  }
  void check(yajl_gen_status s) {
    if (s != yajl_gen_status_ok) throw Error(ErrorCode::failed, "JSON generation failed (" + std::to_string(s) + ")");
  }
  void key(const char* k) { string(k); }
  void string(const std::string& s) {
    auto st = yajl_gen_string(g_.get(), reinterpret_cast<const unsigned char*>(s.data()), s.size());
    if (st == yajl_gen_invalid_string) st = yajl_gen_string(g_.get(), reinterpret_cast<const unsigned char*>("?"), 1);
    check(st);
  }
  void integer(long long v) { check(yajl_gen_integer(g_.get(), v)); }
  void boolean(bool b) { check(yajl_gen_bool(g_.get(), b ? 1 : 0)); }
  void open_map() { check(yajl_gen_map_open(g_.get())); }
  void close_map() { check(yajl_gen_map_close(g_.get())); }
  void open_array() { check(yajl_gen_array_open(g_.get())); }
  void close_array() { check(yajl_gen_array_close(g_.get())); }
  std::string text() {
    const unsigned char* buf = nullptr;
    std::size_t len = 0;
    check(yajl_gen_get_buf(g_.get(), &buf, &len));
    return std::string(reinterpret_cast<const char*>(buf), len);
  }

 private:
  std::unique_ptr<yajl_gen_t, GenFree> g_;
};

void objects(Json& j, const ObjectCounts& o) {
  j.open_map();
  detail::object_fields(o, [&](const char* key, auto v) {
    j.key(key);
    j.integer(static_cast<long long>(v));
  });
  j.close_map();
}

// What vibd published for the device (`xl vib-list -l --json`).
void status(Json& j, const DeviceInfo& d) {
  j.open_map();
  j.key("vibd"); j.string(d.vibd_running ? "running" : "not running");
  if (d.status) {
    const DeviceStatus& s = *d.status;
    j.key("hca"); j.string(s.hca);
    j.key("port"); j.integer(s.port);
    j.key("objects"); objects(j, s.objects());
    j.key("quotas"); objects(j, s.quotas);
    j.key("pinned-pages"); j.integer(static_cast<long long>(s.pinned_pages()));
    j.key("max-pinned-pages"); j.integer(static_cast<long long>(s.max_pinned_pages));
    j.key("contexts");
    j.open_array();
    for (const auto& c : s.contexts) {
      j.open_map();
      j.key("id"); j.integer(c.id);
      j.key("objects"); objects(j, c.objects);
      detail::context_counters(c, [&](const char* key, auto v) {
        j.key(key);
        j.integer(static_cast<long long>(v));
      });
      j.close_map();
    }
    j.close_array();
  }
  j.close_map();
}

}  // namespace

std::string devices_to_json(const std::vector<DeviceInfo>& devices, bool beautify, bool with_status) {
  Json j(beautify);
  j.open_array();
  for (const auto& d : devices) {
    j.open_map();
    j.key("domid"); j.integer(d.domid);
    j.key("devid"); j.integer(d.devid);
    j.key("backend-id"); j.integer(d.backend_domid);
    j.key("handle"); j.integer(d.devid);
    j.key("state"); j.integer(d.state);
    j.key("state-name"); j.string(state_name(d.state));
    j.key("frontend-state"); j.integer(d.frontend_state);
    j.key("online"); j.boolean(d.online);
    j.key("hca"); j.string(d.hca);
    j.key("port"); j.integer(d.port);
    j.key("contexts"); j.integer(d.contexts);
    j.key("backend-path"); j.string(d.backend_path);
    j.key("frontend-path"); j.string(d.frontend_path);
    j.key("hotplug-status"); j.string(d.hotplug_status);
    j.key("error"); j.string(d.error);
    if (with_status) {
      j.key("status");
      status(j, d);
    }
    j.close_map();
  }
  j.close_array();
  std::string out = j.text();
  if (beautify && (out.empty() || out.back() != '\n')) out += '\n';
  return out;
}

}  // namespace vib::toolstack
