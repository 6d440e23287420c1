// One vib device of one guest, and the per-process contexts opened on it.
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "cm_broker.hpp"
#include "control.hpp"
#include "device_id.hpp"
#include "hca_events.hpp"
#include "hotplug.hpp"
#include "log.hpp"
#include "vib/libxl_ib.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/hca.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"
#include "vib/vibif.h"
#include "workers.hpp"

namespace vib::backend {

// What the daemon gives every device: the Xen it runs on and its HCAs.
class DeviceEnvironment {
 public:
  virtual ~DeviceEnvironment() = default;
  virtual platform::XenStore& store() = 0;
  virtual platform::GrantMapper& mapper() = 0;
  virtual platform::GrantSharer& sharer() = 0;
  // Shared by the devices using it; throws std::system_error if absent.
  virtual platform::Hca& hca(const std::string& name) = 0;
  virtual const std::string& default_hca() const = 0;
  virtual HcaEventRouter& router() = 0;
  // The guests' connection manager (RDMA-CM), shared by every device.
  virtual CmBroker& cm() = 0;
  virtual FastPathPool& fast_path() = 0;
  virtual ControlPool& control_pool() = 0;
  virtual const HotplugSettings& hotplug() const = 0;
  // Called from another thread when the main thread has something to pick
  // up: a context's worker found its guest process gone (see
  // Device::close_finished_contexts), or a hotplug script finished.
  virtual void wake() = 0;
};

// Reads and checks the configuration; on a bad value, returns the reason.
std::variant<DeviceConfig, std::string> read_device_config(platform::XenStore& store,
                                                           const std::string& backend_path,
                                                           const std::string& default_hca);
// The addresses a device's guest answers at for RDMA-CM: the device's "ip"
// node, else the "ip" nodes of the guest's vifs served by the same domain.
std::vector<IpAddress> device_addresses(platform::XenStore& store, const std::string& backend_path,
                                        const DeviceConfig& config);

class Context;

// An event channel port bound through a handle other ports share (a
// fast-path worker's): unbound when this goes, the handle stays.
class BoundPort {
 public:
  BoundPort(std::shared_ptr<platform::EventChannels> events, platform::DomId remote, platform::EventPort remote_port);
  ~BoundPort();
  BoundPort(const BoundPort&) = delete;
  BoundPort& operator=(const BoundPort&) = delete;
  platform::EventPort port() const { return port_; }
  void notify() { events_->notify(port_); }
  std::optional<bool> peer_closed() { return events_->peer_closed(port_); }

 private:
  std::shared_ptr<platform::EventChannels> events_;
  platform::EventPort port_;
};

class Device {
 public:
  Device(DeviceEnvironment& env, DeviceId id, std::string backend_path);
  ~Device();

  // Advances the handshake from what xenstore says now. Returns false once
  // the device is gone (its back-end directory removed) and may be dropped.
  bool refresh();
  // The toolstack removed this device and added another with the same
  // devid before we looked (its state reads Initialising again): this
  // object must make way for a new one.
  bool superseded();
  // The frontend's domain died: free everything at once.
  void domain_gone();
  // A hotplug script of this device runs (or finished, unseen yet): the
  // main thread's wake-up may be its end.
  bool hotplug_running() const { return hotplug_ != nullptr; }

  void close_context(unsigned ctxid, const char* why);
  // Closes the contexts whose workers found their guest process gone.
  void close_finished_contexts();
  const std::string& frontend_path() const { return frontend_path_; }
  DeviceId id() const { return id_; }
  // What `xl vib-list -l` shows (status.cpp); main thread.
  toolstack::DeviceStatus status() const;
  std::size_t context_count() const { return contexts_.size(); }
  bool connected() const { return state_ == platform::XenbusState::connected; }

 private:
  void fail(const std::string& why);
  // Writes the state (with the nodes `with`, before it) in one transaction.
  void set_state(platform::XenbusState s, std::vector<std::pair<std::string, std::string>> with = {});
  // Writes the nodes in one transaction, only if the back-end directory
  // still exists: a write must never recreate a directory the toolstack
  // has just removed.
  void write_if_present(const std::vector<std::pair<std::string, std::string>>& nodes);
  void start_hotplug(const char* action);
  // Takes the verdict of a finished script; false while one is running.
  bool finish_hotplug();
  bool refresh_unchecked();
  void refresh_contexts();
  // Closes the contexts an earlier vibd opened (the guest and the back-end
  // nodes both say connected, but this vibd holds nothing of them).
  void close_orphans(const std::map<unsigned, platform::XenbusState>& wanted);
  // Removes the back-end's nodes of contexts that are neither open nor
  // still named by the guest (`present`): refusals the guest walked away from.
  void forget_refusals(const std::set<unsigned>& present);
  void close_all_contexts(const char* why);
  // Once the toolstack removed the directory: what a late script wrote
  // there again goes too.
  void remove_script_leftovers();

  DeviceEnvironment& env_;
  DeviceId id_;
  std::string backend_path_;
  std::string frontend_path_;
  std::string subject_;
  LogLimiter guest_log_;  // what the guest's contexts make us log (refusals)
  // Contexts' connected/closing/freed lines: a guest opens and closes
  // contexts as often as it likes, so these are bounded too, more loosely
  // (they are the story an administrator follows).
  std::shared_ptr<LogLimiter> lifecycle_log_;
  platform::XenbusState state_ = platform::XenbusState::initialising;
  bool failed_ = false;
  std::optional<DeviceConfig> config_;
  // Its quotas, charged by all its contexts together (they share it).
  std::shared_ptr<DeviceQuota> quota_;
  std::optional<std::string> script_;  // the hotplug script's path, if configured
  std::unique_ptr<HotplugRun> hotplug_;
  bool hotplug_added_ = false;  // "add" succeeded and "remove" has not run
  bool domain_gone_ = false;    // the frontend's domain died
  bool removed_ = false;        // the back-end directory was removed
  platform::Hca* hca_ = nullptr;
  bool cm_registered_ = false;  // the broker knows this device's addresses
  std::map<unsigned, std::shared_ptr<Context>> contexts_;
  // Contexts vibd closed on its own (a broken ring, the process gone) whose
  // guest node has not left Initialised since; never more than its nodes.
  std::set<unsigned> cut_off_;
};

// What a process wrote in its ctx/<ctxid> node, read once and validated.
struct ContextKeys {
  std::vector<platform::GrantRef> ring_refs;
  platform::EventPort remote_port = 0;
  platform::GrantRef doorbell_ref = 0;  // the process's page, as the ring's are
};

// One guest process's channel: its ring, event channel, doorbell page and
// every verbs object it created, all freed with it.
//
// Threads: the constructor runs on vibd's main thread, which then hands the
// context to a fast-path worker (FastPathPool) and keeps a reference until
// it closes it. The worker alone polls it; a control request that may take
// long goes, with every request after it, to the ControlPool, and the worker
// leaves the context alone (parked) until the pool gives it back: mu_ says
// who holds the ring and the ControlPath. Whoever lets go last hands the
// context to the ControlPool to be destroyed (make_context), so freeing a
// guest's objects never stalls a worker or the main thread.
class Context final : public Schedulable, public std::enable_shared_from_this<Context> {
 public:
  // `events`: the handle of the worker it will be placed on (its home,
  // FastPathPool::next_home), which its port is bound through.
  Context(DeviceEnvironment& env, const DeviceConfig& config, platform::Hca& hca, DeviceId device,
          unsigned ctxid, const std::string& frontend_ctx, const std::string& backend_ctx,
          std::shared_ptr<DeviceQuota> quota, std::shared_ptr<platform::EventChannels> events,
          std::shared_ptr<LogLimiter> lifecycle_log);
  ~Context() override;

  unsigned id() const { return ctxid_; }
  // Its objects and counters now (status.cpp); any thread.
  toolstack::ContextStatus status() const;
  // Set by the worker once the guest process has gone; the reason, for the log.
  const char* finished() const { return finished_.load(std::memory_order_acquire); }
  // The main thread closes it: the control pool stops serving it.
  void close() { closing_.store(true, std::memory_order_release); }

  // Schedulable, on the context's worker (kicked(): its home worker).
  platform::EventPort event_port() const override { return port_->port(); }
  void kicked() override;
  int mailbox_fd() override { return mailbox_->fd(); }
  void consume_mail() override { mailbox_->clear_wake(); }
  void raise_mail() override { mailbox_->wake(); }
  Pass pass() override;
  bool prepare_sleep() override;
  void woke() override;
  bool closed() const override { return closing_.load(std::memory_order_acquire); }

 private:
  enum class Ring { served, handed_over, broken };
  // Executes the requests the guest queued, up to a ring's worth, until one
  // that may take long: that one (copied) goes to the control pool. mu_ held.
  Ring serve_ring(bool& did);
  // On the control pool: `first`, then the ring's requests in order, up to a
  // bounded number; the worker gets the context back when the ring is empty.
  void serve_control(std::optional<vibif_request> first);
  void respond(const vibif_request& req);  // executes and queues the response; mu_ held
  void push_responses();                   // mu_ held
  // prepare_sleep() with mu_ held: by the worker, or by the control pool
  // when it gives the context back.
  bool sleep_locked();
  // The worker's try_lock of mu_; on failure, tells the holder to wake it.
  bool lock_or_leave_word(std::unique_lock<std::mutex>& lock);
  bool guest_alive() const;
  void finish(const char* why);

  DeviceEnvironment& env_;
  DeviceConfig config_;  // a copy: the context may outlive its Device by a little
  unsigned ctxid_;
  std::string subject_;
  std::shared_ptr<LogLimiter> lifecycle_log_;  // the device's, which it may outlive
  bool resolves_paths_;  // RoCE: a QP's path or an AH may wait for the network
  ContextKeys keys_;
  std::unique_ptr<BoundPort> port_;
  std::unique_ptr<platform::GrantMapping> ring_pages_;
  std::unique_ptr<platform::GrantMapping> doorbell_;  // the process's page, as the ring is
  std::unique_ptr<GuestMemory> memory_;  // before control_, which uses it
  std::shared_ptr<ContextMailbox> mailbox_;
  std::shared_ptr<CmEndpoint> cm_;  // before control_, which serves its ops
  std::mutex mu_;  // the ring and control_: the worker's pass or the control pool
  vibif_ctrl_back_ring ring_{};
  bool in_control_ = false;  // the control pool serves the ring; mu_
  // The worker found mu_ held (the pool finishing with the context) and
  // parked it, perhaps consuming the kick for a request the pool will not
  // look at: the pool, once it has let go of mu_, wakes the worker.
  std::atomic<bool> worker_turned_away_{false};
  ControlPath control_;
  std::uint64_t requests_ = 0;
  std::uint64_t sleeps_ = 0;
  std::uint64_t handed_over_ = 0;
  std::chrono::steady_clock::time_point last_peer_check_{};
  std::atomic<bool> peer_gone_{false};
  std::atomic<bool> closing_{false};
  std::atomic<const char*> finished_{nullptr};
};

// Makes a context whose last owner hands it to the control pool to be
// destroyed there.
std::shared_ptr<Context> make_context(std::unique_ptr<Context> context, ControlPool& pool);

}  // namespace vib::backend
