// The objects libibverbs hands to applications, each a C struct of
// <infiniband/verbs.h> followed by the libvibfront object behind it.
//
// Ownership: the C ABI hands out raw pointers, so every object here is
// created with `new` by its ibv_create_*/ibv_alloc_*/ibv_reg_*/ibv_open_*
// entry point and deleted by the matching ibv_destroy_*/ibv_dealloc_*/
// ibv_dereg_*/ibv_close_* one; inside, members own what they hold. Each
// struct is standard-layout with the C struct first, so the application's
// pointer and ours are interconvertible (reinterpret_cast is well defined).
#pragma once

#include <infiniband/verbs.h>

#include <cerrno>
#include <deque>
#include <unordered_map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "vib/front/verbs.hpp"
#include "vib/platform/types.hpp"
#include "vib/platform/unique_fd.hpp"

namespace vib::ibverbs {

// A device found in this guest's xenstore. ibv_device pointers must stay
// valid after ibv_free_device_list (programs open a device, free the list,
// and keep using context->device), so these live for the whole process in
// a registry and the list only points at them.
struct DeviceEntry {
  ibv_device verbs{};
  // Zeroed room for the fields rdma-core's struct verbs_device has after
  // ibv_device: provider helpers such as mlx5dv_is_supported() read them
  // through container_of on any ibv_device they are given.
  std::byte verbs_device_tail[64]{};
  unsigned devid = 0;
  std::mutex mu;
  bool guid_known = false;
  __be64 guid = 0;
};

struct Context;

// A completion channel: the application polls `verbs.fd`, an eventfd
// (semaphore mode) counting the CQs queued in `events`.
struct CompChannel {
  ibv_comp_channel verbs{};
  platform::UniqueFd fd;
  std::mutex mu;
  std::deque<ibv_cq*> events;
  bool device_gone = false;  // the back-end went: waiters get EIO, as on a removed HCA
};

struct Cq {
  ibv_cq verbs{};
  std::unique_ptr<front::Cq> cq;
  CompChannel* channel = nullptr;  // not owned; the application destroys it after its CQs
};

struct Srq {
  ibv_srq verbs{};
  std::unique_ptr<front::Srq> srq;
};

struct Pd {
  ibv_pd verbs{};
  std::unique_ptr<front::Pd> pd;
};

struct Mr {
  ibv_mr verbs{};
  std::unique_ptr<front::Mr> mr;
};

// ibv_qp_ex starts with the ibv_qp the application sees; the send-ops
// (ibv_wr_*) API builds ibv_send_wr lists here and posts them at
// ibv_wr_complete, so both posting APIs share one data path.
struct Qp {
  ibv_qp_ex ex{};
  std::unique_ptr<front::Qp> qp;
  std::deque<ibv_send_wr> pending;
  std::deque<std::vector<ibv_sge>> sges;  // the pending WRs' SGE lists
  std::deque<std::vector<char>> inline_data;
  int wr_error = 0;
};

struct Context {
  verbs_context vctx{};  // the application sees &vctx.context
  std::unique_ptr<front::Device> device;
  DeviceEntry* entry = nullptr;

  // Which object a back-end handle names, for routing events; guarded by mu.
  std::mutex mu;
  std::unordered_map<vibif_handle_t, Cq*> cqs;
  std::unordered_map<vibif_handle_t, Qp*> qps;
  std::unordered_map<vibif_handle_t, Srq*> srqs;
  std::deque<ibv_async_event> async_events;
  void (*cm_handler)(void*, std::uint32_t) = nullptr;  // vib_ibv_set_cm_handler
  void* cm_handler_arg = nullptr;

  platform::UniqueFd async_fd;  // eventfd counting async_events
  platform::UniqueFd stop_fd;   // tells the dispatcher thread to end
  std::thread dispatcher;

  // Routes every event the back-end queued to its completion channel or to
  // the asynchronous event queue.
  void pump() noexcept;
  // The back-end closed this context (vibd stopped, restarted or lost the
  // device): IBV_EVENT_DEVICE_FATAL, as rdma-core reports an HCA that died.
  void report_fatal() noexcept;
};

static_assert(std::is_standard_layout_v<DeviceEntry>);
static_assert(std::is_standard_layout_v<CompChannel>);
static_assert(std::is_standard_layout_v<Cq>);
static_assert(std::is_standard_layout_v<Srq>);
static_assert(std::is_standard_layout_v<Pd>);
static_assert(std::is_standard_layout_v<Mr>);
static_assert(std::is_standard_layout_v<Qp>);
static_assert(std::is_standard_layout_v<Context>);

inline Context* to_ctx(ibv_context* c) {
  auto* v = reinterpret_cast<verbs_context*>(reinterpret_cast<char*>(c) - offsetof(verbs_context, context));
  return reinterpret_cast<Context*>(v);
}
inline DeviceEntry* to_dev(ibv_device* d) { return reinterpret_cast<DeviceEntry*>(d); }
inline CompChannel* to_channel(ibv_comp_channel* c) { return reinterpret_cast<CompChannel*>(c); }
inline Cq* to_cq(ibv_cq* c) { return reinterpret_cast<Cq*>(c); }
inline Srq* to_srq(ibv_srq* s) { return reinterpret_cast<Srq*>(s); }
inline Pd* to_pd(ibv_pd* p) { return reinterpret_cast<Pd*>(p); }
inline Mr* to_mr(ibv_mr* m) { return reinterpret_cast<Mr*>(m); }
inline Qp* to_qp(ibv_qp* q) { return reinterpret_cast<Qp*>(q); }
inline Qp* to_qp(ibv_qp_ex* q) { return reinterpret_cast<Qp*>(q); }
inline front::Ah* to_ah(ibv_ah* a) { return reinterpret_cast<front::Ah*>(a); }

// The errno an exception stands for: no exception may cross the C ABI, so
// every entry point catches and maps with this.
inline int errno_of_current_exception() noexcept {
  try {
    throw;
  } catch (const std::system_error& e) {
    return e.code().value() ? e.code().value() : EIO;
  } catch (const std::bad_alloc&) {
    return ENOMEM;
  } catch (...) {
    return EIO;
  }
}

// Runs f; on an exception sets errno and returns nullptr.
template <typename F>
auto or_null(F&& f) noexcept -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    errno = errno_of_current_exception();
    return nullptr;
  }
}

// Runs f (returning 0 or an errno); on an exception returns its errno.
// errno is set too, for callers that look there.
template <typename F>
int or_errno(F&& f) noexcept {
  int err;
  try {
    err = f();
  } catch (...) {
    err = errno_of_current_exception();
  }
  if (err) errno = err;
  return err;
}

// Control calls wait on the event channel that also announces events, and
// consume its notifications; so after each one, whatever was queued
// meanwhile is dispatched here rather than left waiting for a kick that
// was swallowed. It runs after the verb has set errno for its caller, and
// keeps it: reading an empty event channel on real Xen leaves EAGAIN,
// which ibv_reg_mr reported instead of ENOSPC in the lab.
class PumpAfter {
 public:
  explicit PumpAfter(Context& ctx) : ctx_(ctx) {}
  ~PumpAfter() {
    const int err = errno;
    ctx_.pump();
    errno = err;
  }
  PumpAfter(const PumpAfter&) = delete;
  PumpAfter& operator=(const PumpAfter&) = delete;

 private:
  Context& ctx_;
};

// Fills the context's function tables (data path ops, extended verbs).
void fill_ops(verbs_context& vctx);

// The Xen a process uses: the real one, unless VIB_LOCAL_XEN names a
// host-local Xen directory (with VIB_DOMID the domain this process is).
platform::XenTarget xen_target_from_env();

}  // namespace vib::ibverbs
