// The rdma-core implementation: a thin RAII pass-through to libibverbs.
#include "verbs_hca.hpp"

#include <fcntl.h>
#include <sys/utsname.h>

#include <cerrno>
#include <cstdio>
#include <mutex>
#include <system_error>

namespace vib::platform::verbs {
namespace {

std::system_error error(int code, const std::string& device, const std::string& what) {
  return std::system_error(code == 0 ? EIO : code, std::generic_category(), device + ": " + what);
}

struct DeviceListDeleter {
  void operator()(ibv_device** list) const { ibv_free_device_list(list); }
};
using DeviceList = std::unique_ptr<ibv_device*, DeviceListDeleter>;

DeviceList device_list(int& count) {
  count = 0;
  return DeviceList(ibv_get_device_list(&count));
}

int set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return errno;
  return 0;
}

class VerbsPd final : public ProtectionDomain {
 public:
  explicit VerbsPd(ibv_pd* pd) : pd_(pd) {}
  ~VerbsPd() override {
    if (pd_ != nullptr) ibv_dealloc_pd(pd_);
  }
  ibv_pd* pd_;
};

class VerbsMr final : public MemoryRegion {
 public:
  explicit VerbsMr(ibv_mr* mr) : mr_(mr) {}
  ~VerbsMr() override { ibv_dereg_mr(mr_); }
  std::uint32_t lkey() const override { return mr_->lkey; }
  std::uint32_t rkey() const override { return mr_->rkey; }

 private:
  ibv_mr* mr_;
};

class VerbsAh final : public AddressHandle {
 public:
  explicit VerbsAh(ibv_ah* ah) : ah_(ah) {}
  ~VerbsAh() override { ibv_destroy_ah(ah_); }
  ibv_ah* native() override { return ah_; }

 private:
  ibv_ah* ah_;
};

class VerbsCq final : public CompletionQueue {
 public:
  // `events_mu`: the HCA's, held while a completion event is taken from
  // the channel and counted.
  VerbsCq(ibv_cq* cq, std::mutex& events_mu) : cq_(cq), events_mu_(events_mu) {}
  ~VerbsCq() override {
    // ibv_destroy_cq blocks until every event taken was acknowledged. Any
    // worker may be taking one for this CQ right now (the context goes on
    // the control pool): under the lock the count is complete, and no event
    // is taken between the acknowledgement and the destruction, which
    // drops the ones not taken. Without it a process killed mid-traffic
    // could leave vibd's free of its context waiting for ever (lab i).
    std::lock_guard lock(events_mu_);
    if (unacked_ != 0) ibv_ack_cq_events(cq_, unacked_);
    ibv_destroy_cq(cq_);
  }
  int poll(std::span<ibv_wc> out) override {
    return ibv_poll_cq(cq_, static_cast<int>(out.size()), out.data());
  }
  void request_notify(bool solicited_only) override {
    if (int rc = ibv_req_notify_cq(cq_, solicited_only ? 1 : 0); rc != 0)
      throw error(rc, "cq", "req_notify_cq");
  }
  std::uint32_t capacity() const override { return static_cast<std::uint32_t>(cq_->cqe); }
  void resize(std::uint32_t cqe) override {
    if (int rc = ibv_resize_cq(cq_, static_cast<int>(cqe)); rc != 0)
      throw error(rc, "cq", "resize_cq");
  }
  ibv_cq* cq_;
  std::mutex& events_mu_;
  unsigned int unacked_ = 0;  // events_mu_; acknowledged in batches: ack takes a lock
};

class VerbsSrq final : public SharedReceiveQueue {
 public:
  explicit VerbsSrq(ibv_srq* srq) : srq_(srq) {}
  ~VerbsSrq() override { ibv_destroy_srq(srq_); }
  int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) override {
    ibv_recv_wr* bad = nullptr;
    int rc = ibv_post_srq_recv(srq_, const_cast<ibv_recv_wr*>(wr), &bad);
    *bad_wr = bad;
    return rc;
  }
  int modify(const ibv_srq_attr& attr, int attr_mask) override {
    auto copy = attr;
    return ibv_modify_srq(srq_, &copy, attr_mask);
  }
  int query(ibv_srq_attr& attr) override { return ibv_query_srq(srq_, &attr); }
  ibv_srq* srq_;
};

class VerbsQp final : public QueuePair {
 public:
  explicit VerbsQp(ibv_qp* qp) : qp_(qp) {}
  ~VerbsQp() override { ibv_destroy_qp(qp_); }
  std::uint32_t qp_num() const override { return qp_->qp_num; }
  int modify(const ibv_qp_attr& attr, int attr_mask) override {
    auto copy = attr;
    return ibv_modify_qp(qp_, &copy, attr_mask);
  }
  int query(ibv_qp_attr& attr, ibv_qp_init_attr& init) override {
    // Every attribute libibverbs' query command knows: it refuses a mask
    // with any bit from IBV_QP_RATE_LIMIT up (EOPNOTSUPP), ~0 included.
    return ibv_query_qp(qp_, &attr, IBV_QP_RATE_LIMIT - 1, &init);
  }
  int post_send(const ibv_send_wr* wr, const ibv_send_wr** bad_wr) override {
    ibv_send_wr* bad = nullptr;
    int rc = ibv_post_send(qp_, const_cast<ibv_send_wr*>(wr), &bad);
    *bad_wr = bad;
    return rc;
  }
  int post_recv(const ibv_recv_wr* wr, const ibv_recv_wr** bad_wr) override {
    ibv_recv_wr* bad = nullptr;
    int rc = ibv_post_recv(qp_, const_cast<ibv_recv_wr*>(wr), &bad);
    *bad_wr = bad;
    return rc;
  }
  ibv_qp* qp_;
};

// Linux 6.2 stopped pinning read-only MRs for write (RDMA/umem: "remove
// FOLL_FORCE usage"); before it, registering needs a writable mapping.
bool kernel_pins_every_mr_for_write() {
  utsname u{};
  unsigned major = 0, minor = 0;
  if (::uname(&u) != 0 || std::sscanf(u.release, "%u.%u", &major, &minor) != 2) return true;
  return major < 6 || (major == 6 && minor < 2);
}

class VerbsHca final : public Hca {
 public:
  VerbsHca(std::string name, ibv_context* context) : name_(std::move(name)), context_(context) {
    channel_ = ibv_create_comp_channel(context_);
    if (channel_ == nullptr) {
      int code = errno;
      ibv_close_device(context_);
      throw error(code, name_, "create_comp_channel");
    }
    if (int rc = set_nonblocking(channel_->fd) | set_nonblocking(context_->async_fd); rc != 0) {
      ibv_destroy_comp_channel(channel_);
      ibv_close_device(context_);
      throw error(rc, name_, "O_NONBLOCK");
    }
  }
  ~VerbsHca() override {
    ibv_destroy_comp_channel(channel_);
    ibv_close_device(context_);
  }
  const std::string& name() const override { return name_; }
  bool registers_only_writable_memory() const override { return pins_for_write_; }
  void query_device(ibv_device_attr& attr) override {
    if (int rc = ibv_query_device(context_, &attr); rc != 0) throw error(rc, name_, "query_device");
  }
  void query_port(std::uint8_t port, ibv_port_attr& attr) override {
    if (int rc = ibv_query_port(context_, port, &attr); rc != 0) throw error(rc, name_, "query_port");
  }
  void query_gid(std::uint8_t port, int index, ibv_gid& gid) override {
    if (ibv_query_gid(context_, port, index, &gid) != 0) throw error(errno, name_, "query_gid");
  }
  int gid_type(std::uint8_t port, int index) override {
    ibv_gid_entry entry{};
    if (ibv_query_gid_ex(context_, port, static_cast<std::uint32_t>(index), &entry, 0) != 0) return IBV_GID_TYPE_IB;
    return static_cast<int>(entry.gid_type);
  }
  void query_pkey(std::uint8_t port, int index, std::uint16_t& pkey) override {
    __be16 value = 0;
    if (ibv_query_pkey(context_, port, index, &value) != 0) throw error(errno, name_, "query_pkey");
    pkey = value;
  }
  std::unique_ptr<ProtectionDomain> alloc_pd() override {
    auto* pd = ibv_alloc_pd(context_);
    if (pd == nullptr) throw error(errno, name_, "alloc_pd");
    return std::make_unique<VerbsPd>(pd);
  }
  int dealloc_pd(std::unique_ptr<ProtectionDomain>& pd) override {
    auto& verbs_pd = dynamic_cast<VerbsPd&>(*pd);
    if (int rc = ibv_dealloc_pd(verbs_pd.pd_); rc != 0) return rc;
    verbs_pd.pd_ = nullptr;
    pd.reset();
    return 0;
  }
  using Hca::reg_mr;  // of a MemoryAccess: its mapping
  std::unique_ptr<MemoryRegion> reg_mr(ProtectionDomain& pd, void* addr, std::size_t length,
                                       std::uint64_t iova, int access) override {
    auto* mr = ibv_reg_mr_iova2(dynamic_cast<VerbsPd&>(pd).pd_, addr, length, iova,
                                static_cast<unsigned int>(access));
    if (mr == nullptr) throw error(errno, name_, "reg_mr");
    return std::make_unique<VerbsMr>(mr);
  }
  std::unique_ptr<CompletionQueue> create_cq(int cqe) override {
    auto* cq = ibv_create_cq(context_, cqe, nullptr, channel_, 0);
    if (cq == nullptr) throw error(errno, name_, "create_cq");
    auto wrapper = std::make_unique<VerbsCq>(cq, events_mu_);
    // The CQ's context leads ibv_get_cq_event back to our wrapper.
    cq->cq_context = wrapper.get();
    return wrapper;
  }
  std::unique_ptr<QueuePair> create_qp(ProtectionDomain& pd, const QueuePairInit& init) override {
    ibv_qp_init_attr attr{};
    attr.send_cq = dynamic_cast<VerbsCq&>(*init.send_cq).cq_;
    attr.recv_cq = dynamic_cast<VerbsCq&>(*init.recv_cq).cq_;
    attr.srq = init.srq != nullptr ? dynamic_cast<VerbsSrq&>(*init.srq).srq_ : nullptr;
    attr.cap = init.cap;
    attr.qp_type = init.qp_type;
    attr.sq_sig_all = init.sq_sig_all ? 1 : 0;
    auto* qp = ibv_create_qp(dynamic_cast<VerbsPd&>(pd).pd_, &attr);
    if (qp == nullptr) throw error(errno, name_, "create_qp");
    auto wrapper = std::make_unique<VerbsQp>(qp);
    qp->qp_context = wrapper.get();
    return wrapper;
  }
  std::unique_ptr<SharedReceiveQueue> create_srq(ProtectionDomain& pd,
                                                 const ibv_srq_init_attr& init) override {
    auto copy = init;
    auto* srq = ibv_create_srq(dynamic_cast<VerbsPd&>(pd).pd_, &copy);
    if (srq == nullptr) throw error(errno, name_, "create_srq");
    auto wrapper = std::make_unique<VerbsSrq>(srq);
    srq->srq_context = wrapper.get();
    return wrapper;
  }
  std::unique_ptr<AddressHandle> create_ah(ProtectionDomain& pd, const ibv_ah_attr& attr) override {
    auto copy = attr;
    auto* ah = ibv_create_ah(dynamic_cast<VerbsPd&>(pd).pd_, &copy);
    if (ah == nullptr) throw error(errno, name_, "create_ah");
    return std::make_unique<VerbsAh>(ah);
  }
  int completion_fd() override { return channel_->fd; }
  CompletionQueue* next_completion_event() override {
    std::lock_guard lock(events_mu_);  // see ~VerbsCq
    ibv_cq* cq = nullptr;
    void* context = nullptr;
    if (ibv_get_cq_event(channel_, &cq, &context) != 0) return nullptr;
    auto* wrapper = static_cast<VerbsCq*>(context);
    if (++wrapper->unacked_ >= 64) {
      ibv_ack_cq_events(cq, wrapper->unacked_);
      wrapper->unacked_ = 0;
    }
    return wrapper;
  }
  int async_fd() override { return context_->async_fd; }
  std::optional<AsyncEvent> next_async_event() override {
    ibv_async_event raw{};
    if (ibv_get_async_event(context_, &raw) != 0) return std::nullopt;
    AsyncEvent event{raw.event_type, nullptr, nullptr, nullptr};
    switch (raw.event_type) {
      case IBV_EVENT_CQ_ERR: event.cq = static_cast<VerbsCq*>(raw.element.cq->cq_context); break;
      case IBV_EVENT_SRQ_ERR:
      case IBV_EVENT_SRQ_LIMIT_REACHED:
        event.srq = static_cast<VerbsSrq*>(raw.element.srq->srq_context);
        break;
      case IBV_EVENT_QP_FATAL:
      case IBV_EVENT_QP_REQ_ERR:
      case IBV_EVENT_QP_ACCESS_ERR:
      case IBV_EVENT_COMM_EST:
      case IBV_EVENT_SQ_DRAINED:
      case IBV_EVENT_PATH_MIG:
      case IBV_EVENT_PATH_MIG_ERR:
      case IBV_EVENT_QP_LAST_WQE_REACHED:
        event.qp = static_cast<VerbsQp*>(raw.element.qp->qp_context);
        break;
      default: break;
    }
    ibv_ack_async_event(&raw);
    return event;
  }

 private:
  std::string name_;
  ibv_context* context_;
  ibv_comp_channel* channel_ = nullptr;
  const bool pins_for_write_ = kernel_pins_every_mr_for_write();
  std::mutex events_mu_;  // taking completion events vs destroying CQs (~VerbsCq)
};

}  // namespace

std::vector<std::string> device_names() {
  int count = 0;
  auto list = device_list(count);
  std::vector<std::string> names;
  for (int i = 0; list && i < count; ++i) names.emplace_back(ibv_get_device_name(list.get()[i]));
  return names;
}

std::unique_ptr<Hca> open_verbs_hca(std::string_view name) {
  int count = 0;
  auto list = device_list(count);
  if (!list) throw error(errno, std::string(name), "no RDMA devices (ibv_get_device_list)");
  for (int i = 0; i < count; ++i) {
    ibv_device* device = list.get()[i];
    if (name != ibv_get_device_name(device)) continue;
    ibv_context* context = ibv_open_device(device);
    if (context == nullptr) throw error(errno, std::string(name), "ibv_open_device");
    return std::make_unique<VerbsHca>(std::string(name), context);
  }
  throw error(ENODEV, std::string(name), "no such RDMA device");
}

}  // namespace vib::platform::verbs
