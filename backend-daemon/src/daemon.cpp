// vibd's main thread: it watches xenstore for devices and drives their
// handshakes, routes the HCAs' asynchronous events to the contexts they
// concern, and closes contexts whose guest process has gone. The contexts'
// rings and queues are served by the fast-path workers and the control pool
// (workers.hpp), so a slow request of one guest never delays another guest.
#include <poll.h>
#include <unistd.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cstring>

#include <map>
#include <optional>
#include <set>

#include "device.hpp"
#include "hca_events.hpp"
#include "instance.hpp"
#include "log.hpp"
#include "provisioner.hpp"
#include "status.hpp"
#include "vib/libxl_ib.hpp"
#include "vib/backend/vibd.hpp"

namespace vib::backend {

using platform::kNoTransaction;

namespace {

unsigned online_cpus() {
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<unsigned>(n) : 1u;
}

class Environment final : public DeviceEnvironment {
 public:
  explicit Environment(const DaemonOptions& options)
      : options_(options),
        store_(platform::open_xenstore(options.xen)),
        mapper_(options.wrap_grant_mapper ? options.wrap_grant_mapper(platform::open_grant_mapper(options.xen))
                                          : platform::open_grant_mapper(options.xen)),
        sharer_(platform::open_grant_sharer(options.xen)),
        cm_(options.cm_timeout),
        wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        control_pool_(options.control_threads ? options.control_threads : 2 * online_cpus()),
        fast_path_(options.workers ? options.workers : online_cpus(), options.max_spin, options.worker_nice, router_,
                   [&options] { return platform::open_event_channels(options.xen); }) {
    if (!wake_fd_) throw std::system_error(errno, std::generic_category(), "eventfd");
    hotplug_.scripts_dir = options.scripts_dir;
    hotplug_.timeout = options.script_timeout;
    // The scripts' xenstore-read/-write find the host-local store this way.
    if (options.xen.kind == platform::XenTarget::Kind::local)
      hotplug_.extra_env.push_back("XENSTORED_PATH=" +
                                   platform::local_xenstore_socket(options.xen.local_dir, options.xen.local_domid));
  }

  platform::XenStore& store() override { return *store_; }
  platform::GrantMapper& mapper() override { return *mapper_; }
  platform::GrantSharer& sharer() override { return *sharer_; }
  platform::Hca& hca(const std::string& name) override {
    auto it = hcas_.find(name);
    if (it == hcas_.end()) it = hcas_.emplace(name, platform::open_hca(name)).first;
    return *it->second;
  }
  const std::string& default_hca() const override { return options_.default_hca; }
  HcaEventRouter& router() override { return router_; }
  CmBroker& cm() override { return cm_; }
  FastPathPool& fast_path() override { return fast_path_; }
  ControlPool& control_pool() override { return control_pool_; }
  const HotplugSettings& hotplug() const override { return hotplug_; }
  void wake() override {
    const std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_.get(), &one, sizeof one);
  }
  int wake_fd() const { return wake_fd_.get(); }
  void clear_wake() {
    std::uint64_t value;
    [[maybe_unused]] auto n = ::read(wake_fd_.get(), &value, sizeof value);
  }
  const std::map<std::string, std::unique_ptr<platform::Hca>>& hcas() const { return hcas_; }

 private:
  const DaemonOptions& options_;
  std::unique_ptr<platform::XenStore> store_;
  std::unique_ptr<platform::GrantMapper> mapper_;
  std::unique_ptr<platform::GrantSharer> sharer_;
  CmBroker cm_;
  HotplugSettings hotplug_;
  platform::UniqueFd wake_fd_;
  HcaEventRouter router_;
  // Devices are gone before their HCAs (Daemon owns the devices).
  std::map<std::string, std::unique_ptr<platform::Hca>> hcas_;
  // Last, destroyed first: the workers let go of every context, then the
  // control pool frees them (with the HCAs and the Xen handles still here).
  ControlPool control_pool_;
  FastPathPool fast_path_;
};

class Daemon {
 public:
  explicit Daemon(const DaemonOptions& options)
      : options_(options),
        env_(options),
        self_(options.xen.kind == platform::XenTarget::Kind::local ? options.xen.local_domid
                                                                    : self_domid(env_.store())),
        instance_(options.xen, env_.store(), self_),
        status_(env_.store(), instance_.dir(), options.status_interval) {
    auto& store = env_.store();
    if (!instance_.replaced().empty())
      log_line(LogLevel::warning, "vibd",
               "replaced the announcement of vibd pid " + instance_.replaced() + ", which stopped without removing it");
    backend_root_ = store.domain_path(self_) + "/backend/" VIBIF_XS_DEVICE_TYPE;
    store.watch(backend_root_, "backend");
    store.watch("@releaseDomain", "release");
    log_line(LogLevel::info, "vibd", "watching " + backend_root_);
    if (options.provision) {
      provisioner_ = std::make_unique<Provisioner>(
          ProvisionerSettings{options.xen, options.stash_dir.value_or(toolstack::kConfigStashDir),
                              options.userdata_dir, options.userdata_wait});
      store.watch("@introduceDomain", "introduce");
      log_line(LogLevel::info, "vibd",
               "provisioning new domains' vib= devices from " + options.stash_dir.value_or(toolstack::kConfigStashDir));
    }
  }

  ~Daemon() {
    if (!devices_.empty()) log_line(LogLevel::info, "vibd", "closing " + std::to_string(devices_.size()) + " devices");
    devices_.clear();
  }

  int run(int stop_fd) {
    // The watches fire once when set: the first pass finds the devices that
    // are already there, then vibd serves.
    bool ready = false;
    for (;;) {
      std::vector<pollfd> fds{{stop_fd, POLLIN, 0}, {env_.store().watch_fd(), POLLIN, 0},
                              {env_.wake_fd(), POLLIN, 0}};
      std::vector<platform::Hca*> hcas;
      for (auto& [name, hca] : env_.hcas()) {
        fds.push_back({hca->async_fd(), POLLIN, 0});
        hcas.push_back(hca.get());
      }
      const int ready_now = ::poll(fds.data(), fds.size(), status_.timeout(counters_move()));
      if (ready_now < 0) {
        if (errno == EINTR) continue;
        log_line(LogLevel::error, "vibd", std::string("poll: ") + std::strerror(errno));
        return 1;
      }
      if (fds[0].revents) {
        notify("STOPPING=1");
        return 0;
      }
      if (ready_now == 0) {
        publish_status();
        continue;
      }
      status_.mark_dirty();
      for (std::size_t i = 0; i < hcas.size(); ++i)
        if (fds[3 + i].revents) env_.router().dispatch_async(*hcas[i]);
      if (fds[2].revents) {
        env_.clear_wake();
        for (auto& [id, device] : devices_) device->close_finished_contexts();
      }
      if (fds[1].revents) on_watch_events();
      // A hotplug script may have finished: its device is refreshed even
      // when the same pass brought watch events for other devices only
      // (they would otherwise swallow the wake-up, and the device would
      // wait for its next event to see its script's end).
      if (fds[2].revents) refresh_hotplugging();
      if (!ready && fds[1].revents) {
        ready = true;
        // Every thread vibd keeps (fast-path workers, CM timer, provisioner)
        // runs by now; scripts and administrators wait for this line.
        log_line(LogLevel::info, "vibd", "ready: serving " + std::to_string(devices_.size()) + " vib devices");
        notify("READY=1");
      }
      publish_status();
    }
  }

 private:
  static platform::DomId self_domid(platform::XenStore& store) {
    auto id = store.read(kNoTransaction, "domid");
    auto v = id ? platform::parse_decimal(*id, 0x7FEF) : std::nullopt;
    return v ? static_cast<platform::DomId>(*v) : platform::kDom0;
  }

  // A change below a device's back-end or front-end directory concerns that
  // device alone: only it is refreshed. Anything else (a device appearing
  // or going, a domain, an event we cannot place) rescans every device. With
  // a thousand contexts open, each of their handshake's writes would
  // otherwise re-read every device's every context.
  void on_watch_events() {
    bool released = false, introduced = false, rescan = false;
    std::set<DeviceId> touched;
    while (auto ev = env_.store().next_watch_event()) {
      released |= ev->token == "release";
      introduced |= ev->token == "introduce";
      if (ev->token == "backend" || ev->token == "frontend") {
        if (auto id = device_of(*ev))
          touched.insert(*id);
        else
          rescan = true;
      }
    }
    if (released) reap_dead_domains();
    if (provisioner_) {
      if (introduced) provisioner_->domains_introduced();
      // After the reaping: the directories go once their contexts are freed.
      if (released) provisioner_->domains_released();
    }
    if (rescan || released || introduced) {
      scan();
      return;
    }
    for (const auto& id : touched) {
      auto it = devices_.find(id);
      if (it == devices_.end() || it->second->superseded()) {
        scan();  // a device came or was re-added: the full walk handles both
        return;
      }
      if (!it->second->refresh()) {
        unwatch(*it->second);
        devices_.erase(it);
      }
    }
  }

  // The known device whose directory (not the directory itself) `ev` is below.
  std::optional<DeviceId> device_of(const platform::WatchEvent& ev) const {
    if (ev.token == "frontend") {
      for (const auto& [id, device] : devices_) {
        const auto& fe = device->frontend_path();
        if (!fe.empty() && ev.path.size() > fe.size() && ev.path.compare(0, fe.size(), fe) == 0 &&
            ev.path[fe.size()] == '/')
          return id;
      }
      return std::nullopt;
    }
    const std::string prefix = backend_root_ + "/";
    if (ev.path.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
    const std::string rest = ev.path.substr(prefix.size());
    const auto slash1 = rest.find('/');
    const auto slash2 = slash1 == std::string::npos ? std::string::npos : rest.find('/', slash1 + 1);
    if (slash2 == std::string::npos) return std::nullopt;  // a domain's or device's own directory
    auto domid = platform::parse_decimal(rest.substr(0, slash1), 0x7FEF);
    auto devid = platform::parse_decimal(rest.substr(slash1 + 1, slash2 - slash1 - 1), 0xFFFF);
    if (!domid || !devid) return std::nullopt;
    const DeviceId id{static_cast<platform::DomId>(*domid), static_cast<unsigned>(*devid)};
    if (!devices_.count(id)) return std::nullopt;
    return id;
  }

  // Every <domid>/<devid> under the back-end root is a device to serve.
  void scan() {
    auto& store = env_.store();
    std::set<DeviceId> present;
    for (const auto& dom : store.directory(kNoTransaction, backend_root_).value_or(std::vector<std::string>{})) {
      auto domid = platform::parse_decimal(dom, 0x7FEF);
      if (!domid || *domid == 0) continue;
      for (const auto& dev : store.directory(kNoTransaction, backend_root_ + "/" + dom).value_or(std::vector<std::string>{})) {
        auto devid = platform::parse_decimal(dev, 0xFFFF);
        if (!devid) continue;
        DeviceId id{static_cast<platform::DomId>(*domid), static_cast<unsigned>(*devid)};
        present.insert(id);
        if (auto old = devices_.find(id); old != devices_.end() && old->second->superseded()) {
          log_line(LogLevel::info, device_subject(id.domid, id.devid), "re-added by the toolstack");
          unwatch(*old->second);
          devices_.erase(old);
        }
        if (!devices_.count(id)) {
          const std::string be = backend_root_ + "/" + dom + "/" + dev;
          auto device = std::make_unique<Device>(env_, id, be);
          // Frontend changes wake us too.
          if (!device->frontend_path().empty()) store.watch(device->frontend_path(), "frontend");
          devices_.emplace(id, std::move(device));
        }
      }
    }
    refresh_devices([](const Device&) { return true; });
  }

  void refresh_hotplugging() {
    refresh_devices([](const Device& device) { return device.hotplug_running(); });
  }

  // Refreshes the devices `which` picks, dropping those that are gone.
  template <typename Which>
  void refresh_devices(Which which) {
    for (auto it = devices_.begin(); it != devices_.end();) {
      if (which(*it->second) && !it->second->refresh()) {
        unwatch(*it->second);
        it = devices_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void unwatch(Device& device) {
    try {
      if (!device.frontend_path().empty()) env_.store().unwatch(device.frontend_path(), "frontend");
    } catch (const std::system_error&) {
    }
  }

  // A guest domain died: its devices lose every resource now, before the
  // toolstack gets round to removing their xenstore directories.
  void reap_dead_domains() {
    auto& store = env_.store();
    for (auto& [id, device] : devices_) {
      if (store.domain_introduced(id.domid)) continue;
      log_line(LogLevel::info, device_subject(id.domid, id.devid), "domain destroyed");
      device->domain_gone();
    }
  }

  // Contexts' counters change without any event reaching the main thread.
  bool counters_move() const {
    return std::any_of(devices_.begin(), devices_.end(), [](const auto& d) { return d.second->context_count() > 0; });
  }

  void notify(const std::string& message) {
    if (options_.notify) options_.notify(message);
  }

  // The status for `xl vib-list -l` (bounded in rate by the publisher) and
  // the one-line summary for `systemctl status vibd`.
  void publish_status() {
    std::size_t connected = 0, contexts = 0;
    for (const auto& [id, device] : devices_) {
      connected += device->connected();
      contexts += device->context_count();
    }
    std::string summary = "serving " + std::to_string(devices_.size()) + " vib devices (" +
                          std::to_string(connected) + " connected), " + std::to_string(contexts) + " guest contexts";
    if (summary != summary_) {
      summary_ = std::move(summary);
      notify("STATUS=" + summary_);
    }
    if (status_.timeout(counters_move()) != 0) return;
    StatusPublisher::Snapshot snapshot;
    for (const auto& [id, device] : devices_)
      snapshot.emplace(std::to_string(id.domid) + "/" + std::to_string(id.devid), device->status());
    status_.publish_if_due(snapshot, counters_move());
  }

  const DaemonOptions& options_;
  Environment env_;
  platform::DomId self_;
  Instance instance_;  // before the devices: its announcement goes after them
  StatusPublisher status_;
  std::string summary_;
  std::string backend_root_;
  std::map<DeviceId, std::unique_ptr<Device>> devices_;
  std::unique_ptr<Provisioner> provisioner_;  // last: it has its own connection and thread
};

}  // namespace

int run_daemon(const DaemonOptions& options, int stop_fd) {
  set_log_style(options.systemd_logging, options.verbose ? LogLevel::debug : LogLevel::info);
  try {
    Daemon daemon(options);
    return daemon.run(stop_fd);
  } catch (const AlreadyRunning& e) {
    log_line(LogLevel::error, "vibd", e.what());
    return kExitAlreadyRunning;
  } catch (const std::exception& e) {
    log_line(LogLevel::error, "vibd", e.what());
    return 1;
  }
}

}  // namespace vib::backend
