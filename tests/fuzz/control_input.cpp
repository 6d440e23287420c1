#include "control_input.hpp"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "control.hpp"
#include "fake_guest_memory.hpp"
#include "vib/platform/hca.hpp"

namespace vib::test {

namespace {

bool valid_status(std::int32_t s) {
  switch (s) {
    case VIBIF_OK: case VIBIF_EPERM: case VIBIF_ENOENT: case VIBIF_EIO: case VIBIF_EAGAIN:
    case VIBIF_ENOMEM: case VIBIF_EACCES: case VIBIF_EFAULT: case VIBIF_EBUSY: case VIBIF_EINVAL:
    case VIBIF_ENOSPC: case VIBIF_ENOSYS: case VIBIF_EOVERFLOW: case VIBIF_EDQUOT:
      return true;
    default:
      return false;
  }
}

}  // namespace

void run_control_input(const std::uint8_t* data, std::size_t size) {
  static std::unique_ptr<platform::Hca> hca = platform::open_hca("soft");
  backend::DeviceConfig config;
  config.hca = "soft";
  config.max_pds = 4;
  // Guest memory of 64 pages: refs beyond them are forged and refused.
  static FakeGuestMemory memory(64);
  config.max_pinned_pages = 48;
  vibif_doorbell_page doorbell{};
  backend::ControlPath control(config, *hca, memory, doorbell, "fuzz");
  std::vector<vibif_handle_t> handles;
  for (std::size_t offset = 0; offset < size; offset += sizeof(vibif_request)) {
    vibif_request req;
    std::memset(&req, 0, sizeof(req));
    std::memcpy(&req, data + offset, std::min(sizeof(req), size - offset));
    if (req.u.handle.handle < 16 && !handles.empty())
      req.u.handle.handle = handles[req.u.handle.handle % handles.size()];
    const vibif_response rsp = control.execute(req);
    if (rsp.hdr.id != req.hdr.id || rsp.hdr.op != req.hdr.op || !valid_status(rsp.hdr.status)) std::abort();
    if (rsp.hdr.status == VIBIF_OK) {
      switch (req.hdr.op) {
        case VIBIF_OP_ALLOC_PD:
        case VIBIF_OP_CREATE_AH: handles.push_back(rsp.u.handle.handle); break;
        case VIBIF_OP_CREATE_CQ: handles.push_back(rsp.u.create_cq.cq); break;
        case VIBIF_OP_CREATE_QP: handles.push_back(rsp.u.create_qp.qp); break;
        case VIBIF_OP_CREATE_SRQ: handles.push_back(rsp.u.create_srq.srq); break;
        case VIBIF_OP_REG_MR: handles.push_back(rsp.u.reg_mr.mr); break;
        default: break;
      }
    }
    // The guest's side of the fast path is hostile too: the header's spare
    // fields scribble on a doorbell slot and on a guest page (where queues
    // live), then the queues are served.
    if (req.hdr.reserved1 != 0) {
      auto& slot = doorbell.slots[req.hdr.reserved1 % VIBIF_DB_SLOTS];
      (req.hdr.reserved1 & 0x100 ? slot.consumer : slot.producer) = static_cast<std::uint32_t>(req.hdr.id);
      doorbell.event_consumer = static_cast<std::uint32_t>(req.hdr.id >> 32);
      std::memcpy(memory.page(req.hdr.reserved0 % 64) + (req.hdr.reserved1 >> 20) % 4096 / 64 * 64, &req,
                  64);
    }
    control.service_queues();
    control.queues_pending();
    if (control.pds() > config.max_pds || control.cqs() > config.max_cqs || control.qps() > config.max_qps ||
        control.pinned_pages() > config.max_pinned_pages)
      std::abort();  // a quota was broken
  }
}

}  // namespace vib::test
