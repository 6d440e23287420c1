// librdmacm.so.1 over vib: the objects behind rdma_cm_id and
// rdma_event_channel. See docs/rdma-cm.md.
//
// vibd is the connection manager: every CM operation is a request on the
// ring of the vib context (ibv_context) the id is bound to, and vibd
// announces each CM event with a doorbell event naming the id; the
// context's event thread (vib's libibverbs) hands that to on_cm_event(),
// which posts one count on the id's event channel, an eventfd. QPs are
// moved by this library with the attributes vibd gives
// (rdma_init_qp_attr), as rdma-core's librdmacm does with the kernel.
//
// Ownership: the C ABI hands out raw pointers; ids and channels are created
// with `new` by rdma_create_id / rdma_create_event_channel and deleted by
// rdma_destroy_id / rdma_destroy_event_channel. Each struct is
// standard-layout with the C struct first.
#pragma once

#include <rdma/rdma_cma.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "vib/platform/unique_fd.hpp"
#include "vib/vibif.h"

namespace vib::rdmacm {

struct IdPriv;

// One vib device as librdmacm uses it: a context of its own, opened once
// per process, shared by every id bound to the device.
struct CmDevice {
  ibv_context* verbs = nullptr;
  ibv_pd* pd = nullptr;  // the default PD of ids (rdma_create_qp with no PD)
  std::uint8_t max_rd_atomic = 1;
  std::mutex mu;
  std::unordered_map<vibif_handle_t, IdPriv*> ids;
  // Announcements for ids not known yet (a request's new id, announced
  // before its CONNECT_REQUEST was fetched): delivered when it registers.
  std::set<vibif_handle_t> early;
};

struct Channel {
  rdma_event_channel verbs{};
  platform::UniqueFd fd;  // eventfd, semaphore mode: one count per event to fetch
  std::mutex mu;
  std::deque<IdPriv*> ready;  // the id of each count
};

struct IdPriv {
  rdma_cm_id id{};
  CmDevice* device = nullptr;  // null until bound or resolved
  vibif_handle_t handle = 0;
  bool sync = false;  // no channel given: calls wait for their events
  std::mutex mu;
  std::condition_variable cv;
  std::uint32_t events_reported = 0, events_completed = 0;
  std::uint8_t responder_resources = 0, initiator_depth = 0;
  bool connect_error = false;
  bool has_qp_init_attr = false;  // passive rdma_create_ep: QPs for rdma_get_request
  ibv_qp_init_attr qp_init_attr{};
  std::vector<std::uint8_t> connect_data;          // rdma_getaddrinfo's ai_connect
  ibv_sa_path_rec path{};
};

struct Event {
  rdma_cm_event event{};
  IdPriv* id_priv = nullptr;
  std::vector<std::uint8_t> private_data;
};

static_assert(std::is_standard_layout_v<Channel>);
static_assert(std::is_standard_layout_v<IdPriv>);
static_assert(std::is_standard_layout_v<Event>);

inline IdPriv* priv(rdma_cm_id* id) { return reinterpret_cast<IdPriv*>(id); }
inline Channel* chan(rdma_event_channel* c) { return reinterpret_cast<Channel*>(c); }
inline Event* evt(rdma_cm_event* e) { return reinterpret_cast<Event*>(e); }

// rdma-core's convention: -1 with errno set.
inline int fail_errno(int err) {
  errno = err;
  return -1;
}

}  // namespace vib::rdmacm
