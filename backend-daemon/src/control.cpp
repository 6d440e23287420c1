// Executes a context's control requests on the HCA. Input is a copy of the
// guest's request (never the shared page); every field is checked here.
#include "control.hpp"

#include <cstdio>
#include <cstring>
#include <system_error>

#include "log.hpp"

namespace vib::backend {

ControlPath::ControlPath(const DeviceConfig& config, platform::Hca& hca, GuestMemory& memory,
                         vibif_doorbell_page& doorbell, std::string subject, HcaObjectListener listener,
                         std::shared_ptr<DeviceQuota> quota)
    : config_(config),
      hca_(hca),
      memory_(memory),
      doorbell_(doorbell),
      subject_(std::move(subject)),
      listener_(std::move(listener)),
      guest_log_(subject_),
      quota_(quota ? std::move(quota) : std::make_shared<DeviceQuota>(config)),
      pds_(config.max_pds),
      ahs_(config.max_ahs),
      mrs_(config.max_mrs),
      cqs_(config.max_cqs),
      srqs_(config.max_srqs),
      qps_(config.max_qps) {}

ControlPath::~ControlPath() { free_all(); }

std::string ControlPath::free_all() {
  // Children before their parents, as the verbs require: QPs before the CQs
  // and SRQs they use, everything before its PD.
  const std::uint64_t pinned = pinned_pages_;
  qps_.for_each([&](vibif_handle_t, GuestQp& qp) { announce(qp.qp.get(), false); });
  qps_by_num_.clear();
  const std::size_t qps = qps_.clear();
  srqs_.for_each([&](vibif_handle_t, GuestSrq& srq) { announce(srq.srq.get(), false); });
  const std::size_t srqs = srqs_.clear();
  cqs_.for_each([&](vibif_handle_t, GuestCq& cq) { announce(cq.cq.get(), false); });
  const std::size_t cqs = cqs_.clear();
  const std::size_t mrs = mrs_.clear();
  pinned_pages_ = 0;
  const std::size_t ahs = ahs_.clear();
  const std::size_t pds = pds_.clear();
  slots_used_.reset();
  count_objects();
  return std::to_string(qps) + " QPs, " + std::to_string(cqs) + " CQs, " + std::to_string(srqs) + " SRQs, " +
         std::to_string(mrs) + " MRs, " + std::to_string(ahs) + " AHs, " + std::to_string(pds) + " PDs (" +
         std::to_string(pinned) + " guest pages unpinned)";
}

vibif_response ControlPath::execute(const vibif_request& req) {
  const vibif_response rsp = dispatch(req);
  stats_.request_served(rsp.hdr.status == VIBIF_OK);
  count_objects();
  return rsp;
}

void ControlPath::count_objects() {
  const auto set = [](ContextStats::Counter& c, std::uint64_t v) { c.store(v, std::memory_order_relaxed); };
  set(stats_.pds, pds_.size());
  set(stats_.cqs, cqs_.size());
  set(stats_.qps, qps_.size());
  set(stats_.srqs, srqs_.size());
  set(stats_.mrs, mrs_.size());
  set(stats_.ahs, ahs_.size());
  set(stats_.pinned_pages, pinned_pages_);
  // What a request reserved but did not keep, or freed, goes back to the
  // device.
  quota_.settle(Quota::pds, pds_.size());
  quota_.settle(Quota::ahs, ahs_.size());
  quota_.settle(Quota::mrs, mrs_.size());
  quota_.settle(Quota::cqs, cqs_.size());
  quota_.settle(Quota::srqs, srqs_.size());
  quota_.settle(Quota::qps, qps_.size());
  quota_.settle(Quota::pinned_pages, pinned_pages_);
}

vibif_response ControlPath::dispatch(const vibif_request& req) {
  vibif_response rsp;
  std::memset(&rsp, 0, sizeof(rsp));
  rsp.hdr.id = req.hdr.id;
  rsp.hdr.op = req.hdr.op;
  auto& status = rsp.hdr.status;
  if (extension_ && extension_->handles(req.hdr.op)) return extension_->execute(req);
  try {
    switch (req.hdr.op) {
      case VIBIF_OP_QUERY_DEVICE: {
        ibv_device_attr a;
        hca_.query_device(a);
        auto& d = rsp.u.query_device;
        std::memcpy(d.fw_ver, a.fw_ver, sizeof(d.fw_ver));
        d.node_guid = a.node_guid;
        d.sys_image_guid = a.sys_image_guid;
        d.max_mr_size = std::min<std::uint64_t>(a.max_mr_size, config_.max_pinned_pages * VIBIF_PAGE_SIZE);
        d.page_size_cap = a.page_size_cap;
        d.vendor_id = a.vendor_id;
        d.vendor_part_id = a.vendor_part_id;
        d.hw_ver = a.hw_ver;
        // The guest sees the device as its quotas shape it.
        d.max_qp = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_qp), config_.max_qps);
        d.max_qp_wr = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_qp_wr), VIBIF_MAX_QUEUE_WR);
        d.device_cap_flags = a.device_cap_flags;
        d.max_sge = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_sge), VIBIF_MAX_SGE);
        d.max_cq = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_cq), config_.max_cqs);
        d.max_cqe = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_cqe), VIBIF_MAX_CQE);
        d.max_mr = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_mr), config_.max_mrs);
        d.max_pd = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_pd), config_.max_pds);
        d.max_qp_rd_atom = static_cast<std::uint32_t>(a.max_qp_rd_atom);
        d.max_qp_init_rd_atom = static_cast<std::uint32_t>(a.max_qp_init_rd_atom);
        d.atomic_cap = a.atomic_cap;
        d.max_ah = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_ah), config_.max_ahs);
        d.max_srq = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_srq), config_.max_srqs);
        d.max_srq_wr = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_srq_wr), VIBIF_MAX_QUEUE_WR);
        d.max_srq_sge = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_srq_sge), VIBIF_MAX_SGE);
        d.max_sge_rd = std::min<std::uint32_t>(static_cast<std::uint32_t>(a.max_sge_rd), VIBIF_MAX_SGE);
        d.max_res_rd_atom = static_cast<std::uint32_t>(a.max_res_rd_atom);
        d.max_pkeys = static_cast<std::uint32_t>(config_.pkeys.size());
        d.phys_port_cnt = 1;  // the guest sees only its configured port, as port 1
        d.local_ca_ack_delay = a.local_ca_ack_delay;
        break;
      }
      case VIBIF_OP_QUERY_PORT: {
        if (req.u.query_port.port != 1) {
          status = VIBIF_EINVAL;
          break;
        }
        ibv_port_attr a;
        hca_.query_port(config_.port, a);
        auto& p = rsp.u.query_port;
        p.state = a.state;
        p.max_mtu = a.max_mtu;
        p.active_mtu = a.active_mtu;
        p.gid_tbl_len = static_cast<std::uint32_t>(config_.gid_indices.size());
        p.port_cap_flags = a.port_cap_flags & ~static_cast<std::uint32_t>(IBV_PORT_SM);
        p.max_msg_sz = a.max_msg_sz;
        p.pkey_tbl_len = static_cast<std::uint16_t>(config_.pkeys.size());
        p.lid = a.lid;
        p.sm_lid = a.sm_lid;
        p.lmc = a.lmc;
        p.max_vl_num = a.max_vl_num;
        p.sm_sl = a.sm_sl;
        p.subnet_timeout = a.subnet_timeout;
        p.active_width = a.active_width;
        p.active_speed = a.active_speed;
        p.phys_state = a.phys_state;
        p.link_layer = a.link_layer;
        break;
      }
      case VIBIF_OP_QUERY_GID: {
        // The guest's GID table is the device's allowed indices, in order.
        const auto index = req.u.query_gid.index;
        if (req.u.query_gid.port != 1 || index >= config_.gid_indices.size()) {
          status = VIBIF_EINVAL;
          break;
        }
        ibv_gid gid;
        hca_.query_gid(config_.port, static_cast<int>(config_.gid_indices[index]), gid);
        std::memcpy(rsp.u.query_gid.gid, gid.raw, 16);
        rsp.u.query_gid.gid_type =
            static_cast<std::uint8_t>(hca_.gid_type(config_.port, static_cast<int>(config_.gid_indices[index])));
        break;
      }
      case VIBIF_OP_QUERY_PKEY: {
        const auto index = req.u.query_pkey.index;
        if (req.u.query_pkey.port != 1 || index >= config_.pkeys.size()) {
          status = VIBIF_EINVAL;
          break;
        }
        rsp.u.query_pkey.pkey = config_.pkeys[index];
        break;
      }
      case VIBIF_OP_ALLOC_PD: {
        if (!quota_.reserve(Quota::pds, pds_.size() + 1)) {
          status = VIBIF_EDQUOT;
          break;
        }
        const vibif_handle_t h = pds_.insert(hca_.alloc_pd());
        if (h == VIBIF_HANDLE_NONE) {
          status = VIBIF_EDQUOT;
          break;
        }
        rsp.u.handle.handle = h;
        log_line(LogLevel::debug, subject_, "PD " + std::to_string(h) + " allocated");
        break;
      }
      case VIBIF_OP_DEALLOC_PD: {
        const vibif_handle_t h = req.u.handle.handle;
        auto* owner = pds_.owner(h);
        if (!owner) {
          status = VIBIF_ENOENT;
          break;
        }
        if (int err = hca_.dealloc_pd(*owner)) {
          status = -err;
          break;
        }
        pds_.release(h);
        log_line(LogLevel::debug, subject_, "PD " + std::to_string(h) + " freed");
        break;
      }
      case VIBIF_OP_REG_MR:
        return reg_mr(req);
      case VIBIF_OP_DEREG_MR: {
        const vibif_handle_t h = req.u.handle.handle;
        auto* owner = mrs_.owner(h);
        if (!owner) {
          status = VIBIF_ENOENT;
          break;
        }
        pinned_pages_ -= (*owner)->page_count;
        owner->reset();
        mrs_.release(h);
        break;
      }
      case VIBIF_OP_CREATE_AH: {
        const auto& r = req.u.create_ah;
        platform::ProtectionDomain* pd = pds_.find(r.pd);
        if (!pd) {
          status = VIBIF_ENOENT;
          break;
        }
        if (!quota_.reserve(Quota::ahs, ahs_.size() + 1)) {
          status = VIBIF_EDQUOT;
          break;
        }
        ibv_ah_attr attr{};
        if ((status = to_hca_ah_attr(r.attr, attr)) != VIBIF_OK) break;
        const vibif_handle_t h = ahs_.insert(hca_.create_ah(*pd, attr));
        if (h == VIBIF_HANDLE_NONE) {
          status = VIBIF_EDQUOT;
          break;
        }
        rsp.u.handle.handle = h;
        break;
      }
      case VIBIF_OP_DESTROY_AH: {
        const vibif_handle_t h = req.u.handle.handle;
        auto* owner = ahs_.owner(h);
        if (!owner) {
          status = VIBIF_ENOENT;
          break;
        }
        owner->reset();
        ahs_.release(h);
        break;
      }
      case VIBIF_OP_CREATE_CQ: create_cq(req, rsp); break;
      case VIBIF_OP_RESIZE_CQ: resize_cq(req, rsp); break;
      case VIBIF_OP_DESTROY_CQ: destroy_cq(req, rsp); break;
      case VIBIF_OP_CREATE_QP: create_qp(req, rsp); break;
      case VIBIF_OP_MODIFY_QP: modify_qp(req, rsp); break;
      case VIBIF_OP_QUERY_QP: query_qp(req, rsp); break;
      case VIBIF_OP_DESTROY_QP: destroy_qp(req, rsp); break;
      case VIBIF_OP_CREATE_SRQ: create_srq(req, rsp); break;
      case VIBIF_OP_MODIFY_SRQ: modify_srq(req, rsp); break;
      case VIBIF_OP_QUERY_SRQ: query_srq(req, rsp); break;
      case VIBIF_OP_DESTROY_SRQ: destroy_srq(req, rsp); break;
      default:
        status = VIBIF_ENOSYS;
        break;
    }
  } catch (const std::system_error& e) {
    guest_log_.log(LogLevel::warning, std::string("op ") + std::to_string(req.hdr.op) + " failed: " + e.what());
    switch (e.code().value()) {
      case EINVAL: case ENOMEM: case EACCES: case EPERM: case EBUSY: case ENOSPC:
        status = -e.code().value();
        break;
      default:
        status = VIBIF_EIO;
    }
  } catch (const std::bad_alloc&) {
    status = VIBIF_ENOMEM;
  } catch (const std::exception& e) {
    guest_log_.log(LogLevel::warning, std::string("op ") + std::to_string(req.hdr.op) + " failed: " + e.what());
    status = VIBIF_EIO;
  }
  return rsp;
}

bool ControlPath::is_small_registration(const vibif_request& req, std::uint64_t max_pages) {
  switch (req.hdr.op) {
    case VIBIF_OP_REG_MR:
      return req.u.reg_mr.pages.levels == 0 && req.u.reg_mr.pages.nr_pages <= max_pages;
    case VIBIF_OP_DEREG_MR: {
      const GuestMr* mr = mrs_.find(req.u.handle.handle);
      return !mr || mr->page_count <= max_pages;
    }
    default:
      return false;
  }
}

// Registers guest memory: the granted pages (the application's own, granted
// in place) are reached as the platform allows (mapped contiguously, or by
// cross-memory access on the host-local Xen) and registered at the guest's
// own virtual address (IOVA), so the HCA and remote peers use guest
// addresses unchanged and the keys are the HCA's own.
vibif_response ControlPath::reg_mr(const vibif_request& req) {
  vibif_response rsp;
  std::memset(&rsp, 0, sizeof(rsp));
  rsp.hdr.id = req.hdr.id;
  rsp.hdr.op = req.hdr.op;
  auto& status = rsp.hdr.status;
  const auto& r = req.u.reg_mr;
  platform::ProtectionDomain* pd = pds_.find(r.pd);
  if (!pd) {
    status = VIBIF_ENOENT;
    return rsp;
  }
  const std::uint64_t pages = r.pages.nr_pages;
  // The range [first_offset, first_offset + length) must fill the pages
  // given, no more and no less, and sit at the guest address's page offset.
  if ((r.access & ~static_cast<std::uint32_t>(VIBIF_ACCESS_ALL)) || r.length == 0 ||
      r.first_offset >= VIBIF_PAGE_SIZE || (r.iova & (VIBIF_PAGE_SIZE - 1)) != r.first_offset ||
      r.iova + r.length < r.iova || pages == 0 || pages > (std::uint64_t{1} << 40) / VIBIF_PAGE_SIZE ||
      r.first_offset + r.length > pages * VIBIF_PAGE_SIZE ||
      r.first_offset + r.length <= (pages - 1) * VIBIF_PAGE_SIZE) {
    status = VIBIF_EINVAL;
    return rsp;
  }
  if (!quota_.reserve(Quota::mrs, mrs_.size() + 1) || !quota_.reserve(Quota::pinned_pages, pinned_pages_ + pages)) {
    status = VIBIF_EDQUOT;
    return rsp;
  }
  std::vector<platform::GrantRef> refs;
  if (int err = resolve_page_list(memory_, r.pages, config_.max_pinned_pages, refs)) {
    status = err;
    return rsp;
  }
  const bool hca_writes = r.access & (VIBIF_ACCESS_LOCAL_WRITE | VIBIF_ACCESS_REMOTE_WRITE |
                                      VIBIF_ACCESS_REMOTE_ATOMIC);
  auto entry = std::make_unique<GuestMr>();
  std::unique_ptr<platform::MemoryAccess> memory;
  // An HCA that can only register writable memory gets a writable mapping
  // of pages the guest granted writable (libvibfront does, for memory the
  // application may write) even for an MR it never writes; pages granted
  // read-only are mapped read-only, and such an HCA then refuses them.
  const bool writable_first = hca_writes || hca_.registers_only_writable_memory();
  try {
    memory = memory_.access(refs, writable_first);
  } catch (const std::system_error&) {
    if (hca_writes) {
      status = VIBIF_EACCES;
      return rsp;
    }
  }
  if (!memory) {
    try {
      memory = memory_.access(refs, false);
    } catch (const std::system_error&) {
      status = VIBIF_EACCES;
      return rsp;
    }
  }
  entry->mr = hca_.reg_mr(*pd, std::move(memory), r.first_offset, r.length, r.iova, static_cast<int>(r.access));
  entry->page_count = pages;
  const std::uint32_t lkey = entry->mr->lkey(), rkey = entry->mr->rkey();
  const vibif_handle_t h = mrs_.insert(std::move(entry));
  if (h == VIBIF_HANDLE_NONE) {
    status = VIBIF_EDQUOT;
    return rsp;
  }
  pinned_pages_ += pages;
  rsp.u.reg_mr.mr = h;
  rsp.u.reg_mr.lkey = lkey;
  rsp.u.reg_mr.rkey = rkey;
  char iova[24];
  std::snprintf(iova, sizeof iova, "%#llx", static_cast<unsigned long long>(r.iova));
  log_line(LogLevel::debug, subject_, "MR " + std::to_string(h) + ": " + std::to_string(r.length) + " bytes at guest " + iova);
  return rsp;
}

}  // namespace vib::backend
