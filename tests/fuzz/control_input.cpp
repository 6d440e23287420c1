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
  backend::ControlPath control(config, *hca, memory, "fuzz");
  std::vector<vibif_handle_t> handles;
  for (std::size_t offset = 0; offset < size; offset += sizeof(vibif_request)) {
    vibif_request req;
    std::memset(&req, 0, sizeof(req));
    std::memcpy(&req, data + offset, std::min(sizeof(req), size - offset));
    if (req.u.handle.handle < 16 && !handles.empty())
      req.u.handle.handle = handles[req.u.handle.handle % handles.size()];
    const vibif_response rsp = control.execute(req);
    if (rsp.hdr.id != req.hdr.id || rsp.hdr.op != req.hdr.op || !valid_status(rsp.hdr.status)) std::abort();
    if (rsp.hdr.status == VIBIF_OK && req.hdr.op == VIBIF_OP_ALLOC_PD) handles.push_back(rsp.u.handle.handle);
    if (control.pds() > config.max_pds || control.pinned_pages() > config.max_pinned_pages)
      std::abort();  // a quota was broken
  }
}

}  // namespace vib::test
