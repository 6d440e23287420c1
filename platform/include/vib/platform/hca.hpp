// The HCA as vibd uses it: the verbs a guest's requests are executed with.
//
// Two implementations: rdma-core's libibverbs (production: mlx5, rxe, ...)
// and the built-in software HCA "soft", which gives guests on one host RDMA
// between each other without hardware and enforces PDs, keys, access flags
// and bounds as an HCA does.
//
// Data travels in rdma-core's own plain structs (ibv_device_attr,
// ibv_port_attr, ibv_qp_attr, ibv_send_wr, ibv_recv_wr, ibv_wc, ...), so the
// rdma-core implementation passes them through and values from the wire need
// no translation. Objects are owned by unique_ptr and must be destroyed
// before the objects they were created from (MRs/QPs/SRQs/AHs before their
// PD, QPs before their CQs and SRQ, everything before its Hca).
//
// Threading: every call may run concurrently with any other from any thread,
// except that an object must not be destroyed while another thread uses it.
// The soft HCA runs independent QPs' work requests in parallel (per-QP locks
// under a reader-writer fabric lock; the order is in soft_hca.cpp); the
// rdma-core one relies on libibverbs' own thread safety.
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "vib/platform/memory_access.hpp"

namespace vib::platform {

class ProtectionDomain {
 public:
  virtual ~ProtectionDomain() = default;
};

class MemoryRegion {
 public:
  virtual ~MemoryRegion() = default;
  virtual std::uint32_t lkey() const = 0;
  virtual std::uint32_t rkey() const = 0;
};

class AddressHandle {
 public:
  virtual ~AddressHandle() = default;
  // What goes into ibv_send_wr::wr.ud.ah for this implementation.
  virtual ibv_ah* native() = 0;
};

class CompletionQueue {
 public:
  virtual ~CompletionQueue() = default;
  // Fills up to out.size() completions, oldest first; returns how many.
  virtual int poll(std::span<ibv_wc> out) = 0;
  // One completion event (see Hca::next_completion_event) for the next
  // completion (solicited only: the next solicited or error completion).
  virtual void request_notify(bool solicited_only) = 0;
  virtual std::uint32_t capacity() const = 0;
  virtual void resize(std::uint32_t cqe) = 0;
};

class SharedReceiveQueue {
 public:
  virtual ~SharedReceiveQueue() = default;
  // 0 or an errno; *bad_wr names the first request not posted.
  virtual int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) = 0;
  virtual int modify(const ibv_srq_attr& attr, int attr_mask) = 0;
  virtual int query(ibv_srq_attr& attr) = 0;
};

struct QueuePairInit {
  CompletionQueue* send_cq = nullptr;
  CompletionQueue* recv_cq = nullptr;
  SharedReceiveQueue* srq = nullptr;
  ibv_qp_cap cap{};
  ibv_qp_type qp_type = IBV_QPT_RC;
  bool sq_sig_all = false;
};

class QueuePair {
 public:
  virtual ~QueuePair() = default;
  virtual std::uint32_t qp_num() const = 0;
  // 0 or an errno (EINVAL for a transition or attribute mask the IB spec
  // does not allow).
  virtual int modify(const ibv_qp_attr& attr, int attr_mask) = 0;
  virtual int query(ibv_qp_attr& attr, ibv_qp_init_attr& init) = 0;
  virtual int post_send(const ibv_send_wr* wr, const ibv_send_wr** bad_wr) = 0;
  virtual int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) = 0;
};

struct AsyncEvent {
  ibv_event_type type;
  // The object concerned (whichever applies to the type), or null.
  QueuePair* qp = nullptr;
  CompletionQueue* cq = nullptr;
  SharedReceiveQueue* srq = nullptr;
};

class Hca {
 public:
  virtual ~Hca() = default;

  virtual const std::string& name() const = 0;
  virtual void query_device(ibv_device_attr& attr) = 0;
  // Throws std::system_error(EINVAL) for a port or index the HCA lacks.
  virtual void query_port(std::uint8_t port, ibv_port_attr& attr) = 0;
  virtual void query_gid(std::uint8_t port, int index, ibv_gid& gid) = 0;
  // What the entry is on the wire (enum ibv_gid_type: IB, RoCE v1 or v2).
  virtual int gid_type(std::uint8_t /*port*/, int /*index*/) { return IBV_GID_TYPE_IB; }
  // pkey in network byte order, as ibv_query_pkey gives it.
  virtual void query_pkey(std::uint8_t port, int index, std::uint16_t& pkey) = 0;

  // Creation failures throw std::system_error (ENOMEM, EINVAL, EACCES...).
  virtual std::unique_ptr<ProtectionDomain> alloc_pd() = 0;
  // Like ibv_dealloc_pd: EBUSY (pd kept) while MRs/QPs/SRQs/AHs of it live,
  // else 0 and pd is reset. Plain destruction of a busy PD is a caller bug.
  virtual int dealloc_pd(std::unique_ptr<ProtectionDomain>& pd) = 0;
  // Registers [addr, addr+length) of this process, seen by the HCA and by
  // remote peers at iova (so a guest's own virtual addresses work unchanged).
  virtual std::unique_ptr<MemoryRegion> reg_mr(ProtectionDomain& pd, void* addr,
                                               std::size_t length, std::uint64_t iova,
                                               int access) = 0;
  // Registers bytes [offset, offset + length) of `memory`, which the MR
  // keeps. The default needs memory.mapped() (an rdma-core device registers
  // a mapping) and throws std::system_error(EOPNOTSUPP) without one; the
  // soft HCA reaches any MemoryAccess.
  virtual std::unique_ptr<MemoryRegion> reg_mr(ProtectionDomain& pd, std::unique_ptr<MemoryAccess> memory,
                                               std::size_t offset, std::size_t length, std::uint64_t iova,
                                               int access);
  // Whether memory must be mapped writable to be registered at all, even
  // for an MR the HCA never writes: rdma-core's HCAs on Linux before 6.2,
  // whose ib_umem_get pins every MR for write (FOLL_WRITE | FOLL_FORCE), so
  // a read-only mapping fails with EFAULT. The MR's access flags still
  // decide what the HCA may do.
  virtual bool registers_only_writable_memory() const { return false; }
  virtual std::unique_ptr<CompletionQueue> create_cq(int cqe) = 0;
  virtual std::unique_ptr<QueuePair> create_qp(ProtectionDomain& pd, const QueuePairInit& init) = 0;
  virtual std::unique_ptr<SharedReceiveQueue> create_srq(ProtectionDomain& pd,
                                                         const ibv_srq_init_attr& init) = 0;
  virtual std::unique_ptr<AddressHandle> create_ah(ProtectionDomain& pd,
                                                   const ibv_ah_attr& attr) = 0;

  // Pollable (POLLIN) while completion events wait; each is one armed CQ.
  virtual int completion_fd() = 0;
  virtual CompletionQueue* next_completion_event() = 0;  // null when none
  // Pollable (POLLIN) while asynchronous events wait.
  virtual int async_fd() = 0;
  virtual std::optional<AsyncEvent> next_async_event() = 0;
};

// The built-in software HCA's device name; open_hca("soft") also finds it.
inline constexpr std::string_view kSoftHcaName = "soft0";

struct HcaDescription {
  std::string name;
  bool software;
};
// The software HCA and every device libibverbs finds.
std::vector<HcaDescription> list_hcas();
// "soft"/"soft0": the software HCA; anything else: the libibverbs device of
// that name. Throws std::system_error(ENODEV) naming the device if absent.
std::unique_ptr<Hca> open_hca(std::string_view name);

}  // namespace vib::platform
