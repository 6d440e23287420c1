// One context's verbs objects and both of its paths: the control path
// (requests from the ring, executed on the HCA) and the fast path (work
// queues and completion queues in guest pages, a doorbell page, no round
// trip). Independent of Xen and of threads, so it is tested and fuzzed on its
// own; the Context runs it on its worker thread.
#pragma once

#include <bitset>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "guest_memory.hpp"
#include "handle_table.hpp"
#include "log.hpp"
#include "quota.hpp"
#include "stats.hpp"
#include "vib/platform/hca.hpp"
#include "vib/vibif.h"

namespace vib::backend {

// The device's configuration, as the toolstack wrote it (defaults applied).
struct DeviceConfig {
  std::string hca;
  std::uint8_t port = VIBIF_DEFAULT_PORT;
  std::vector<std::uint16_t> pkeys{VIBIF_DEFAULT_PKEY};
  std::vector<std::uint32_t> gid_indices{0};
  bool gid_indices_given = false;  // the toolstack wrote gid-indices (else vibd may add its addresses' GIDs)
  std::uint32_t max_pds = VIBIF_DEFAULT_MAX_PDS;
  std::uint32_t max_cqs = VIBIF_DEFAULT_MAX_CQS;
  std::uint32_t max_qps = VIBIF_DEFAULT_MAX_QPS;
  std::uint32_t max_srqs = VIBIF_DEFAULT_MAX_SRQS;
  std::uint32_t max_mrs = VIBIF_DEFAULT_MAX_MRS;
  std::uint32_t max_ahs = VIBIF_DEFAULT_MAX_AHS;
  std::uint64_t max_pinned_pages = VIBIF_DEFAULT_MAX_PINNED_PAGES;
  std::optional<std::string> ip;  // the "ip" node as written (RDMA-CM addresses)
};

// An address vector from the HCA in the guest's terms: its port 1, and the
// source GID as its index into `gid_indices` (the device's GID indices, in
// the guest's order); false if that GID is not among them.
bool guest_ah_attr(const ibv_ah_attr& in, const std::vector<std::uint32_t>& gid_indices, vibif_ah_attr& out);

// Told when HCA objects of the context appear and go, so that the HCA's
// completion and asynchronous events (which name the HCA object) find the
// context's worker.
using HcaObjectListener = std::function<void(const void* hca_object, bool added)>;

// Operations a context serves beside its verbs objects (connection
// management): ControlPath hands them over unchanged.
class ControlExtension {
 public:
  virtual ~ControlExtension() = default;
  virtual bool handles(std::uint16_t op) const = 0;
  // Never throws; every failure is a status in the response.
  virtual vibif_response execute(const vibif_request& req) = 0;
};

class ControlPath {
 public:
  ControlPath(const DeviceConfig& config, platform::Hca& hca, GuestMemory& memory,
              vibif_doorbell_page& doorbell, std::string subject, HcaObjectListener listener = {},
              std::shared_ptr<DeviceQuota> quota = {});  // the device's; none: one of its own
  ~ControlPath();
  ControlPath(const ControlPath&) = delete;
  ControlPath& operator=(const ControlPath&) = delete;

  // Never throws; every failure is a status in the response.
  vibif_response execute(const vibif_request& req);
  // True for a registration or deregistration of at most `max_pages` pages
  // whose refs travel inline (nothing to map first but the pages): the
  // cost of a QP transition, not of a large region. A deregistration of a
  // handle that names nothing counts as small (it is refused at once).
  bool is_small_registration(const vibif_request& req, std::uint64_t max_pages);
  // Serves the ops `extension` handles (not owned; it outlives this).
  void set_extension(ControlExtension* extension) { extension_ = extension; }
  // Queues an event for the guest on the doorbell page (the worker notifies).
  void queue_guest_event(std::uint16_t type, std::uint16_t event, vibif_handle_t handle) {
    push_event(type, event, handle);
  }
  // Counters of this context (see ContextStats): readable from any thread.
  const ContextStats& stats() const { return stats_; }

  // The fast path, one pass: consumes the WQEs the guest posted, moves the
  // HCA's completions into the guest's CQs (raising completion events for
  // armed CQs). Returns true when it did anything.
  bool service_queues();
  // True when a queue has WQEs the HCA could take now: a reason not to sleep.
  bool queues_pending() const;
  // Before sleeping: asks the HCA for an event at the next completion of any
  // CQ, so the worker wakes for it.
  void arm_hca_cqs();
  // An asynchronous event of one of this context's HCA objects, or of its
  // port (which may have changed the P_Key table).
  void deliver_async_event(const platform::AsyncEvent& event);
  // True once after the fast path queued events for the guest: time to
  // notify its event channel.
  bool take_guest_notification() { return std::exchange(notify_guest_, false); }

  // Frees every object; returns what was freed, for the log.
  std::string free_all();
  std::size_t pds() const { return pds_.size(); }
  std::size_t ahs() const { return ahs_.size(); }
  std::size_t mrs() const { return mrs_.size(); }
  std::size_t cqs() const { return cqs_.size(); }
  std::size_t qps() const { return qps_.size(); }
  std::size_t srqs() const { return srqs_.size(); }
  std::uint64_t pinned_pages() const { return pinned_pages_; }

 private:
  // A registration: the HCA's MR, which holds the guest's pages.
  struct GuestMr {
    std::unique_ptr<platform::MemoryRegion> mr;
    std::uint64_t page_count = 0;
  };
  // A CQ: the guest's CQE buffer (written by us) and the HCA's CQ feeding it.
  struct GuestCq {
    std::unique_ptr<platform::GrantMapping> ring;
    std::unique_ptr<platform::CompletionQueue> cq;
    vibif_handle_t handle = 0;
    std::uint32_t entries = 0;
    std::uint16_t slot = 0;
    std::uint32_t producer = 0;  // CQEs written; the slot's copy is published
    std::uint32_t users = 0;     // QPs completing into it
    std::uint32_t armed_ack = 0;  // the last arm_sequence answered
    std::uint64_t pages = 0;
    const void* hca_object() const { return cq.get(); }
  };
  struct GuestSrq {
    std::unique_ptr<platform::GrantMapping> ring;  // read-only: we only read WQEs
    std::unique_ptr<platform::SharedReceiveQueue> srq;
    std::uint32_t entries = 0, stride = 0, max_sge = 0;
    std::uint16_t slot = 0;
    std::uint32_t consumer = 0;
    std::uint32_t users = 0;
    bool hca_full = false;
    std::uint64_t pages = 0;
    // The guest's wr_id of each receive handed to the HCA, by table slot:
    // SRQ receives complete in any order, so slots come from a free list.
    std::vector<std::uint64_t> wr_ids;
    std::vector<std::uint32_t> free_slots;
    const void* hca_object() const { return srq.get(); }
  };
  struct GuestQp {
    std::unique_ptr<platform::GrantMapping> buffer;  // read-only
    std::unique_ptr<platform::QueuePair> qp;
    platform::ProtectionDomain* pd = nullptr;
    GuestCq* send_cq = nullptr;
    GuestCq* recv_cq = nullptr;
    GuestSrq* srq = nullptr;
    std::uint8_t qp_type = 0;
    bool sq_sig_all = false;
    vibif_qp_cap cap{};
    std::uint32_t send_stride = 0, recv_stride = 0;
    std::uint64_t recv_offset = 0;
    std::uint16_t sq_slot = 0, rq_slot = 0;
    std::uint32_t sq_consumer = 0, rq_consumer = 0;
    // The guest's wr_id of each WQE handed to the HCA, by WQE index: a
    // queue completes in order, so the slot of index i is free again once
    // the guest polled i's completion (vibif.h, "Queue accounting").
    std::vector<std::uint64_t> sq_wr_ids, rq_wr_ids;
    bool sq_hca_full = false, rq_hca_full = false;
    bool broken = false;  // the guest overran a queue: QP in error, queues ignored
    std::uint64_t pages = 0;
  };

  vibif_response dispatch(const vibif_request& req);
  void count_objects();
  vibif_response reg_mr(const vibif_request& req);
  void create_cq(const vibif_request& req, vibif_response& rsp);
  void resize_cq(const vibif_request& req, vibif_response& rsp);
  void destroy_cq(const vibif_request& req, vibif_response& rsp);
  void create_qp(const vibif_request& req, vibif_response& rsp);
  void modify_qp(const vibif_request& req, vibif_response& rsp);
  void query_qp(const vibif_request& req, vibif_response& rsp);
  void destroy_qp(const vibif_request& req, vibif_response& rsp);
  void create_srq(const vibif_request& req, vibif_response& rsp);
  void modify_srq(const vibif_request& req, vibif_response& rsp);
  void query_srq(const vibif_request& req, vibif_response& rsp);
  void destroy_srq(const vibif_request& req, vibif_response& rsp);
  template <typename Queue>
  void destroy_unused_queue(HandleTable<Queue>& table, vibif_handle_t handle, vibif_response& rsp);

  // Maps a guest page list of exactly `pages` pages; a VIBIF_E* status on failure.
  int map_queue_pages(const vibif_page_list& list, std::uint64_t pages, bool writable,
                      std::unique_ptr<platform::GrantMapping>& out);
  // The guest's address vector (port 1, its GID indices) as the HCA's.
  int to_hca_ah_attr(const vibif_ah_attr& in, ibv_ah_attr& out);
  void from_hca_ah_attr(const ibv_ah_attr& in, vibif_ah_attr& out);
  // Guest P_Key index -> the HCA's index of that P_Key, and back, through
  // the HCA's table as last read (every CQE needs it: read once, and again
  // after a port event).
  std::optional<std::uint16_t> hca_pkey_index(std::uint16_t guest_index);
  std::optional<std::uint16_t> guest_pkey_index(std::uint16_t hca_index);
  const std::vector<std::uint16_t>& hca_pkeys();

  std::optional<std::uint16_t> alloc_slot();
  void free_slot(std::uint16_t slot);
  vibif_db_slot& slot(std::uint16_t index) { return doorbell_.slots[index]; }
  void announce(const void* hca_object, bool added) {
    if (listener_) listener_(hca_object, added);
  }

  bool service_send_queue(GuestQp& qp);
  bool service_recv_queue(GuestQp& qp);
  bool service_srq(vibif_handle_t handle, GuestSrq& srq);
  bool drain_completions(GuestCq& cq);
  void break_qp(GuestQp& qp, const char* why);
  void push_event(std::uint16_t type, std::uint16_t event, vibif_handle_t handle);
  // Writes one guest CQE: the HCA's completion with the guest's wr_id and
  // the queue slots it retires.
  bool write_cqe(GuestCq& cq, const ibv_wc& wc, std::uint8_t wq, std::uint32_t wqe_counter);
  // The guest's view of a completion of our HCA (whose wr_id is ours): false
  // when it belongs to no live QP of the context.
  bool to_guest_completion(ibv_wc& wc, std::uint8_t& wq, std::uint32_t& wqe_counter);
  void fail_wqe(GuestCq& cq, std::uint64_t wr_id, ibv_wc_opcode opcode, std::uint32_t qp_num, std::uint8_t wq,
                std::uint32_t wqe_counter);

  const DeviceConfig& config_;
  platform::Hca& hca_;
  GuestMemory& memory_;
  vibif_doorbell_page& doorbell_;
  std::string subject_;
  HcaObjectListener listener_;
  LogLimiter guest_log_;  // what the guest's requests and queues make us log
  ControlExtension* extension_ = nullptr;
  std::uint64_t pinned_pages_ = 0;
  QuotaShare quota_;  // this context's part of the device's quotas
  std::bitset<VIBIF_DB_SLOTS> slots_used_;
  std::uint32_t event_producer_ = 0;
  bool notify_guest_ = false;
  std::uint64_t events_dropped_ = 0;
  std::optional<std::vector<std::uint16_t>> hca_pkeys_;  // host order; unset: read it
  ContextStats stats_;
  // Declared parents first: members are destroyed children first.
  HandleTable<platform::ProtectionDomain> pds_;
  HandleTable<platform::AddressHandle> ahs_;
  HandleTable<GuestMr> mrs_;
  HandleTable<GuestCq> cqs_;
  HandleTable<GuestSrq> srqs_;
  HandleTable<GuestQp> qps_;
  std::unordered_map<std::uint32_t, GuestQp*> qps_by_num_;  // HCA completions name QPs by number
};

}  // namespace vib::backend
