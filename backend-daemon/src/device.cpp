#include "device.hpp"

#include <poll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "log.hpp"

namespace vib::backend {

using platform::kNoTransaction;
using platform::parse_decimal;
using platform::XenbusState;

namespace {

std::string str(XenbusState s) { return std::to_string(static_cast<int>(s)); }

// Three lines per context (connected, closing, freed): 20 contexts' worth
// per LogLimiter period before a guest's churn is summarised.
constexpr unsigned kLifecycleLinesPerPeriod = 60;

// The guest owns its front-end directory, permissions included. A node it
// made unreadable to the back-end's domain is as good as absent; so is one
// the toolstack removed, which a driver domain is told with EACCES, not
// ENOENT (xenstored answers for the parent it may not read). Neither may
// throw out of the device's refresh and take vibd with it.
std::optional<std::string> read_guest_node(platform::XenStore& store, const std::string& path) {
  try {
    return store.read(kNoTransaction, path);
  } catch (const std::system_error& e) {
    if (e.code().value() == EACCES) return std::nullopt;
    throw;
  }
}

std::vector<std::string> list_guest_directory(platform::XenStore& store, const std::string& path) {
  try {
    return store.directory(kNoTransaction, path).value_or(std::vector<std::string>{});
  } catch (const std::system_error& e) {
    if (e.code().value() == EACCES) return {};
    throw;
  }
}

// "a,b,c" of numbers (decimal or 0x hex), each at most `max`.
std::optional<std::vector<std::uint64_t>> parse_list(const std::string& text, std::uint64_t max,
                                                     std::size_t max_items) {
  std::vector<std::uint64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::uint64_t v = 0;
    const bool hex = item.size() > 2 && item[0] == '0' && (item[1] == 'x' || item[1] == 'X');
    const char* first = item.data() + (hex ? 2 : 0);
    auto [end, ec] = std::from_chars(first, item.data() + item.size(), v, hex ? 16 : 10);
    if (item.empty() || ec != std::errc{} || end != item.data() + item.size() || v > max) return std::nullopt;
    out.push_back(v);
    if (out.size() > max_items) return std::nullopt;
  }
  if (out.empty()) return std::nullopt;
  return out;
}

// The guest's memory as vibd sees it: pages the guest granted to us.
class GrantedMemory final : public GuestMemory {
 public:
  GrantedMemory(platform::GrantMapper& mapper, platform::DomId domid) : mapper_(mapper), domid_(domid) {}
  std::unique_ptr<platform::GrantMapping> map(std::span<const platform::GrantRef> refs, bool writable) override {
    return mapper_.map(domid_, refs, writable);
  }
  std::unique_ptr<platform::MemoryAccess> access(std::span<const platform::GrantRef> refs, bool writable) override {
    return mapper_.access(domid_, refs, writable);
  }

 private:
  platform::GrantMapper& mapper_;
  platform::DomId domid_;
};

}  // namespace

std::variant<DeviceConfig, std::string> read_device_config(platform::XenStore& store,
                                                           const std::string& be,
                                                           const std::string& default_hca) {
  DeviceConfig c;
  c.hca = store.read(kNoTransaction, be + "/" VIBIF_XS_HCA).value_or(default_hca);
  if (c.hca.empty() || c.hca.size() > 64) return std::string("bad hca name");
  if (auto port = store.read(kNoTransaction, be + "/" VIBIF_XS_PORT)) {
    auto v = parse_decimal(*port, 255);
    if (!v || *v == 0) return "bad port '" + *port + "'";
    c.port = static_cast<std::uint8_t>(*v);
  }
  if (auto pkeys = store.read(kNoTransaction, be + "/" VIBIF_XS_PKEYS)) {
    auto v = parse_list(*pkeys, 0xffff, VIBIF_MAX_PKEYS);
    if (!v) return "bad pkeys '" + *pkeys + "'";
    c.pkeys.assign(v->begin(), v->end());
  }
  if (auto gids = store.read(kNoTransaction, be + "/" VIBIF_XS_GID_INDICES)) {
    auto v = parse_list(*gids, 255, VIBIF_MAX_GID_INDICES);
    if (!v) return "bad gid-indices '" + *gids + "'";
    c.gid_indices.assign(v->begin(), v->end());
    c.gid_indices_given = true;
  }
  struct QuotaNode {
    const char* key;
    std::uint32_t* value;
  } quotas[] = {{VIBIF_XS_MAX_PDS, &c.max_pds},   {VIBIF_XS_MAX_CQS, &c.max_cqs},
                {VIBIF_XS_MAX_QPS, &c.max_qps},   {VIBIF_XS_MAX_SRQS, &c.max_srqs},
                {VIBIF_XS_MAX_MRS, &c.max_mrs},   {VIBIF_XS_MAX_AHS, &c.max_ahs}};
  for (auto& q : quotas) {
    if (auto text = store.read(kNoTransaction, be + "/" + q.key)) {
      auto v = parse_decimal(*text, 0xffff);
      if (!v) return std::string("bad ") + q.key + " '" + *text + "'";
      *q.value = static_cast<std::uint32_t>(*v);
    }
  }
  if (auto pinned = store.read(kNoTransaction, be + "/" VIBIF_XS_MAX_PINNED_PAGES)) {
    auto v = parse_decimal(*pinned, std::uint64_t{1} << 40);
    if (!v) return "bad max-pinned-pages '" + *pinned + "'";
    c.max_pinned_pages = *v;
  }
  if (auto ip = store.read(kNoTransaction, be + "/" VIBIF_XS_IP)) {
    if (ip->size() > 2048 || !parse_ip_list(*ip)) return "bad ip '" + ip->substr(0, 256) + "'";
    c.ip = *ip;
  }
  return c;
}

std::vector<IpAddress> device_addresses(platform::XenStore& store, const std::string& be, const DeviceConfig& config) {
  if (config.ip) return parse_ip_list(*config.ip).value_or(std::vector<IpAddress>{});
  // <root>/backend/vib/<domid>/<devid> -> <root>/backend/vif/<domid>/*/ip
  const auto vib = be.rfind("/backend/vib/");
  const auto slash = be.rfind('/');
  if (vib == std::string::npos || slash <= vib) return {};
  const std::string vifs = be.substr(0, vib) + "/backend/vif/" + be.substr(vib + 13, slash - vib - 13);
  std::vector<IpAddress> out;
  for (const auto& vif : store.directory(kNoTransaction, vifs).value_or(std::vector<std::string>{})) {
    const auto ip = store.read(kNoTransaction, vifs + "/" + vif + "/ip");
    if (!ip || ip->size() > 2048) continue;
    for (const auto& a : parse_ip_list(*ip).value_or(std::vector<IpAddress>{})) out.push_back(a);
    if (out.size() > 64) break;
  }
  return out;
}

namespace {

// The port as the broker describes it to peers: LID, the GID at the guest's
// index 0, link layer, MTU, the guest's first P_Key.
CmPort cm_port(platform::Hca& hca, const DeviceConfig& config) {
  CmPort port;
  ibv_port_attr attr;
  hca.query_port(config.port, attr);
  port.lid = attr.lid;
  port.link_layer = attr.link_layer;
  port.active_mtu = static_cast<std::uint8_t>(attr.active_mtu);
  ibv_gid gid{};
  try {
    hca.query_gid(config.port, static_cast<int>(config.gid_indices.front()), gid);
  } catch (const std::system_error&) {
  }
  std::copy(std::begin(gid.raw), std::end(gid.raw), port.gid.begin());
  port.pkey = config.pkeys.front();
  return port;
}

// Without gid-indices from the toolstack, a device on an rdma-core HCA
// gets the GIDs of its RDMA-CM addresses after index 0: the GIDs its guest
// must send from to be reached at them through the host's rdma_cm. An
// address becomes a GID once it is on the HCA's network device; one that
// is not (yet) is named, and that peers outside vib cannot reach it.
void add_address_gids(platform::Hca& hca, DeviceConfig& config, const std::vector<IpAddress>& addresses,
                      const std::string& subject) {
  ibv_port_attr attr;
  hca.query_port(config.port, attr);
  for (const auto& ip : addresses) {
    const auto wanted = ip.gid();
    std::optional<std::uint32_t> found;
    for (int i = 0; i < attr.gid_tbl_len; ++i) {
      ibv_gid gid{};
      try {
        hca.query_gid(config.port, i, gid);
      } catch (const std::system_error&) {
        continue;
      }
      if (!std::equal(wanted.begin(), wanted.end(), std::begin(gid.raw))) continue;
      // RoCE v2 where the HCA has both kinds: routable, what rdma_cm uses.
      if (!found || hca.gid_type(config.port, i) == IBV_GID_TYPE_ROCE_V2) found = static_cast<std::uint32_t>(i);
    }
    if (!found) {
      log_line(LogLevel::warning, subject,
               "RDMA-CM address " + ip.str() + " has no GID on " + hca.name() + " port " +
                   std::to_string(config.port) + " (it is not on the HCA's network device): peers outside vib "
                   "cannot reach it");
      continue;
    }
    if (std::find(config.gid_indices.begin(), config.gid_indices.end(), *found) != config.gid_indices.end() ||
        config.gid_indices.size() >= VIBIF_MAX_GID_INDICES)
      continue;
    config.gid_indices.push_back(*found);
    log_line(LogLevel::info, subject,
             "GID index " + std::to_string(*found) + " of " + hca.name() + " (" + ip.str() + ") is the guest's " +
                 std::to_string(config.gid_indices.size() - 1));
  }
}

}  // namespace

Device::Device(DeviceEnvironment& env, DeviceId id, std::string backend_path)
    : env_(env),
      id_(id),
      backend_path_(std::move(backend_path)),
      subject_(device_subject(id.domid, id.devid)),
      guest_log_(subject_),
      lifecycle_log_(std::make_shared<LogLimiter>(subject_, kLifecycleLinesPerPeriod)) {
  frontend_path_ = env_.store().read(kNoTransaction, backend_path_ + "/frontend").value_or("");
  // The toolstack writes this; accept only the path it must be.
  const std::string expected =
      "/local/domain/" + std::to_string(id.domid) + "/device/vib/" + std::to_string(id.devid);
  if (frontend_path_ != expected) {
    fail("frontend path '" + frontend_path_ + "' is not " + expected);
    return;
  }
  auto config = read_device_config(env_.store(), backend_path_, env_.default_hca());
  if (auto* why = std::get_if<std::string>(&config)) {
    fail(*why);
    return;
  }
  config_ = std::get<DeviceConfig>(config);
  quota_ = std::make_shared<DeviceQuota>(*config_);
  if (auto script = env_.store().read(kNoTransaction, backend_path_ + "/script"); script && !script->empty()) {
    script_ = hotplug_script_path(*script, env_.hotplug().scripts_dir);
    if (!script_) {
      fail("bad hotplug script name '" + *script + "'");
      return;
    }
  }
  CmPort port;
  const auto addresses = device_addresses(env_.store(), backend_path_, *config_);
  try {
    hca_ = &env_.hca(config_->hca);
    if (hca_->name() != platform::kSoftHcaName && !config_->gid_indices_given)
      add_address_gids(*hca_, *config_, addresses, subject_);
    port = cm_port(*hca_, *config_);
  } catch (const std::system_error& e) {
    fail(std::string("HCA unusable: ") + e.what());
    return;
  }
  // Only while the directory exists: the toolstack may have removed it
  // (its domain died) since we read the configuration, and these writes
  // must not bring it back.
  write_if_present({{VIBIF_XS_PROTOCOL_VERSIONS, std::to_string(VIBIF_PROTOCOL_VERSION)},
                    {VIBIF_XS_MAX_RING_ORDER, std::to_string(VIBIF_MAX_RING_PAGE_ORDER)},
                    {VIBIF_XS_MAX_CONTEXTS, std::to_string(VIBIF_MAX_CONTEXTS)},
                    {VIBIF_XS_FEATURE_INDIRECT, "1"},
                    {VIBIF_XS_FEATURE_SRQ, "1"},
                    {VIBIF_XS_FEATURE_ATOMICS, "1"},
                    {VIBIF_XS_FEATURE_RETIRES, "1"},
                    {VIBIF_XS_FEATURE_RDMA_CM, "1"},
                    {"state", str(XenbusState::init_wait)}});
  state_ = XenbusState::init_wait;
  std::optional<CmHostView> host_view;
  if (hca_->name() != platform::kSoftHcaName)
    host_view = CmHostView{hca_->name(), config_->port, config_->gid_indices, config_->pkeys};
  env_.cm().add_device(id_, addresses, port, std::move(host_view));
  cm_registered_ = true;
  std::string where;
  for (const auto& ip : addresses) where += " " + ip.str();
  log_line(LogLevel::info, subject_,
           "InitWait on HCA " + hca_->name() + " port " + std::to_string(config_->port) +
               (where.empty() ? ", no RDMA-CM address" : ", RDMA-CM at" + where));
  if (script_) start_hotplug("add");
}

Device::~Device() {
  close_all_contexts("device closed");
  if (cm_registered_) env_.cm().remove_device(id_);
}

void Device::fail(const std::string& why) {
  failed_ = true;
  log_line(LogLevel::error, subject_, why);
  try {
    // The reason in the same transaction: whoever sees the error status
    // finds the reason with it.
    set_state(XenbusState::closed, {{VIBIF_XS_ERROR, why}, {"hotplug-status", "error"}});
  } catch (const std::system_error& e) {
    log_line(LogLevel::warning, subject_, std::string("cannot report the error: ") + e.what());
  }
}

void Device::set_state(XenbusState s, std::vector<std::pair<std::string, std::string>> with) {
  if (s == state_ && with.empty()) return;
  with.emplace_back("state", str(s));
  write_if_present(with);
  if (s != state_)
    log_line(LogLevel::info, subject_,
             std::string(platform::state_name(state_)) + " -> " + std::string(platform::state_name(s)));
  state_ = s;
}

void Device::write_if_present(const std::vector<std::pair<std::string, std::string>>& nodes) {
  auto& store = env_.store();
  platform::with_transaction(store, [&](platform::TransactionId tx) {
    if (!store.directory(tx, backend_path_)) return;
    for (const auto& [key, value] : nodes) store.write(tx, backend_path_ + "/" + key, value);
  });
}

void Device::start_hotplug(const char* action) {
  log_line(LogLevel::info, subject_, std::string("running hotplug script ") + *script_ + " " + action);
  hotplug_ = std::make_unique<HotplugRun>(env_.hotplug(), *script_, action, backend_path_, [this] { env_.wake(); });
}

bool Device::finish_hotplug() {
  if (!hotplug_) return true;
  auto result = hotplug_->result();
  if (!result) return false;
  const std::string what = hotplug_->describe();
  const bool added = hotplug_->action() == "add";
  hotplug_.reset();
  const bool ok = result->exit_status == 0;
  if (!added) {
    if (!ok) log_line(LogLevel::warning, subject_, what + " failed: " + result->output);
    return true;
  }
  if (ok && (domain_gone_ || removed_)) {
    // The device went while it was being added: undo it at once.
    log_line(LogLevel::info, subject_, what + ": connected, but the device is gone");
    start_hotplug("remove");
    return false;
  }
  if (ok) {
    hotplug_added_ = true;
    // A script that succeeded without saying so (Xen's own scripts always
    // write it) still counts.
    if (env_.store().read(kNoTransaction, backend_path_ + "/hotplug-status") != "connected")
      write_if_present({{"hotplug-status", "connected"}});
    log_line(LogLevel::info, subject_, what + ": connected");
    return true;
  }
  std::string why;
  if (result->timed_out) {
    why = "did not finish within " + std::to_string(env_.hotplug().timeout.count()) + " ms";
  } else {
    for (const char* key : {VIBIF_XS_ERROR, "hotplug-error"})
      if (auto text = env_.store().read(kNoTransaction, backend_path_ + "/" + key); text && !text->empty()) {
        why = *text;
        break;
      }
    if (why.empty()) why = result->output;
    if (why.empty()) why = "exit status " + std::to_string(result->exit_status);
  }
  fail(what + " failed: " + why);
  return true;
}

bool Device::superseded() {
  if (state_ == XenbusState::initialising) return false;
  return env_.store().read(kNoTransaction, backend_path_ + "/state") == str(XenbusState::initialising);
}

bool Device::refresh() {
  // xenstore failing on this device (a node of the guest's that is not what
  // it should be, a quota) is this device's problem: logged, rate-limited
  // since the guest can provoke it, and the next event tries again.
  try {
    return refresh_unchecked();
  } catch (const std::system_error& e) {
    guest_log_.log(LogLevel::warning, subject_, std::string("refresh failed: ") + e.what());
    return true;
  }
}

bool Device::refresh_unchecked() {
  auto& store = env_.store();
  if (removed_ || (!store.read(kNoTransaction, backend_path_ + "/state") && !store.directory(kNoTransaction, backend_path_))) {
    if (!removed_) close_all_contexts("back-end directory removed");
    removed_ = true;
    // A script that runs is never cut short, and an "add" is always undone
    // by a "remove": the device stays until they are done (their end wakes
    // the main thread).
    if (!finish_hotplug()) return true;
    if (hotplug_added_) {
      hotplug_added_ = false;
      start_hotplug("remove");
      return true;
    }
    if (script_) remove_script_leftovers();
    log_line(LogLevel::info, subject_, "removed");
    return false;
  }
  if (!finish_hotplug() || failed_) return true;
  const auto online = store.read(kNoTransaction, backend_path_ + "/online");
  const auto frontend = platform::parse_state(read_guest_node(store, frontend_path_ + "/state").value_or(""));
  const bool frontend_gone = !frontend || *frontend == XenbusState::closing || *frontend == XenbusState::closed;
  if (online && *online == "0" && hotplug_added_) {
    // Unplugged: the script undoes its "add" before we report Closed.
    close_all_contexts("device taken offline");
    set_state(XenbusState::closing);
    hotplug_added_ = false;
    start_hotplug("remove");
    return true;
  }
  if ((online && *online == "0") || (frontend_gone && state_ == XenbusState::connected)) {
    close_all_contexts(online && *online == "0" ? "device taken offline" : "front-end closed");
    set_state(frontend && *frontend == XenbusState::closing ? XenbusState::closing : XenbusState::closed);
    if (frontend && *frontend == XenbusState::closed) set_state(XenbusState::closed);
    return true;
  }
  if (state_ == XenbusState::init_wait && (!script_ || hotplug_added_) && frontend &&
      (*frontend == XenbusState::initialised || *frontend == XenbusState::connected))
    set_state(XenbusState::connected);
  if (state_ == XenbusState::connected) refresh_contexts();
  return true;
}

void Device::refresh_contexts() {
  auto& store = env_.store();
  const std::string fe_ctx = frontend_path_ + "/" VIBIF_XS_CTX_DIR;
  const auto names = list_guest_directory(store, fe_ctx);
  std::map<unsigned, XenbusState> wanted;
  std::set<unsigned> present;  // the guest's context nodes, by id
  for (const auto& name : names) {
    auto id = parse_decimal(name, VIBIF_MAX_CTXID - 1);
    // Not a context of ours: ignored, never trusted. Only the canonical
    // spelling names a context ("007" would alias "7").
    if (!id || std::to_string(*id) != name) continue;
    present.insert(static_cast<unsigned>(*id));
    auto st = platform::parse_state(read_guest_node(store, fe_ctx + "/" + name + "/state").value_or(""));
    if (st) wanted[static_cast<unsigned>(*id)] = *st;
  }
  forget_refusals(present);
  // A context vibd closed stays closed while the guest's node still asks
  // for it: reopening it at once would repeat whatever closed it, forever.
  std::erase_if(cut_off_, [&](unsigned id) {
    const auto it = wanted.find(id);
    return it == wanted.end() || it->second != XenbusState::initialised;
  });
  // Contexts the guest closed, or whose nodes vanished.
  std::vector<unsigned> closing;
  for (auto& [id, ctx] : contexts_) {
    auto it = wanted.find(id);
    if (it == wanted.end() || it->second == XenbusState::closing || it->second == XenbusState::closed)
      closing.push_back(id);
  }
  for (unsigned id : closing) close_context(id, "closed by the guest");
  close_orphans(wanted);
  // New contexts.
  for (auto& [id, st] : wanted) {
    if (st != XenbusState::initialised || contexts_.count(id) || cut_off_.count(id)) continue;
    const std::string be_ctx = backend_path_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(id);
    if (store.read(kNoTransaction, be_ctx + "/state")) continue;  // already answered (failed)
    if (contexts_.size() >= VIBIF_MAX_CONTEXTS) {
      store.write(kNoTransaction, be_ctx + "/" VIBIF_XS_ERROR, "too many contexts");
      store.write(kNoTransaction, be_ctx + "/state", str(XenbusState::closed));
      continue;
    }
    try {
      const auto home = env_.fast_path().next_home();
      auto context = make_context(
          std::make_unique<Context>(env_, *config_, *hca_, id_, id, fe_ctx + "/" + std::to_string(id), be_ctx,
                                    quota_, home.events, lifecycle_log_),
          env_.control_pool());
      env_.fast_path().add(context, *hca_, home);
      contexts_[id] = std::move(context);
    } catch (const std::exception& e) {
      guest_log_.log(LogLevel::warning, context_subject(id_.domid, id_.devid, id), std::string("refused: ") + e.what());
      store.write(kNoTransaction, be_ctx + "/" VIBIF_XS_ERROR, e.what());
      store.write(kNoTransaction, be_ctx + "/state", str(XenbusState::closed));
    }
  }
}

void Device::close_orphans(const std::map<unsigned, XenbusState>& wanted) {
  // A context the guest holds connected, whose back-end node says connected
  // too, but that this vibd never opened, belonged to a vibd that died (or
  // was restarted): its ring, queues and HCA objects went with that
  // process. Left as it is, the guest would wait on it forever; closed, its
  // next call fails at once (ENODEV) and the application can open the
  // device again.
  auto& store = env_.store();
  for (const auto& [id, st] : wanted) {
    if (st != XenbusState::connected || contexts_.count(id) || cut_off_.count(id)) continue;
    const std::string be_ctx = backend_path_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(id);
    const auto be_state = platform::parse_state(store.read(kNoTransaction, be_ctx + "/state").value_or(""));
    if (!be_state || *be_state == XenbusState::closed) continue;
    guest_log_.log(LogLevel::info, context_subject(id_.domid, id_.devid, id),
                   "closed: opened by an earlier vibd, whose state of it is lost");
    store.write(kNoTransaction, be_ctx + "/" VIBIF_XS_ERROR, "the back-end (vibd) restarted; this context is lost");
    store.write(kNoTransaction, be_ctx + "/state", str(XenbusState::closed));
  }
}

void Device::forget_refusals(const std::set<unsigned>& present) {
  // What vibd wrote under ctx/ is dom0's (the guest's quota does not bound
  // it): a node stays only while the guest's own node of that id does, so
  // there are never more of them than the guest pays for.
  auto& store = env_.store();
  const std::string be_ctx = backend_path_ + "/" VIBIF_XS_CTX_DIR;
  for (const auto& name : store.directory(kNoTransaction, be_ctx).value_or(std::vector<std::string>{})) {
    const auto id = parse_decimal(name, VIBIF_MAX_CTXID - 1);
    if (id && (present.count(static_cast<unsigned>(*id)) || contexts_.count(static_cast<unsigned>(*id)))) continue;
    try {
      store.remove(kNoTransaction, be_ctx + "/" + name);
    } catch (const std::system_error&) {
    }
  }
}

void Device::close_context(unsigned ctxid, const char* why) {
  auto it = contexts_.find(ctxid);
  if (it == contexts_.end()) return;
  lifecycle_log_->log(LogLevel::info, context_subject(id_.domid, id_.devid, ctxid), std::string("closing: ") + why);
  // Never waits: the worker and the control pool let go on their own, and
  // the last of them hands it to the control pool to be freed.
  it->second->close();
  env_.fast_path().remove(it->second);
  contexts_.erase(it);
  // The back-end's node goes; the guest's node is the guest's to remove.
  try {
    env_.store().remove(kNoTransaction, backend_path_ + "/" VIBIF_XS_CTX_DIR "/" + std::to_string(ctxid));
  } catch (const std::system_error&) {
  }
}

void Device::close_finished_contexts() {
  std::vector<std::pair<unsigned, const char*>> done;
  for (auto& [id, ctx] : contexts_)
    if (const char* why = ctx->finished()) done.emplace_back(id, why);
  for (auto& [id, why] : done) {
    close_context(id, why);
    cut_off_.insert(id);
  }
}

void Device::close_all_contexts(const char* why) {
  while (!contexts_.empty()) close_context(contexts_.begin()->first, why);
}

void Device::domain_gone() {
  domain_gone_ = true;
  close_all_contexts("domain destroyed");
  // An "add" still running is undone when it finishes (finish_hotplug).
  if (hotplug_added_ && !hotplug_) {
    hotplug_added_ = false;
    start_hotplug("remove");
  }
}

void Device::remove_script_leftovers() {
  // A script that finished after the toolstack removed the directory may
  // have written into it again (hotplug-status): nobody else would remove
  // what it brought back. A directory without "state" is such a leftover
  // (the toolstack writes a device's nodes in one transaction). The
  // domain's directory goes with its last device once the domain is dead.
  auto& store = env_.store();
  const std::string domain_dir = backend_path_.substr(0, backend_path_.rfind('/'));
  try {
    platform::with_transaction(store, [&](platform::TransactionId tx) {
      if (store.directory(tx, backend_path_) && !store.read(tx, backend_path_ + "/state"))
        store.remove(tx, backend_path_);
      if (!domain_gone_ || store.domain_introduced(id_.domid)) return;
      if (auto left = store.directory(tx, domain_dir); left && left->empty()) store.remove(tx, domain_dir);
    });
  } catch (const std::system_error& e) {
    log_line(LogLevel::warning, subject_, std::string("cannot remove what its scripts left: ") + e.what());
  }
}

namespace {

vibif_doorbell_page& doorbell_of(platform::GrantMapping& pages) {
  return *reinterpret_cast<vibif_doorbell_page*>(pages.bytes().data());
}

// The keys of a context's node, in the order a refusal names the first bad
// one. A bad or missing key refuses the context; the reason names the key
// and what it must hold, never the guest's text (dom0 keeps the reason).
ContextKeys read_context_keys(platform::XenStore& store, const std::string& fe) {
  auto need = [&](const std::string& key, std::uint64_t max) {
    auto text = store.read(kNoTransaction, fe + "/" + key);
    auto v = text ? parse_decimal(*text, max) : std::nullopt;
    if (!v)
      throw std::runtime_error(key + (text ? ": not" : ": missing, must be") + " a decimal number up to " +
                               std::to_string(max));
    return *v;
  };
  ContextKeys keys;
  const auto order = need(VIBIF_XS_RING_PAGE_ORDER, VIBIF_MAX_RING_PAGE_ORDER);
  if (order == 0) {
    keys.ring_refs.push_back(static_cast<platform::GrantRef>(need(VIBIF_XS_RING_REF, 0xffffffffu)));
  } else {
    for (unsigned i = 0; i < (1u << order); ++i)
      keys.ring_refs.push_back(
          static_cast<platform::GrantRef>(need(VIBIF_XS_RING_REF + std::to_string(i), 0xffffffffu)));
  }
  keys.remote_port = static_cast<platform::EventPort>(need(VIBIF_XS_EVENT_CHANNEL, 0xffffffffu));
  keys.doorbell_ref = static_cast<platform::GrantRef>(need(VIBIF_XS_DOORBELL_REF, 0xffffffffu));
  return keys;
}

// Requests that may take long: they map or unmap guest pages (as much as the
// guest's quota allows), or may block in the HCA. They run on the control
// pool; every other request runs on the fast-path worker at once. A QP's
// transition with an address vector, and an AH, wait for the network only
// where the HCA resolves the destination's MAC (RoCE: the kernel's neighbour
// lookup); on InfiniBand (and the soft HCA) they are table updates, and
// sending them to the pool costs two thread hand-overs per request (measured
// in vib-bench's QP lifecycle, docs/performance.md).
bool may_take_long(const vibif_request& req, bool resolves_paths) {
  switch (req.hdr.op) {
    case VIBIF_OP_REG_MR:
    case VIBIF_OP_DEREG_MR:
    case VIBIF_OP_CREATE_CQ:
    case VIBIF_OP_RESIZE_CQ:
    case VIBIF_OP_DESTROY_CQ:
    case VIBIF_OP_CREATE_QP:
    case VIBIF_OP_DESTROY_QP:
    case VIBIF_OP_CREATE_SRQ:
    case VIBIF_OP_DESTROY_SRQ:
      return true;
    case VIBIF_OP_MODIFY_QP:
      return resolves_paths && (req.u.modify_qp.attr_mask & (IBV_QP_AV | IBV_QP_ALT_PATH)) != 0;
    case VIBIF_OP_CREATE_AH:
      return resolves_paths;
    default:
      return false;
  }
}

// True when the HCA's port resolves addresses on the network (RoCE).
bool port_resolves_paths(platform::Hca& hca, std::uint8_t port) {
  ibv_port_attr attr{};
  hca.query_port(port, attr);
  return attr.link_layer == IBV_LINK_LAYER_ETHERNET;
}

// A registration of at most this many pages (the refs inline in the
// request) is served on the worker, once per pass and context: mapping a
// few pages and registering them costs about what a QP transition does, and
// handing it to the pool and back costs two thread switches each way
// (4 KiB registration and deregistration via vib, docs/performance.md). A
// guest streaming them delays the worker's other contexts by one per pass.
constexpr std::uint64_t kWorkerRegistrationPages = VIBIF_PAGE_LIST_INLINE;

// Requests the control pool serves of one context before it lets others
// have the thread.
constexpr int kControlBatch = 16;
// How often a kick makes the worker ask whether the guest's end of the event
// channel is still there (a process that died without its unmap
// notification reaching us): at most this often per context.
constexpr auto kPeerCheckInterval = std::chrono::milliseconds(50);

}  // namespace

BoundPort::BoundPort(std::shared_ptr<platform::EventChannels> events, platform::DomId remote,
                     platform::EventPort remote_port)
    : events_(std::move(events)), port_(events_->bind_interdomain(remote, remote_port)) {}

BoundPort::~BoundPort() {
  try {
    events_->unbind(port_);
  } catch (const std::exception& e) {
    log_line(LogLevel::warning, "vibd", "unbinding event channel " + std::to_string(port_) + ": " + e.what());
  }
}

// What a refused context's error node says: the key whose value could not
// be used, then why, so the guest's developer knows which one to look at.
template <typename Step>
auto for_key(const char* key, Step step) {
  try {
    return step();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(key) + ": " + e.what());
  }
}

std::shared_ptr<Context> make_context(std::unique_ptr<Context> context, ControlPool& pool) {
  return std::shared_ptr<Context>(context.release(), [&pool](Context* last) {
    // The task owns it now; destroyed when the task is.
    std::shared_ptr<Context> owned(last);
    pool.submit([owned] {});
  });
}

Context::Context(DeviceEnvironment& env, const DeviceConfig& config, platform::Hca& hca, DeviceId device,
                 unsigned ctxid, const std::string& fe, const std::string& be,
                 std::shared_ptr<DeviceQuota> quota, std::shared_ptr<platform::EventChannels> events,
                 std::shared_ptr<LogLimiter> lifecycle_log)
    : env_(env),
      config_(config),
      ctxid_(ctxid),
      subject_(context_subject(device.domid, device.devid, ctxid)),
      lifecycle_log_(std::move(lifecycle_log)),
      resolves_paths_(port_resolves_paths(hca, config.port)),
      keys_(read_context_keys(env.store(), fe)),
      // The process's page, not one of vibd's: a guest then never maps
      // dom0's memory, which its save, restore or migration could not carry.
      doorbell_(for_key(VIBIF_XS_DOORBELL_REF,
                        [&] { return env.mapper().map(device.domid, std::span(&keys_.doorbell_ref, 1), true); })),
      memory_(std::make_unique<GrantedMemory>(env.mapper(), device.domid)),
      mailbox_(std::make_shared<ContextMailbox>()),
      cm_(env.cm().open(device, subject_, [mailbox = mailbox_] { mailbox->wake(); })),
      control_(config_, hca, *memory_, doorbell_of(*doorbell_), subject_,
               [router = &env.router(), mailbox = mailbox_](const void* object, bool added) {
                 if (added)
                   router->add(object, mailbox);
                 else
                   router->remove(object);
               },
               std::move(quota)) {
  control_.set_extension(cm_.get());
  auto& store = env.store();
  port_ = for_key(VIBIF_XS_EVENT_CHANNEL,
                  [&] { return std::make_unique<BoundPort>(std::move(events), device.domid, keys_.remote_port); });
  ring_pages_ = for_key(VIBIF_XS_RING_REF, [&] { return env.mapper().map(device.domid, keys_.ring_refs, true); });
  vibif_ctrl_back_ring_init(&ring_, reinterpret_cast<vibif_ctrl_sring*>(ring_pages_->bytes().data()),
                            ring_pages_->bytes().size());
  // Awake until its worker first puts it to sleep: the guest need not kick.
  __atomic_store_n(&doorbell_of(*doorbell_).backend_polling, 1u, __ATOMIC_RELEASE);
  store.write(kNoTransaction, be + "/state", str(XenbusState::connected));
  lifecycle_log_->log(LogLevel::info, subject_,
                      "connected: " + std::to_string(keys_.ring_refs.size()) + "-page ring, event channel " +
                          std::to_string(port_->port()) + ", doorbell grant " + std::to_string(keys_.doorbell_ref));
}

Context::~Context() {
  env_.cm().close(*cm_);  // the peers of its connections learn it went
  lifecycle_log_->log(LogLevel::info, subject_,
                      "freed: " + control_.free_all() + "; " + std::to_string(requests_) + " requests served (" +
                          std::to_string(handed_over_) + " on the control pool), slept " + std::to_string(sleeps_) +
                          " times");
}

bool Context::guest_alive() const {
  // The guest process's unmap notification cleared this byte: it is gone.
  const auto* alive = reinterpret_cast<const std::uint8_t*>(ring_pages_->bytes().data()) + VIBIF_RING_ALIVE_OFFSET;
  return __atomic_load_n(alive, __ATOMIC_ACQUIRE) != 0;
}

void Context::finish(const char* why) {
  const char* none = nullptr;
  if (finished_.compare_exchange_strong(none, why, std::memory_order_acq_rel)) env_.wake();
}

void Context::respond(const vibif_request& req) {
  // WQEs the guest posted before this request reach the HCA before its
  // response leaves, as a doorbell rung before a verbs call is seen by
  // hardware first: ibv_ud_pingpong posts its receives, moves the QP to
  // RTR, then tells its peer to send, and a UD send that finds no receive
  // at the HCA is dropped.
  control_.service_queues();
  const vibif_response rsp = control_.execute(req);
  std::memcpy(RING_GET_RESPONSE(&ring_, ring_.rsp_prod_pvt), &rsp, sizeof(rsp));
  ring_.rsp_prod_pvt++;
  ++requests_;
}

void Context::push_responses() {
  if (vibif_ctrl_back_push(&ring_)) port_->notify();
}

Context::Ring Context::serve_ring(bool& did) {
  // The producer index is guest-written: read it once, and refuse one that
  // claims more requests than the ring can hold. At most one ring's worth
  // per pass, however fast the guest produces.
  const RING_IDX prod = __atomic_load_n(&ring_.sring->req_prod, __ATOMIC_ACQUIRE);
  if (RING_REQUEST_PROD_OVERFLOW(&ring_, prod)) {
    lifecycle_log_->log(LogLevel::warning, subject_, "request producer beyond the ring: closing");
    return Ring::broken;
  }
  Ring result = Ring::served;
  bool served = false;
  bool registered = false;  // a small registration served in this pass
  while (ring_.req_cons != prod) {
    // Copy the request out of the shared page once; only the copy is read.
    vibif_request req;
    std::memcpy(&req, RING_GET_REQUEST(&ring_, ring_.req_cons), sizeof(req));
    ring_.req_cons++;
    const bool small_registration =
        !registered && control_.is_small_registration(req, kWorkerRegistrationPages);
    registered |= small_registration;
    if (!small_registration && may_take_long(req, resolves_paths_)) {
      in_control_ = true;
      ++handed_over_;
      env_.control_pool().submit([self = shared_from_this(), req] { self->serve_control(req); });
      result = Ring::handed_over;
      break;
    }
    respond(req);
    served = true;
  }
  if (served) push_responses();
  // Asks the guest to notify for the next request, unless one is there.
  if (result == Ring::served && vibif_ctrl_back_final_check(&ring_)) did = true;
  did |= served;
  return result;
}

void Context::serve_control(std::optional<vibif_request> first) {
  bool asleep = false;
  {
    std::lock_guard lock(mu_);
    if (!closing_.load(std::memory_order_acquire)) {
      if (first) respond(*first);
      for (int n = first ? 1 : 0; n < kControlBatch && !closing_.load(std::memory_order_acquire); ++n) {
        const RING_IDX prod = __atomic_load_n(&ring_.sring->req_prod, __ATOMIC_ACQUIRE);
        if (RING_REQUEST_PROD_OVERFLOW(&ring_, prod)) break;  // the worker closes it
        if (ring_.req_cons == prod && !vibif_ctrl_back_final_check(&ring_)) {
          in_control_ = false;
          break;
        }
        if (ring_.req_cons == prod) continue;
        vibif_request req;
        std::memcpy(&req, RING_GET_REQUEST(&ring_, ring_.req_cons), sizeof(req));
        ring_.req_cons++;
        respond(req);
      }
      push_responses();
      // Completions respond() moved may have raised events the guest armed for.
      if (control_.take_guest_notification()) port_->notify();
    } else {
      in_control_ = false;
    }
    if (in_control_) {
      // More waiting: back of the queue, so other contexts get the thread too.
      env_.control_pool().submit([self = shared_from_this()] { self->serve_control(std::nullopt); });
      return;
    }
    // Back to the worker, asleep: the guest's next kick wakes it there, as
    // it would after the worker's own idle pass. Only work that is already
    // waiting needs the worker now: waking it for nothing costs a thread
    // switch that races the guest's own wake-up for the CPU.
    asleep = !closing_.load(std::memory_order_acquire) && sleep_locked();
  }
  // A worker that found mu_ held meanwhile may have taken that kick.
  if (worker_turned_away_.exchange(false, std::memory_order_seq_cst) || !asleep) mailbox_->wake();
}

void Context::kicked() {
  // Its home worker took and unmasked the port; now and then a kick also
  // asks whether the guest's end is still there.
  const auto now = std::chrono::steady_clock::now();
  if (now - last_peer_check_ >= kPeerCheckInterval) {
    last_peer_check_ = now;
    if (port_->peer_closed().value_or(false)) peer_gone_.store(true, std::memory_order_release);
  }
}

Schedulable::Pass Context::pass() {
  if (finished()) return Pass::finished;
  if (!guest_alive()) {
    finish("guest process gone (ring released)");
    return Pass::finished;
  }
  if (peer_gone_.load(std::memory_order_acquire)) {
    finish("guest process gone (event channel closed)");
    return Pass::finished;
  }
  std::unique_lock lock(mu_, std::defer_lock);
  if (!lock_or_leave_word(lock) || in_control_) return Pass::parked;
  bool did = false;
  try {
    const Ring ring = serve_ring(did);
    if (ring == Ring::broken) {
      finish("ring broken by the guest");
      return Pass::finished;
    }
    for (const auto& event : mailbox_->take()) control_.deliver_async_event(event);
    for (const vibif_handle_t id : cm_->take_announcements()) {
      control_.queue_guest_event(VIBIF_EVENT_CM, 0, id);
      did = true;
    }
    did |= control_.service_queues();
    if (control_.take_guest_notification()) port_->notify();
    if (ring == Ring::handed_over) return Pass::parked;
    return did || control_.queues_pending() ? Pass::worked : Pass::idle;
  } catch (const std::exception& e) {
    log_line(LogLevel::error, subject_, std::string("fast path failed: ") + e.what());
    finish("fast path failed");
    return Pass::finished;
  }
}

bool Context::prepare_sleep() {
  std::unique_lock lock(mu_, std::defer_lock);
  if (!lock_or_leave_word(lock) || in_control_) return true;  // parked: the pool wakes it
  return sleep_locked();
}

bool Context::lock_or_leave_word(std::unique_lock<std::mutex>& lock) {
  if (lock.try_lock()) return true;
  // The holder is the control pool finishing a request: it may already have
  // looked at the ring for the last time, and the guest's kick for the next
  // request may be the one this worker just took. Leave word, then try once
  // more: either this worker gets mu_, or the pool has not yet let go and
  // sees the word after it has (serve_control).
  worker_turned_away_.store(true, std::memory_order_seq_cst);
  if (!lock.try_lock()) return false;
  worker_turned_away_.store(false, std::memory_order_relaxed);
  return true;
}

bool Context::sleep_locked() {
  auto& doorbell = doorbell_of(*doorbell_);
  // Tell the guest to kick us, ask the HCA for an event at the next
  // completion, then look once more: whatever arrived before those two
  // stores is seen here, whatever arrives after wakes us.
  __atomic_store_n(&doorbell.backend_polling, 0u, __ATOMIC_SEQ_CST);
  control_.arm_hca_cqs();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  bool late = vibif_ctrl_back_final_check(&ring_) || control_.service_queues() || control_.queues_pending();
  if (control_.take_guest_notification()) port_->notify();
  if (late) {
    __atomic_store_n(&doorbell.backend_polling, 1u, __ATOMIC_SEQ_CST);
    return false;
  }
  ++sleeps_;
  return true;
}

void Context::woke() { __atomic_store_n(&doorbell_of(*doorbell_).backend_polling, 1u, __ATOMIC_SEQ_CST); }

}  // namespace vib::backend
