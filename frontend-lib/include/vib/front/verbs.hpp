// libvibfront's verbs: the objects of one vib context, with rdma-core's own
// structs (ibv_qp_attr, ibv_send_wr, ibv_wc, ...) in and out, so a verbs
// library on top only forwards.
//
// Control operations (create, modify, destroy) are requests on the
// context's ring. The data path never waits for the back-end: post_send /
// post_recv write WQEs into granted queue pages and publish a producer
// index in the doorbell page (kicking the event channel only when the
// back-end is not polling); poll_cq reads CQEs the back-end wrote into
// granted CQ pages.
//
// Memory registration is zero copy for any buffer, including ones the
// application allocated itself: the pages under the buffer are granted where
// they are (on real Xen by the vibgrant guest module; without it
// registration is refused with EOPNOTSUPP). See docs/frontend.md.
//
// Errors throw std::system_error with the errno the back-end answered;
// post_* and poll_cq return errno values like libibverbs.
#pragma once

#include <infiniband/verbs.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <unordered_map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "vib/front/channel.hpp"

namespace vib::front {

class Pd;
class Cq;
class Qp;
class Srq;

// An address handle; `verbs` is what ibv_send_wr::wr.ud.ah points to.
struct Ah {
  ibv_ah verbs{};
  vibif_handle_t handle = 0;
  Pd* pd = nullptr;
};

class Device {
 public:
  static std::unique_ptr<Device> open(const ChannelOptions& options);
  ~Device();

  void query_device(ibv_device_attr& attr);
  void query_port(std::uint8_t port, ibv_port_attr& attr);
  // `type`, when given: the entry's enum ibv_gid_type, as the back-end says.
  void query_gid(std::uint8_t port, int index, ibv_gid& gid, int* type = nullptr);
  // In network byte order, as ibv_query_pkey answers.
  void query_pkey(std::uint8_t port, int index, std::uint16_t& pkey);

  std::unique_ptr<Pd> alloc_pd();
  std::unique_ptr<Cq> create_cq(int cqe);

  // The next event the back-end queued (completion or asynchronous), if any.
  std::optional<vibif_event> next_event();
  // Clears the event channel's notifications, then takes every queued event.
  // Control calls wait on the same event channel and consume what arrives
  // while they wait; doing both under the ring's lock means a dispatcher
  // thread never swallows the notification a call is waiting for, and since
  // the queue is drained after the clear, no event queued before it is left
  // without a notification still to come.
  std::vector<vibif_event> take_events();
  // Pollable when the back-end notified; consume_notifications() clears it.
  int event_fd() { return channel_->event_fd(); }
  void consume_notifications() { channel_->consume_notifications(); }

  Channel& channel() { return *channel_; }
  // Whether the back-end has closed this context; nullopt when a control
  // call holds the channel (it will find out itself), so a caller that
  // only watches never waits behind a slow request.
  std::optional<bool> backend_gone();
  // backend_gone() has answered true: no completion will come, and each CQ
  // completes what is still outstanding with IBV_WC_WR_FLUSH_ERR, as an HCA
  // in its fatal state does, so a program polling for a completion ends
  // instead of waiting out its own timeout.
  bool gone() const { return gone_.load(std::memory_order_acquire); }
  // The back-end says which queue slots each completion frees (vibif.h,
  // "Queue accounting"): slots are free when completions are polled.
  bool completion_retires() const { return completion_retires_; }
  // Sends a request; throws on a non-zero status.
  vibif_response call(const vibif_request& request, const char* what);
  // Sends a request; 0 or the errno of the answer (or of no answer), as the
  // verbs calls that return one want.
  int call_errno(const vibif_request& request, vibif_response& response);
  // Destroys the object `handle` with `op` (DESTROY_*, DEREG_MR,
  // DEALLOC_PD): 0, or the errno the back-end answered (EBUSY while other
  // objects use it), leaving the object as it was. On success `handle`
  // becomes 0, which no object has (vibif.h: generations are never 0), so
  // the destructor's release() has nothing left to do.
  int destroy(std::uint16_t op, vibif_handle_t& handle) noexcept;
  // The same for destructors: never throws, and a refusal leaves the object
  // to the back-end, which frees it with the context at the latest.
  void release(std::uint16_t op, vibif_handle_t handle) noexcept;

 private:
  friend class Pd;
  friend class Mr;
  explicit Device(std::unique_ptr<Channel> channel);
  // The next queued event, consumed; mu_ held.
  std::optional<vibif_event> pop_event_locked();

  std::unique_ptr<Channel> channel_;
  std::mutex mu_;  // the ring: verbs calls may come from any thread
  std::uint32_t event_consumer_ = 0;
  bool completion_retires_ = false;
  std::atomic<bool> gone_{false};
};

class Mr {
 public:
  ~Mr();
  // Like ibv_dereg_mr: 0 or the back-end's errno (the MR stays usable).
  int deregister() noexcept { return device_->destroy(VIBIF_OP_DEREG_MR, handle_); }
  std::uint32_t lkey() const { return lkey_; }
  std::uint32_t rkey() const { return rkey_; }
  void* addr() const { return addr_; }
  std::size_t length() const { return length_; }

 private:
  friend class Pd;
  Mr() = default;
  Device* device_ = nullptr;
  // The application's pages under the region, granted in place to the
  // back-end; the grants end after the back-end has deregistered.
  std::unique_ptr<platform::GrantedRange> granted_;
  vibif_handle_t handle_ = 0;
  std::uint32_t lkey_ = 0, rkey_ = 0;
  void* addr_ = nullptr;
  std::size_t length_ = 0;
};

struct QpInit {
  Cq* send_cq = nullptr;
  Cq* recv_cq = nullptr;
  Srq* srq = nullptr;
  ibv_qp_cap cap{};
  ibv_qp_type qp_type = IBV_QPT_RC;
  bool sq_sig_all = false;
};

class Pd {
 public:
  ~Pd();
  // Like ibv_dealloc_pd: EBUSY while MRs, QPs, SRQs or AHs of it live.
  int dealloc() noexcept { return device_.destroy(VIBIF_OP_DEALLOC_PD, handle_); }
  std::unique_ptr<Mr> reg_mr(void* addr, std::size_t length, int access);
  std::unique_ptr<Ah> create_ah(const ibv_ah_attr& attr);
  void destroy_ah(std::unique_ptr<Ah> ah);
  std::unique_ptr<Qp> create_qp(const QpInit& init);
  std::unique_ptr<Srq> create_srq(const ibv_srq_init_attr& init);
  Device& device() { return device_; }
  vibif_handle_t handle() const { return handle_; }

 private:
  friend class Device;
  Pd(Device& device, vibif_handle_t handle) : device_(device), handle_(handle) {}
  Device& device_;
  vibif_handle_t handle_;
};

// A queue in granted pages: `entries` slots of `stride` bytes, indices in a
// doorbell slot. `retired` counts the WQEs whose completions were polled:
// producer - retired is what the application has outstanding.
struct GuestQueue {
  std::byte* base = nullptr;
  std::uint32_t entries = 0, stride = 0;
  std::uint16_t slot = 0;
  std::uint32_t producer = 0;
  std::atomic<std::uint32_t>* retired = nullptr;
};

class Cq {
 public:
  ~Cq();
  // Like ibv_destroy_cq: EBUSY while a QP uses it.
  int destroy() noexcept { return device_.destroy(VIBIF_OP_DESTROY_CQ, handle_); }
  // Like ibv_poll_cq: how many completions were written to out.
  int poll(std::span<ibv_wc> out);
  // Like ibv_req_notify_cq: a completion event for the next completion.
  void request_notify(bool solicited_only);
  void resize(int cqe);
  int capacity() const { return static_cast<int>(entries_); }
  vibif_handle_t handle() const { return handle_; }

 private:
  friend class Device;
  Cq(Device& device) : device_(device) {}
  friend class Qp;
  friend class Pd;
  void attach(const vibif_create_cq_resp& rsp, std::unique_ptr<platform::SharedPages> pages, std::uint32_t entries);
  // Frees the queue slots a polled completion retires; mu_ held.
  void retire(const vibif_cqe& e);
  // After the back-end has gone: flush completions for the work requests
  // of this CQ's queues not completed yet, oldest first per queue, into
  // `out`; how many. mu_ held.
  int flush(std::span<ibv_wc> out);
  Device& device_;
  std::mutex mu_;
  std::unordered_map<std::uint32_t, Qp*> qps_;  // QPs completing here, by number; mu_
  std::unique_ptr<platform::SharedPages> pages_;
  vibif_handle_t handle_ = 0;
  std::uint32_t entries_ = 0;
  std::uint16_t slot_ = 0;
  std::uint32_t consumer_ = 0;
  std::uint32_t arm_sequence_ = 0;
};

class Srq {
 public:
  ~Srq();
  // Like ibv_destroy_srq: EBUSY while a QP uses it.
  int destroy() noexcept { return device_.destroy(VIBIF_OP_DESTROY_SRQ, handle_); }
  int post_recv(const ibv_recv_wr* wr, ibv_recv_wr** bad_wr);
  int modify(const ibv_srq_attr& attr, int attr_mask);
  int query(ibv_srq_attr& attr);
  vibif_handle_t handle() const { return handle_; }

 private:
  friend class Pd;
  Srq(Device& device) : device_(device) {}
  Device& device_;
  std::mutex mu_;
  std::unique_ptr<platform::SharedPages> pages_;
  vibif_handle_t handle_ = 0;
  GuestQueue rq_;
  std::atomic<std::uint32_t> retired_{0};
  std::uint32_t max_sge_ = 0;
  friend class Cq;
};

class Qp {
 public:
  ~Qp();
  // Like ibv_destroy_qp.
  int destroy() noexcept { return device_.destroy(VIBIF_OP_DESTROY_QP, handle_); }
  std::uint32_t qp_num() const { return qp_num_; }
  vibif_handle_t handle() const { return handle_; }
  ibv_qp_type type() const { return type_; }
  const ibv_qp_cap& cap() const { return cap_; }
  // 0 or an errno, like ibv_modify_qp / ibv_query_qp.
  int modify(const ibv_qp_attr& attr, int attr_mask);
  int query(ibv_qp_attr& attr, int attr_mask, ibv_qp_init_attr& init);
  // 0 or an errno; *bad_wr is the first request not posted.
  int post_send(const ibv_send_wr* wr, ibv_send_wr** bad_wr);
  int post_recv(const ibv_recv_wr* wr, ibv_recv_wr** bad_wr);
  ibv_qp_state state() const { return state_; }

 private:
  friend class Pd;
  friend class Cq;
  Qp(Device& device) : device_(device) {}
  Device& device_;
  Cq* send_cq_ = nullptr;
  Cq* recv_cq_ = nullptr;
  Srq* srq_ = nullptr;
  std::atomic<std::uint32_t> sq_retired_{0}, rq_retired_{0};
  std::mutex send_mu_, recv_mu_;
  std::unique_ptr<platform::SharedPages> pages_;
  vibif_handle_t handle_ = 0;
  std::uint32_t qp_num_ = 0;
  ibv_qp_type type_ = IBV_QPT_RC;
  ibv_qp_cap cap_{};
  GuestQueue sq_, rq_;
  bool has_rq_ = true;
  ibv_qp_state state_ = IBV_QPS_RESET;
};

}  // namespace vib::front
