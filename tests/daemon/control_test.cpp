// vibd's control path without Xen: handles, quotas and the device's
// configuration applied to what a guest asks for.
#include <gtest/gtest.h>

#include <cstring>

#include "control.hpp"
#include "vib/platform/hca.hpp"

using vib::backend::ControlPath;
using vib::backend::DeviceConfig;

namespace {

class Control : public ::testing::Test {
 protected:
  Control() : hca_(vib::platform::open_hca("soft")) {
    config_.hca = "soft";
    config_.max_ahs = 2;
    config_.gid_indices = {0};
  }

  static vibif_request request(std::uint16_t op) {
    vibif_request req;
    std::memset(&req, 0, sizeof(req));
    req.hdr.op = op;
    return req;
  }
  vibif_response call(const vibif_request& req) { return control_->execute(req); }
  vibif_handle_t alloc_pd() {
    auto rsp = call(request(VIBIF_OP_ALLOC_PD));
    EXPECT_EQ(rsp.hdr.status, VIBIF_OK);
    return rsp.u.handle.handle;
  }
  vibif_response create_ah(vibif_handle_t pd, bool global = false, std::uint8_t sgid_index = 0) {
    auto req = request(VIBIF_OP_CREATE_AH);
    req.u.create_ah.pd = pd;
    req.u.create_ah.attr.port_num = 1;
    req.u.create_ah.attr.dlid = 1;
    req.u.create_ah.attr.is_global = global;
    req.u.create_ah.attr.sgid_index = sgid_index;
    return call(req);
  }

  std::unique_ptr<vib::platform::Hca> hca_;
  DeviceConfig config_;
  std::unique_ptr<ControlPath> control_;
};

}  // namespace

TEST_F(Control, AddressHandlesFollowTheDevicesConfiguration) {
  control_ = std::make_unique<ControlPath>(config_, *hca_, "test");
  const vibif_handle_t pd = alloc_pd();
  auto ah = create_ah(pd);
  ASSERT_EQ(ah.hdr.status, VIBIF_OK);
  EXPECT_EQ(create_ah(pd, true, 0).hdr.status, VIBIF_OK);
  EXPECT_EQ(create_ah(pd).hdr.status, VIBIF_EDQUOT) << "max-ahs is 2";
  EXPECT_EQ(create_ah(pd ^ 0x10000).hdr.status, VIBIF_ENOENT) << "stale PD handle";

  auto destroy = request(VIBIF_OP_DESTROY_AH);
  destroy.u.handle.handle = ah.u.handle.handle;
  EXPECT_EQ(call(destroy).hdr.status, VIBIF_OK);
  EXPECT_EQ(call(destroy).hdr.status, VIBIF_ENOENT);
  EXPECT_EQ(create_ah(pd, true, 1).hdr.status, VIBIF_EPERM) << "GID index 1 is not allowed";

  auto port2 = request(VIBIF_OP_CREATE_AH);
  port2.u.create_ah.pd = pd;
  port2.u.create_ah.attr.port_num = 2;
  EXPECT_EQ(call(port2).hdr.status, VIBIF_EINVAL);
}

TEST_F(Control, APdInUseCannotBeFreedAndEverythingGoesWithTheContext) {
  control_ = std::make_unique<ControlPath>(config_, *hca_, "test");
  const vibif_handle_t pd = alloc_pd();
  auto ah = create_ah(pd);
  ASSERT_EQ(ah.hdr.status, VIBIF_OK);
  auto dealloc = request(VIBIF_OP_DEALLOC_PD);
  dealloc.u.handle.handle = pd;
  EXPECT_EQ(call(dealloc).hdr.status, VIBIF_EBUSY);
  alloc_pd();
  EXPECT_EQ(control_->free_all(), "2 PDs, 1 AHs");
  EXPECT_EQ(control_->pds(), 0u);
  EXPECT_EQ(control_->ahs(), 0u);
}
