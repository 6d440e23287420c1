// vibd's control path without Xen: handles, quotas and the device's
// configuration applied to what a guest asks for.
#include <gtest/gtest.h>

#include <cstring>

#include "control.hpp"
#include "fake_guest_memory.hpp"
#include "vib/platform/hca.hpp"

using vib::backend::ControlPath;
using vib::backend::DeviceConfig;

namespace {

class Control : public ::testing::Test {
 protected:
  Control() : hca_(vib::platform::open_hca("soft")), memory_(64) {
    config_.hca = "soft";
    config_.max_ahs = 2;
    config_.max_pinned_pages = 8;
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

  vibif_request reg_mr(vibif_handle_t pd, std::uint64_t iova, std::uint64_t length) {
    auto req = request(VIBIF_OP_REG_MR);
    req.u.reg_mr.pd = pd;
    req.u.reg_mr.access = VIBIF_ACCESS_LOCAL_WRITE | VIBIF_ACCESS_REMOTE_WRITE;
    req.u.reg_mr.iova = iova;
    req.u.reg_mr.length = length;
    req.u.reg_mr.first_offset = static_cast<std::uint32_t>(iova & 0xfff);
    return req;
  }
  void put_refs(std::uint32_t page, std::initializer_list<std::uint32_t> refs) {
    std::memcpy(memory_.page(page), std::data(refs), refs.size() * sizeof(std::uint32_t));
  }

  std::unique_ptr<vib::platform::Hca> hca_;
  vib::test::FakeGuestMemory memory_;
  vibif_doorbell_page doorbell_{};
  DeviceConfig config_;
  std::unique_ptr<ControlPath> control_;
};

}  // namespace

TEST_F(Control, AddressHandlesFollowTheDevicesConfiguration) {
  control_ = std::make_unique<ControlPath>(config_, *hca_, memory_, doorbell_, "test");
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
  control_ = std::make_unique<ControlPath>(config_, *hca_, memory_, doorbell_, "test");
  const vibif_handle_t pd = alloc_pd();
  auto ah = create_ah(pd);
  ASSERT_EQ(ah.hdr.status, VIBIF_OK);
  auto dealloc = request(VIBIF_OP_DEALLOC_PD);
  dealloc.u.handle.handle = pd;
  EXPECT_EQ(call(dealloc).hdr.status, VIBIF_EBUSY);
  alloc_pd();
  EXPECT_EQ(control_->free_all(), "0 QPs, 0 CQs, 0 SRQs, 0 MRs, 1 AHs, 2 PDs (0 guest pages unpinned)");
  EXPECT_EQ(control_->pds(), 0u);
  EXPECT_EQ(control_->ahs(), 0u);
}

TEST_F(Control, MemoryRegistrationResolvesEveryPageListForm) {
  control_ = std::make_unique<ControlPath>(config_, *hca_, memory_, doorbell_, "test");
  const vibif_handle_t pd = alloc_pd();
  // 10000 bytes from offset 0x100 of the first page span exactly 3 pages.
  const std::uint64_t iova = 0x7f1234560100ull;

  auto direct = reg_mr(pd, iova, 10000);
  direct.u.reg_mr.pages = {3, 0, 3, 0, {1, 2, 3}};
  auto rsp = call(direct);
  ASSERT_EQ(rsp.hdr.status, VIBIF_OK);
  EXPECT_NE(rsp.u.reg_mr.lkey, 0u);
  EXPECT_EQ(control_->pinned_pages(), 3u);

  put_refs(10, {4, 5, 6});  // one indirect page
  auto one_level = reg_mr(pd, iova, 10000);
  one_level.u.reg_mr.pages = {3, 1, 1, 0, {10}};
  ASSERT_EQ(call(one_level).hdr.status, VIBIF_OK);

  put_refs(20, {21});  // two levels: page 20 lists page 21, which lists the data
  put_refs(21, {7, 8});
  auto two_levels = reg_mr(pd, iova, 5000);
  two_levels.u.reg_mr.pages = {2, 2, 1, 0, {20}};
  ASSERT_EQ(call(two_levels).hdr.status, VIBIF_OK);
  EXPECT_EQ(control_->pinned_pages(), 8u);

  auto more = reg_mr(pd, iova, 100);
  more.u.reg_mr.pages = {1, 0, 1, 0, {9}};
  EXPECT_EQ(call(more).hdr.status, VIBIF_EDQUOT) << "max-pinned-pages is 8";

  auto dereg = request(VIBIF_OP_DEREG_MR);
  dereg.u.handle.handle = rsp.u.reg_mr.mr;
  EXPECT_EQ(call(dereg).hdr.status, VIBIF_OK);
  EXPECT_EQ(control_->pinned_pages(), 5u);
  EXPECT_EQ(call(dereg).hdr.status, VIBIF_ENOENT);
  EXPECT_EQ(call(more).hdr.status, VIBIF_OK) << "the quota came back";
}

TEST_F(Control, MemoryRegistrationRefusesBadRequests) {
  control_ = std::make_unique<ControlPath>(config_, *hca_, memory_, doorbell_, "test");
  const vibif_handle_t pd = alloc_pd();
  const std::uint64_t iova = 0x7f1234560100ull;
  auto good = reg_mr(pd, iova, 10000);
  good.u.reg_mr.pages = {3, 0, 3, 0, {1, 2, 3}};

  auto forged = good;
  forged.u.reg_mr.pages.refs[1] = 1000;  // not granted
  EXPECT_EQ(call(forged).hdr.status, VIBIF_EACCES);
  auto forged_indirect = good;
  forged_indirect.u.reg_mr.pages = {3, 1, 1, 0, {999}};
  EXPECT_EQ(call(forged_indirect).hdr.status, VIBIF_EACCES);

  auto short_range = good;
  short_range.u.reg_mr.length = 4000;  // fits in 2 pages, 3 given
  EXPECT_EQ(call(short_range).hdr.status, VIBIF_EINVAL);
  auto offset = good;
  offset.u.reg_mr.first_offset = 0x200;  // not the address's page offset
  EXPECT_EQ(call(offset).hdr.status, VIBIF_EINVAL);
  auto counts = good;
  counts.u.reg_mr.pages.nr_refs = 2;  // inline refs disagree with nr_pages
  EXPECT_EQ(call(counts).hdr.status, VIBIF_EINVAL);
  auto levels = good;
  levels.u.reg_mr.pages.levels = 3;
  EXPECT_EQ(call(levels).hdr.status, VIBIF_EINVAL);
  auto access = good;
  access.u.reg_mr.access = 0x100;
  EXPECT_EQ(call(access).hdr.status, VIBIF_EINVAL);
  auto wraps = good;
  wraps.u.reg_mr.iova = 0xfffffffffffff100ull;
  EXPECT_EQ(call(wraps).hdr.status, VIBIF_EINVAL);
  auto no_pd = good;
  no_pd.u.reg_mr.pd = pd + 1;
  EXPECT_EQ(call(no_pd).hdr.status, VIBIF_ENOENT);

  EXPECT_EQ(control_->mrs(), 0u);
  EXPECT_EQ(control_->pinned_pages(), 0u);
  ASSERT_EQ(call(good).hdr.status, VIBIF_OK);
  auto dealloc = request(VIBIF_OP_DEALLOC_PD);
  dealloc.u.handle.handle = pd;
  EXPECT_EQ(call(dealloc).hdr.status, VIBIF_EBUSY) << "the PD has an MR";
  EXPECT_EQ(control_->free_all(), "0 QPs, 0 CQs, 0 SRQs, 1 MRs, 0 AHs, 1 PDs (3 guest pages unpinned)");
}
