// The software HCA behaves like an InfiniBand HCA: data, completions,
// protection checks, error statuses, state machine, events.
#include <gtest/gtest.h>
#include <poll.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <set>
#include <string>
#include <vector>

#include "vib/platform/hca.hpp"

using namespace vib::platform;

namespace {

constexpr int kAllAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
                           IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC;

std::uint64_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

bool readable(int fd, int timeout_ms = 1000) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

// Members in creation order: destruction runs backwards, children first.
struct Endpoint {
  std::unique_ptr<ProtectionDomain> pd;
  std::unique_ptr<CompletionQueue> send_cq;
  std::unique_ptr<CompletionQueue> recv_cq;
  std::vector<std::uint8_t> buffer = std::vector<std::uint8_t>(4096);
  std::unique_ptr<MemoryRegion> mr;
  std::unique_ptr<QueuePair> qp;
};

class SoftHcaTest : public ::testing::Test {
 protected:
  void SetUp() override { hca = open_hca("soft"); }

  Endpoint make(ibv_qp_type type = IBV_QPT_RC, int access = kAllAccess, int cqe = 64,
                SharedReceiveQueue* srq = nullptr, ProtectionDomain* shared_pd = nullptr) {
    Endpoint e;
    if (shared_pd == nullptr) e.pd = hca->alloc_pd();
    ProtectionDomain& pd = shared_pd != nullptr ? *shared_pd : *e.pd;
    e.send_cq = hca->create_cq(cqe);
    e.recv_cq = hca->create_cq(cqe);
    QueuePairInit init;
    init.send_cq = e.send_cq.get();
    init.recv_cq = e.recv_cq.get();
    init.srq = srq;
    init.qp_type = type;
    init.cap = {16, 16, 4, 4, 64};
    e.qp = hca->create_qp(pd, init);
    e.mr = hca->reg_mr(pd, e.buffer.data(), e.buffer.size(), addr(e.buffer.data()), access);
    return e;
  }

  static void to_init(QueuePair& qp, ibv_qp_type type, int access = kAllAccess, std::uint16_t pkey_index = 0) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = pkey_index;
    a.port_num = 1;
    a.qp_access_flags = static_cast<unsigned>(access);
    a.qkey = 0x11111111;
    int mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
               (type == IBV_QPT_UD ? IBV_QP_QKEY : IBV_QP_ACCESS_FLAGS);
    ASSERT_EQ(qp.modify(a, mask), 0);
  }
  // ack_timeout 1: an unreachable responder is RETRY_EXC_ERR after 8 * 8 us.
  static void connect(QueuePair& qp, std::uint32_t remote, ibv_qp_type type,
                      std::uint8_t rnr_retry = 0, int access = kAllAccess, std::uint16_t pkey_index = 0,
                      std::uint8_t ack_timeout = 1) {
    to_init(qp, type, access, pkey_index);
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    int mask = IBV_QP_STATE;
    if (type != IBV_QPT_UD) {
      a.path_mtu = IBV_MTU_4096;
      a.dest_qp_num = remote;
      a.ah_attr.dlid = 1;
      a.ah_attr.port_num = 1;
      mask |= IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
      if (type == IBV_QPT_RC) mask |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
    }
    ASSERT_EQ(qp.modify(a, mask), 0);
    a = {};
    a.qp_state = IBV_QPS_RTS;
    a.rnr_retry = rnr_retry;
    a.retry_cnt = 7;
    a.timeout = ack_timeout;
    mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
    if (type == IBV_QPT_RC)
      mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
    ASSERT_EQ(qp.modify(a, mask), 0);
  }
  void pair(Endpoint& a, Endpoint& b, ibv_qp_type type = IBV_QPT_RC, std::uint8_t rnr = 0,
            int b_access = kAllAccess) {
    connect(*a.qp, b.qp->qp_num(), type, rnr);
    connect(*b.qp, a.qp->qp_num(), type, rnr, b_access);
  }

  static int post_send(Endpoint& e, ibv_wr_opcode op, std::uint32_t offset, std::uint32_t length,
                       Endpoint* remote = nullptr, std::uint32_t remote_offset = 0,
                       unsigned flags = IBV_SEND_SIGNALED) {
    ibv_sge sge{addr(e.buffer.data()) + offset, length, e.mr->lkey()};
    ibv_send_wr wr{};
    wr.wr_id = 42;
    wr.opcode = op;
    wr.send_flags = flags;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.imm_data = htobe32(0xabcd);
    if (remote != nullptr) {
      wr.wr.rdma.remote_addr = addr(remote->buffer.data()) + remote_offset;
      wr.wr.rdma.rkey = remote->mr->rkey();
    }
    const ibv_send_wr* bad = nullptr;
    return e.qp->post_send(&wr, &bad);
  }
  static int post_recv(Endpoint& e, std::uint32_t offset, std::uint32_t length,
                       std::uint64_t wr_id = 7) {
    ibv_sge sge{addr(e.buffer.data()) + offset, length, e.mr->lkey()};
    ibv_recv_wr wr{};
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    const ibv_recv_wr* bad = nullptr;
    return e.qp->post_recv(&wr, &bad);
  }
  static ibv_wc one(CompletionQueue& cq) {
    ibv_wc wc{};
    EXPECT_EQ(cq.poll({&wc, 1}), 1);
    return wc;
  }
  // A completion the HCA delivers later (a transport retry running out).
  static ibv_wc awaited(CompletionQueue& cq) {
    ibv_wc wc{};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (cq.poll({&wc, 1}) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << "no completion within 10 s";
        return wc;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return wc;
  }
  static int count(CompletionQueue& cq) {
    std::array<ibv_wc, 64> wcs{};
    return cq.poll(wcs);
  }
  static ibv_qp_state state(QueuePair& qp) {
    ibv_qp_attr a{};
    ibv_qp_init_attr i{};
    qp.query(a, i);
    return a.qp_state;
  }

  std::unique_ptr<Hca> hca;
};

TEST_F(SoftHcaTest, DeviceAndPortLookLikeAnActiveIbPort) {
  EXPECT_EQ(hca->name(), "soft0");
  ibv_device_attr d{};
  hca->query_device(d);
  EXPECT_EQ(d.phys_port_cnt, 1);
  EXPECT_EQ(d.atomic_cap, IBV_ATOMIC_HCA);
  EXPECT_GT(d.max_qp, 0);
  ibv_port_attr p{};
  hca->query_port(1, p);
  EXPECT_EQ(p.state, IBV_PORT_ACTIVE);
  EXPECT_EQ(p.link_layer, IBV_LINK_LAYER_INFINIBAND);
  EXPECT_NE(p.lid, 0);
  ibv_gid gid{};
  hca->query_gid(1, 0, gid);
  EXPECT_EQ(gid.global.interface_id, d.node_guid);
  std::uint16_t pkey = 0;
  hca->query_pkey(1, 0, pkey);
  EXPECT_EQ(be16toh(pkey), 0xffff);
  EXPECT_THROW(hca->query_port(2, p), std::system_error);
}

TEST_F(SoftHcaTest, SendDeliversDataAndCompletions) {
  auto a = make(), b = make();
  pair(a, b);
  std::memcpy(a.buffer.data(), "hello", 5);
  ASSERT_EQ(post_recv(b, 100, 64), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 5), 0);
  auto s = one(*a.send_cq);
  EXPECT_EQ(s.status, IBV_WC_SUCCESS);
  EXPECT_EQ(s.opcode, IBV_WC_SEND);
  EXPECT_EQ(s.wr_id, 42U);
  EXPECT_EQ(s.qp_num, a.qp->qp_num());
  auto r = one(*b.recv_cq);
  EXPECT_EQ(r.status, IBV_WC_SUCCESS);
  EXPECT_EQ(r.opcode, IBV_WC_RECV);
  EXPECT_EQ(r.byte_len, 5U);
  EXPECT_EQ(r.wc_flags & IBV_WC_WITH_IMM, 0U);
  EXPECT_EQ(r.qp_num, b.qp->qp_num());
  EXPECT_EQ(r.src_qp, a.qp->qp_num());
  EXPECT_EQ(std::memcmp(b.buffer.data() + 100, "hello", 5), 0);
}

TEST_F(SoftHcaTest, SendWithImmCarriesImmediate) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(b, 0, 64), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND_WITH_IMM, 0, 8), 0);
  auto r = one(*b.recv_cq);
  EXPECT_EQ(r.opcode, IBV_WC_RECV);
  EXPECT_NE(r.wc_flags & IBV_WC_WITH_IMM, 0U);
  EXPECT_EQ(r.imm_data, htobe32(0xabcd));
}

TEST_F(SoftHcaTest, RdmaWriteLandsWithoutConsumingReceive) {
  auto a = make(), b = make();
  pair(a, b);
  std::memset(a.buffer.data(), 0x5a, 32);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 32, &b, 256), 0);
  auto s = one(*a.send_cq);
  EXPECT_EQ(s.status, IBV_WC_SUCCESS);
  EXPECT_EQ(s.opcode, IBV_WC_RDMA_WRITE);
  EXPECT_EQ(b.buffer[256], 0x5a);
  EXPECT_EQ(b.buffer[287], 0x5a);
  EXPECT_EQ(b.buffer[288], 0);
  EXPECT_EQ(count(*b.recv_cq), 0);
}

TEST_F(SoftHcaTest, RdmaWriteWithImmCompletesReceive) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(b, 0, 0), 0);
  a.buffer[0] = 9;
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE_WITH_IMM, 0, 16, &b, 512), 0);
  auto r = one(*b.recv_cq);
  EXPECT_EQ(r.status, IBV_WC_SUCCESS);
  EXPECT_EQ(r.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
  EXPECT_EQ(r.byte_len, 16U);
  EXPECT_EQ(r.imm_data, htobe32(0xabcd));
  EXPECT_EQ(b.buffer[512], 9);
}

TEST_F(SoftHcaTest, RdmaReadFetchesRemoteData) {
  auto a = make(), b = make();
  pair(a, b);
  std::memcpy(b.buffer.data() + 64, "remote!", 7);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_READ, 1000, 7, &b, 64), 0);
  auto s = one(*a.send_cq);
  EXPECT_EQ(s.status, IBV_WC_SUCCESS);
  EXPECT_EQ(s.opcode, IBV_WC_RDMA_READ);
  EXPECT_EQ(s.byte_len, 7U);
  EXPECT_EQ(std::memcmp(a.buffer.data() + 1000, "remote!", 7), 0);
}

TEST_F(SoftHcaTest, AtomicsReturnOriginalAndUpdate) {
  auto a = make(), b = make();
  pair(a, b);
  std::uint64_t value = 10;
  std::memcpy(b.buffer.data() + 8, &value, 8);
  ibv_sge sge{addr(a.buffer.data()), 8, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.atomic.remote_addr = addr(b.buffer.data()) + 8;
  wr.wr.atomic.rkey = b.mr->rkey();
  wr.wr.atomic.compare_add = 5;
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).opcode, IBV_WC_FETCH_ADD);
  std::uint64_t got = 0;
  std::memcpy(&got, a.buffer.data(), 8);
  EXPECT_EQ(got, 10U);
  std::memcpy(&got, b.buffer.data() + 8, 8);
  EXPECT_EQ(got, 15U);

  wr.opcode = IBV_WR_ATOMIC_CMP_AND_SWP;
  wr.wr.atomic.compare_add = 15;
  wr.wr.atomic.swap = 99;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).opcode, IBV_WC_COMP_SWAP);
  std::memcpy(&got, b.buffer.data() + 8, 8);
  EXPECT_EQ(got, 99U);
  wr.wr.atomic.compare_add = 1;  // mismatch: no swap, returns current
  wr.wr.atomic.swap = 7;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  std::memcpy(&got, a.buffer.data(), 8);
  EXPECT_EQ(got, 99U);
  std::memcpy(&got, b.buffer.data() + 8, 8);
  EXPECT_EQ(got, 99U);
}

TEST_F(SoftHcaTest, MisalignedAtomicIsRemoteInvalidRequest) {
  auto a = make(), b = make();
  pair(a, b);
  ibv_sge sge{addr(a.buffer.data()), 8, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.atomic.remote_addr = addr(b.buffer.data()) + 3;
  wr.wr.atomic.rkey = b.mr->rkey();
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_INV_REQ_ERR);
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
}

TEST_F(SoftHcaTest, InlineSendAndScatterGather) {
  auto a = make(), b = make();
  pair(a, b);
  char text[] = "inline-data";
  ibv_sge sge{addr(text), 11, 0};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_INLINE | IBV_SEND_SIGNALED;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  std::array<ibv_sge, 2> rsg{ibv_sge{addr(b.buffer.data()), 4, b.mr->lkey()},
                             ibv_sge{addr(b.buffer.data()) + 100, 64, b.mr->lkey()}};
  ibv_recv_wr rwr{};
  rwr.sg_list = rsg.data();
  rwr.num_sge = 2;
  const ibv_recv_wr* rbad = nullptr;
  ASSERT_EQ(b.qp->post_recv(&rwr, &rbad), 0);
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*b.recv_cq).byte_len, 11U);
  EXPECT_EQ(std::memcmp(b.buffer.data(), "inli", 4), 0);
  EXPECT_EQ(std::memcmp(b.buffer.data() + 100, "ne-data", 7), 0);
}

TEST_F(SoftHcaTest, UnsignaledSendHasNoCompletion) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(b, 0, 64), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 4, nullptr, 0, 0), 0);
  EXPECT_EQ(count(*a.send_cq), 0);
  EXPECT_EQ(count(*b.recv_cq), 1);
}

TEST_F(SoftHcaTest, UdSendHasGrhSpaceAndSourceQp) {
  auto a = make(IBV_QPT_UD), b = make(IBV_QPT_UD);
  connect(*a.qp, 0, IBV_QPT_UD);
  connect(*b.qp, 0, IBV_QPT_UD);
  ibv_ah_attr ah_attr{};
  ah_attr.dlid = 1;
  ah_attr.port_num = 1;
  auto ah = hca->create_ah(*a.pd, ah_attr);
  std::memcpy(a.buffer.data(), "ud", 2);
  ASSERT_EQ(post_recv(b, 0, 40 + 64), 0);
  ibv_sge sge{addr(a.buffer.data()), 2, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.ud.ah = ah->native();
  wr.wr.ud.remote_qpn = b.qp->qp_num();
  wr.wr.ud.remote_qkey = 0x11111111;
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  auto r = one(*b.recv_cq);
  EXPECT_EQ(r.byte_len, 42U);
  EXPECT_EQ(r.src_qp, a.qp->qp_num());
  EXPECT_EQ(r.wc_flags & IBV_WC_GRH, 0U) << "a GRH only comes with a global AH";
  EXPECT_EQ(std::memcmp(b.buffer.data() + 40, "ud", 2), 0);
  // Through a global AH the receiver finds the GRH in the first 40 bytes:
  // source GID = the port's GID, destination GID = the AH's.
  ibv_ah_attr global_attr = ah_attr;
  global_attr.is_global = 1;
  global_attr.grh.hop_limit = 64;
  for (int i = 0; i < 16; ++i) global_attr.grh.dgid.raw[i] = static_cast<std::uint8_t>(0xa0 + i);
  auto global_ah = hca->create_ah(*a.pd, global_attr);
  ASSERT_EQ(post_recv(b, 0, 40 + 64), 0);
  wr.wr.ud.ah = global_ah->native();
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  r = one(*b.recv_cq);
  EXPECT_NE(r.wc_flags & IBV_WC_GRH, 0U);
  ibv_gid port_gid;
  hca->query_gid(1, 0, port_gid);
  EXPECT_EQ(std::memcmp(b.buffer.data() + 8, port_gid.raw, 16), 0) << "source GID";
  EXPECT_EQ(std::memcmp(b.buffer.data() + 24, global_attr.grh.dgid.raw, 16), 0) << "destination GID";
  EXPECT_EQ(b.buffer[7], 64) << "hop limit";
  EXPECT_EQ(std::memcmp(b.buffer.data() + 40, "ud", 2), 0);
  wr.wr.ud.ah = ah->native();
  // Wrong qkey: silently dropped, the sender still succeeds.
  ASSERT_EQ(post_recv(b, 0, 104), 0);
  wr.wr.ud.remote_qkey = 0x22;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  EXPECT_EQ(count(*b.recv_cq), 0);
  // Over the UD MTU: local length error.
  std::vector<std::uint8_t> big(8192);
  auto big_mr = hca->reg_mr(*a.pd, big.data(), big.size(), addr(big.data()), 0);
  sge = {addr(big.data()), 4097, big_mr->lkey()};
  wr.wr.ud.remote_qkey = 0x11111111;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_LOC_LEN_ERR);
  big_mr.reset();
  ah.reset();
}

namespace {
// The soft HCA's P_Key table (query_pkey): index -> P_Key.
constexpr std::uint16_t kFullDefault = 0, kLimitedDefault = 1, kFull8001 = 2, kFull8002 = 3;
}  // namespace

// Partitions as on an IB fabric (IBA 10.9): traffic flows only between
// P_Keys of one partition, and not between two limited members.
TEST_F(SoftHcaTest, UdTrafficStaysWithinItsPartition) {
  std::uint16_t pkeys[4];
  for (int i = 0; i < 4; ++i) {
    hca->query_pkey(1, i, pkeys[i]);
    pkeys[i] = be16toh(pkeys[i]);
  }
  ASSERT_EQ(pkeys[kFullDefault], 0xffff);
  ASSERT_EQ(pkeys[kLimitedDefault], 0x7fff);
  ASSERT_EQ(pkeys[kFull8001], 0x8001);
  ASSERT_EQ(pkeys[kFull8002], 0x8002);
  struct Case {
    std::uint16_t from, to;
    bool delivered;
  } cases[] = {{kFull8001, kFull8001, true},           {kFull8001, kFull8002, false},
               {kFull8002, kFull8001, false},          {kFullDefault, kLimitedDefault, true},
               {kLimitedDefault, kFullDefault, true},  {kLimitedDefault, kLimitedDefault, false},
               {kFull8001, kFullDefault, false}};
  for (const auto& c : cases) {
    SCOPED_TRACE("P_Key index " + std::to_string(c.from) + " -> " + std::to_string(c.to));
    auto a = make(IBV_QPT_UD), b = make(IBV_QPT_UD);
    connect(*a.qp, 0, IBV_QPT_UD, 0, kAllAccess, c.from);
    connect(*b.qp, 0, IBV_QPT_UD, 0, kAllAccess, c.to);
    ibv_ah_attr ah_attr{};
    ah_attr.dlid = 1;
    ah_attr.port_num = 1;
    auto ah = hca->create_ah(*a.pd, ah_attr);
    ASSERT_EQ(post_recv(b, 0, 40 + 64), 0);
    ibv_sge sge{addr(a.buffer.data()), 2, a.mr->lkey()};
    ibv_send_wr wr{};
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.wr.ud.ah = ah->native();
    wr.wr.ud.remote_qpn = b.qp->qp_num();
    wr.wr.ud.remote_qkey = 0x11111111;
    const ibv_send_wr* bad = nullptr;
    ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
    EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS) << "unreliable: the sender never knows";
    EXPECT_EQ(count(*b.recv_cq), c.delivered ? 1 : 0);
    ah.reset();
  }
}

TEST_F(SoftHcaTest, RcConnectsOnlyWithinItsPartition) {
  struct Case {
    std::uint16_t a, b;
    bool connected;
  } cases[] = {{kFull8001, kFull8001, true},
               {kFull8001, kFull8002, false},
               {kFullDefault, kLimitedDefault, true},
               {kLimitedDefault, kLimitedDefault, false}};
  for (const auto& c : cases) {
    SCOPED_TRACE("P_Key index " + std::to_string(c.a) + " <-> " + std::to_string(c.b));
    auto a = make(), b = make();
    connect(*a.qp, b.qp->qp_num(), IBV_QPT_RC, 0, kAllAccess, c.a);
    connect(*b.qp, a.qp->qp_num(), IBV_QPT_RC, 0, kAllAccess, c.b);
    std::memcpy(a.buffer.data(), "pk", 2);
    ASSERT_EQ(post_recv(b, 0, 64), 0);
    ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 2), 0);
    EXPECT_EQ(awaited(*a.send_cq).status, c.connected ? IBV_WC_SUCCESS : IBV_WC_RETRY_EXC_ERR);
    EXPECT_EQ(count(*b.recv_cq), c.connected ? 1 : 0);
    // RDMA too: no write lands across partitions.
    if (!c.connected) {
      auto a2 = make(), b2 = make();
      connect(*a2.qp, b2.qp->qp_num(), IBV_QPT_RC, 0, kAllAccess, c.a);
      connect(*b2.qp, a2.qp->qp_num(), IBV_QPT_RC, 0, kAllAccess, c.b);
      b2.buffer[0] = 0;
      a2.buffer[0] = 0x5a;
      ASSERT_EQ(post_send(a2, IBV_WR_RDMA_WRITE, 0, 1, &b2, 0), 0);
      EXPECT_EQ(awaited(*a2.send_cq).status, IBV_WC_RETRY_EXC_ERR);
      EXPECT_EQ(b2.buffer[0], 0);
    }
  }
}

TEST_F(SoftHcaTest, LiveMrKeysAreUnique) {
  // Every key in use stays unique while registrations come and go.
  std::vector<std::uint8_t> buffer(64);
  auto pd = hca->alloc_pd();
  auto held = hca->reg_mr(*pd, buffer.data(), buffer.size(), addr(buffer.data()), 0);
  std::set<std::uint32_t> live{held->lkey()};
  std::vector<std::unique_ptr<MemoryRegion>> mrs;
  for (int i = 0; i < 1000; ++i) {
    mrs.push_back(hca->reg_mr(*pd, buffer.data(), buffer.size(), addr(buffer.data()), 0));
    EXPECT_TRUE(live.insert(mrs.back()->lkey()).second) << "key " << mrs.back()->lkey() << " reused";
  }
  mrs.clear();
}

TEST_F(SoftHcaTest, UcWritesButRefusesReadsAndDropsWithoutReceive) {
  auto a = make(IBV_QPT_UC), b = make(IBV_QPT_UC);
  pair(a, b, IBV_QPT_UC);
  a.buffer[0] = 3;
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 1, &b, 10), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  EXPECT_EQ(b.buffer[10], 3);
  EXPECT_EQ(post_send(a, IBV_WR_RDMA_READ, 0, 1, &b, 10), EINVAL);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);  // no receive: dropped, no RNR
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  EXPECT_EQ(state(*a.qp), IBV_QPS_RTS);
}

TEST_F(SoftHcaTest, WriteWithImmWaitsForReceiveUnderRnrRetryForever) {
  auto a = make(), b = make();
  pair(a, b, IBV_QPT_RC, 7);
  a.buffer[0] = 4;
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE_WITH_IMM, 0, 1, &b, 20), 0);
  EXPECT_EQ(b.buffer[20], 0);  // nothing lands before the receive
  ASSERT_EQ(post_recv(b, 0, 0), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  EXPECT_EQ(one(*b.recv_cq).opcode, IBV_WC_RECV_RDMA_WITH_IMM);
  EXPECT_EQ(b.buffer[20], 4);
}

TEST_F(SoftHcaTest, BadLkeyIsLocalProtectionErrorAndFlushes) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(a, 0, 8, 1), 0);
  ibv_sge sge{addr(a.buffer.data()), 8, a.mr->lkey() + 1};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_SEND;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_LOC_PROT_ERR);
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
  auto flushed = one(*a.recv_cq);
  EXPECT_EQ(flushed.status, IBV_WC_WR_FLUSH_ERR);
  EXPECT_EQ(flushed.wr_id, 1U);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);  // accepted in ERR, flushed
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_WR_FLUSH_ERR);
}

TEST_F(SoftHcaTest, LocalLengthBeyondMrIsProtectionError) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(b, 0, 64), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 4090, 16), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_LOC_PROT_ERR);
}

TEST_F(SoftHcaTest, ReadIntoMrWithoutLocalWriteIsProtectionError) {
  auto a = make(IBV_QPT_RC, IBV_ACCESS_REMOTE_READ * 0), b = make();
  pair(a, b);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_READ, 0, 8, &b, 0), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_LOC_PROT_ERR);
}

TEST_F(SoftHcaTest, PdIsolation) {
  auto a = make(), b = make();
  pair(a, b);
  // An MR of a's PD used in b's remote request: wrong PD → remote access error.
  auto foreign = hca->alloc_pd();
  std::vector<std::uint8_t> other(64);
  auto mr = hca->reg_mr(*foreign, other.data(), other.size(), addr(other.data()), kAllAccess);
  ibv_sge sge{addr(a.buffer.data()), 8, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.rdma.remote_addr = addr(other.data());
  wr.wr.rdma.rkey = mr->rkey();
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_ACCESS_ERR);
  EXPECT_EQ(other[0], 0);

  auto c = make(), d = make();
  pair(c, d);
  sge = {addr(other.data()), 8, mr->lkey()};  // local SGE from another PD
  wr.opcode = IBV_WR_SEND;
  ASSERT_EQ(post_recv(d, 0, 64), 0);
  ASSERT_EQ(c.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*c.send_cq).status, IBV_WC_LOC_PROT_ERR);
  mr.reset();
}

TEST_F(SoftHcaTest, MissingRemoteWriteAccessIsRemoteAccessError) {
  auto a = make(), b = make(IBV_QPT_RC, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
  pair(a, b);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 8, &b, 0), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_ACCESS_ERR);
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
  EXPECT_TRUE(readable(hca->async_fd()));
  auto event = hca->next_async_event();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->type, IBV_EVENT_QP_ACCESS_ERR);
  EXPECT_EQ(event->qp, b.qp.get());
}

TEST_F(SoftHcaTest, RemoteOutOfBoundsIsRemoteAccessError) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 16, &b, 4090), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_ACCESS_ERR);
}

TEST_F(SoftHcaTest, BadRkeyOnReadIsRemoteAccessError) {
  auto a = make(), b = make();
  pair(a, b);
  ibv_sge sge{addr(a.buffer.data()), 8, a.mr->lkey()};
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_RDMA_READ;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.rdma.remote_addr = addr(b.buffer.data());
  wr.wr.rdma.rkey = 0xdead;
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_ACCESS_ERR);
}

TEST_F(SoftHcaTest, SmallReceiveBufferIsLengthErrorBothSides) {
  auto a = make(), b = make();
  pair(a, b);
  ASSERT_EQ(post_recv(b, 0, 4), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 16), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_REM_INV_REQ_ERR);
  EXPECT_EQ(one(*b.recv_cq).status, IBV_WC_LOC_LEN_ERR);
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
  EXPECT_EQ(state(*b.qp), IBV_QPS_ERR);
}

TEST_F(SoftHcaTest, RnrRetryExhausted) {
  auto a = make(), b = make();
  pair(a, b, IBV_QPT_RC, 3);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 4), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_RNR_RETRY_EXC_ERR);
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
}

TEST_F(SoftHcaTest, RnrRetryForeverCompletesWhenReceivePosted) {
  auto a = make(), b = make();
  pair(a, b, IBV_QPT_RC, 7);
  a.buffer[0] = 'x';
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 1, &b, 200), 0);  // ordered behind
  EXPECT_EQ(count(*a.send_cq), 0);
  EXPECT_EQ(b.buffer[200], 0);
  ASSERT_EQ(post_recv(b, 0, 8), 0);
  std::array<ibv_wc, 4> wcs{};
  ASSERT_EQ(a.send_cq->poll(wcs), 2);
  EXPECT_EQ(wcs[0].opcode, IBV_WC_SEND);
  EXPECT_EQ(wcs[1].opcode, IBV_WC_RDMA_WRITE);
  EXPECT_EQ(b.buffer[0], 'x');
  EXPECT_EQ(b.buffer[200], 'x');
}

TEST_F(SoftHcaTest, ModifyToErrorFlushesPendingSends) {
  auto a = make(), b = make();
  pair(a, b, IBV_QPT_RC, 7);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  ASSERT_EQ(a.qp->modify(attr, IBV_QP_STATE), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_WR_FLUSH_ERR);
}

TEST_F(SoftHcaTest, UnreachablePeerIsRetryExceeded) {
  auto a = make();
  connect(*a.qp, 0xffffff, IBV_QPT_RC);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  EXPECT_EQ(awaited(*a.send_cq).status, IBV_WC_RETRY_EXC_ERR);
  EXPECT_EQ(awaited(*a.send_cq).status, IBV_WC_WR_FLUSH_ERR) << "what queued behind it is flushed";
  EXPECT_EQ(state(*a.qp), IBV_QPS_ERR);
}

TEST_F(SoftHcaTest, AResponderThatReachesRtrWithinTheRetryWindowGetsTheMessage) {
  // As on a fabric: the requester retransmits until the responder is ready
  // (ack timeout 18: a window of 8 s, far beyond this test's steps).
  auto a = make(), b = make();
  connect(*a.qp, b.qp->qp_num(), IBV_QPT_RC, 0, kAllAccess, 0, 18);
  std::memcpy(a.buffer.data(), "late", 4);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 4), 0);
  EXPECT_EQ(count(*a.send_cq), 0) << "completed before the responder existed on the wire";
  to_init(*b.qp, IBV_QPT_RC);
  ASSERT_EQ(post_recv(b, 100, 64), 0);
  EXPECT_EQ(count(*a.send_cq), 0);
  connect(*b.qp, a.qp->qp_num(), IBV_QPT_RC);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  auto r = one(*b.recv_cq);
  EXPECT_EQ(r.status, IBV_WC_SUCCESS);
  EXPECT_EQ(r.byte_len, 4u);
  EXPECT_EQ(std::memcmp(b.buffer.data() + 100, "late", 4), 0);
}

// vibd's thread count is what an administrator (and the hostile suite)
// watches for leaks: the HCA's own threads exist from its first object on,
// and a request that waits for its peer (a transport retry) starts none.
TEST_F(SoftHcaTest, ATransportRetryStartsNoThread) {
  auto threads = [] {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& t : std::filesystem::directory_iterator("/proc/self/task")) ++n;
    return n;
  };
  auto a = make();
  const std::size_t before = threads();
  connect(*a.qp, 0xffffff, IBV_QPT_RC);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  EXPECT_EQ(awaited(*a.send_cq).status, IBV_WC_RETRY_EXC_ERR);
  EXPECT_EQ(threads(), before);
}

TEST_F(SoftHcaTest, AZeroAckTimeoutRetriesUntilTheQpIsFlushed) {
  // IBA: a local ACK timeout of 0 means the requester never gives up.
  auto a = make();
  connect(*a.qp, 0xffffff, IBV_QPT_RC, 0, kAllAccess, 0, 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(count(*a.send_cq), 0);
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_ERR;
  ASSERT_EQ(a.qp->modify(attr, IBV_QP_STATE), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_WR_FLUSH_ERR);
}

TEST_F(SoftHcaTest, StateMachineEnforcesTransitionsAndMasks) {
  auto a = make();
  ibv_qp_attr attr{};
  attr.qp_state = IBV_QPS_RTR;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE), EINVAL);  // RESET→RTR
  attr.qp_state = IBV_QPS_INIT;
  attr.port_num = 1;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE | IBV_QP_PORT), EINVAL);  // missing mask bits
  attr.port_num = 2;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                   IBV_QP_ACCESS_FLAGS),
            EINVAL);  // no port 2
  to_init(*a.qp, IBV_QPT_RC);
  EXPECT_EQ(state(*a.qp), IBV_QPS_INIT);
  attr = {};
  attr.qp_state = IBV_QPS_RTR;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE), EINVAL);  // RC RTR needs AV, QPN, ...
  attr.qp_state = IBV_QPS_RTS;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE | IBV_QP_SQ_PSN), EINVAL);  // INIT→RTS
  EXPECT_EQ(post_send(a, IBV_WR_SEND, 0, 1), EINVAL);  // not RTS
  attr.qp_state = IBV_QPS_RESET;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE), 0);
  EXPECT_EQ(state(*a.qp), IBV_QPS_RESET);
  auto b = make();
  pair(a, b);
  EXPECT_EQ(state(*a.qp), IBV_QPS_RTS);
  attr.qp_state = IBV_QPS_SQD;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE), 0);
  attr.qp_state = IBV_QPS_RTS;
  EXPECT_EQ(a.qp->modify(attr, IBV_QP_STATE), 0);
}

TEST_F(SoftHcaTest, PostRejectsBadInputWithBadWr) {
  auto a = make(), b = make();
  pair(a, b);
  ibv_sge sge{addr(a.buffer.data()), 1, a.mr->lkey()};
  ibv_send_wr second{};
  second.opcode = IBV_WR_SEND;
  second.sg_list = &sge;
  second.num_sge = 99;  // beyond max_send_sge
  ibv_send_wr first{};
  first.opcode = IBV_WR_SEND;
  first.sg_list = &sge;
  first.num_sge = 1;
  first.next = &second;
  ASSERT_EQ(post_recv(b, 0, 8), 0);
  const ibv_send_wr* bad = nullptr;
  EXPECT_EQ(a.qp->post_send(&first, &bad), EINVAL);
  EXPECT_EQ(bad, &second);
  ibv_recv_wr rwr{};
  rwr.sg_list = &sge;
  rwr.num_sge = 99;
  const ibv_recv_wr* rbad = nullptr;
  EXPECT_EQ(b.qp->post_recv(&rwr, &rbad), EINVAL);
  EXPECT_EQ(rbad, &rwr);
}

TEST_F(SoftHcaTest, SrqServesReceivesAndRaisesLimitEvent) {
  auto pd = hca->alloc_pd();
  ibv_srq_init_attr init{};
  init.attr.max_wr = 8;
  init.attr.max_sge = 2;
  auto srq = hca->create_srq(*pd, init);
  {
    auto a = make(IBV_QPT_RC, kAllAccess, 64, nullptr, pd.get());
    auto b = make(IBV_QPT_RC, kAllAccess, 64, srq.get(), pd.get());
    pair(a, b);
    for (std::uint64_t i = 0; i < 3; ++i) {
      ibv_sge sge{addr(b.buffer.data()) + i * 16, 16, b.mr->lkey()};
      ibv_recv_wr wr{};
      wr.wr_id = i;
      wr.sg_list = &sge;
      wr.num_sge = 1;
      const ibv_recv_wr* bad = nullptr;
      ASSERT_EQ(srq->post_recv(&wr, &bad), 0);
    }
    ibv_srq_attr limit{};
    limit.srq_limit = 2;
    ASSERT_EQ(srq->modify(limit, IBV_SRQ_LIMIT), 0);
    EXPECT_EQ(post_recv(b, 0, 8), EINVAL);  // a QP with an SRQ has no own RQ
    ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 4), 0);
    EXPECT_EQ(one(*b.recv_cq).wr_id, 0U);
    EXPECT_FALSE(readable(hca->async_fd(), 0));  // 2 left: not below the limit
    ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 4), 0);
    EXPECT_EQ(one(*b.recv_cq).wr_id, 1U);
    ASSERT_TRUE(readable(hca->async_fd()));
    auto event = hca->next_async_event();
    ASSERT_TRUE(event);
    EXPECT_EQ(event->type, IBV_EVENT_SRQ_LIMIT_REACHED);
    EXPECT_EQ(event->srq, srq.get());
    ibv_srq_attr now{};
    srq->query(now);
    EXPECT_EQ(now.srq_limit, 0U);  // disarmed
  }
  srq.reset();
  EXPECT_EQ(hca->dealloc_pd(pd), 0);
}

TEST_F(SoftHcaTest, CompletionNotificationThroughFd) {
  auto a = make(), b = make();
  pair(a, b);
  EXPECT_FALSE(readable(hca->completion_fd(), 0));
  b.recv_cq->request_notify(true);  // solicited only
  ASSERT_EQ(post_recv(b, 0, 8), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  EXPECT_FALSE(readable(hca->completion_fd(), 0));  // not solicited
  ASSERT_EQ(post_recv(b, 0, 8), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1, nullptr, 0, IBV_SEND_SOLICITED), 0);
  ASSERT_TRUE(readable(hca->completion_fd()));
  EXPECT_EQ(hca->next_completion_event(), b.recv_cq.get());
  EXPECT_EQ(hca->next_completion_event(), nullptr);
  EXPECT_FALSE(readable(hca->completion_fd(), 0));
  EXPECT_EQ(count(*b.recv_cq), 2);
  a.send_cq->request_notify(false);
  ASSERT_EQ(post_recv(b, 0, 8), 0);
  ASSERT_EQ(post_send(a, IBV_WR_SEND, 0, 1), 0);
  ASSERT_TRUE(readable(hca->completion_fd()));
  EXPECT_EQ(hca->next_completion_event(), a.send_cq.get());
}

TEST_F(SoftHcaTest, CqOverrunRaisesCqErrorWithoutOverwriting) {
  auto a = make(IBV_QPT_RC, kAllAccess, 2), b = make();
  pair(a, b);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(post_send(a, IBV_WR_RDMA_WRITE, 0, 1, &b, 0), 0);
  ASSERT_TRUE(readable(hca->async_fd()));
  auto event = hca->next_async_event();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->type, IBV_EVENT_CQ_ERR);
  EXPECT_EQ(event->cq, a.send_cq.get());
  EXPECT_EQ(count(*a.send_cq), 2);
}

TEST_F(SoftHcaTest, PdWithChildrenIsBusy) {
  auto pd = hca->alloc_pd();
  std::vector<std::uint8_t> memory(64);
  auto mr = hca->reg_mr(*pd, memory.data(), memory.size(), 0x1000, IBV_ACCESS_LOCAL_WRITE);
  EXPECT_EQ(hca->dealloc_pd(pd), EBUSY);
  EXPECT_NE(pd, nullptr);
  mr.reset();
  EXPECT_EQ(hca->dealloc_pd(pd), 0);
  EXPECT_EQ(pd, nullptr);
}

TEST_F(SoftHcaTest, RegistrationAtIovaIsAddressedByIova) {
  auto a = make(), b = make();
  pair(a, b);
  std::vector<std::uint8_t> target(128);
  auto mr = hca->reg_mr(*b.pd, target.data(), target.size(), 0x7000'0000,
                        IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ibv_sge sge{addr(a.buffer.data()), 4, a.mr->lkey()};
  a.buffer[0] = 0x77;
  ibv_send_wr wr{};
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.wr.rdma.remote_addr = 0x7000'0000 + 100;
  wr.wr.rdma.rkey = mr->rkey();
  const ibv_send_wr* bad = nullptr;
  ASSERT_EQ(a.qp->post_send(&wr, &bad), 0);
  EXPECT_EQ(one(*a.send_cq).status, IBV_WC_SUCCESS);
  EXPECT_EQ(target[100], 0x77);
  EXPECT_THROW(hca->reg_mr(*b.pd, target.data(), 8, 0, IBV_ACCESS_REMOTE_WRITE),
               std::system_error);  // remote write needs local write
}

TEST_F(SoftHcaTest, TwoThreadsPostConcurrently) {
  auto a = make(IBV_QPT_RC, kAllAccess, 4096), b = make(IBV_QPT_RC, kAllAccess, 4096);
  pair(a, b);
  constexpr int kRounds = 500;
  auto worker = [&](Endpoint& self, Endpoint& peer, std::uint32_t offset) {
    int done = 0;
    for (int i = 0; i < kRounds; ++i) {
      if (post_send(self, IBV_WR_RDMA_WRITE, offset, 8, &peer, offset) != 0) return -1;
      done += count(*self.send_cq);
    }
    for (int spins = 0; done < kRounds && spins < 1000; ++spins) done += count(*self.send_cq);
    return done;
  };
  int a_done = 0, b_done = 0;
  std::thread t1([&] { a_done = worker(a, b, 0); });
  std::thread t2([&] { b_done = worker(b, a, 64); });
  t1.join();
  t2.join();
  EXPECT_EQ(a_done, kRounds);
  EXPECT_EQ(b_done, kRounds);
}

// Pairs in threads of their own, each side sending to the other: a SEND
// that finds no receive waits (rnr_retry 7) until the peer's thread posts
// one, so requesters and responders of both directions cross all the time;
// and every message also adds 1 to one counter that all pairs share
// (registered in each PD). No message is lost, reordered or altered, no
// thread waits for ever, and the counter holds every add.
TEST_F(SoftHcaTest, PairsInThreadsCrossingEachOtherLoseNothing) {
  constexpr int kPairs = 3;
  constexpr int kMessages = 2000;
  constexpr std::uint32_t kSize = 64;
  std::vector<Endpoint> sides;
  for (int i = 0; i < 2 * kPairs; ++i) sides.push_back(make(IBV_QPT_RC, kAllAccess, 4096));
  for (int i = 0; i < kPairs; ++i) pair(sides[2 * i], sides[2 * i + 1], IBV_QPT_RC, 7);
  alignas(8) std::uint64_t counter = 0;
  std::vector<std::unique_ptr<MemoryRegion>> counter_mrs;
  for (auto& side : sides) {
    counter_mrs.push_back(hca->reg_mr(*side.pd, &counter, sizeof counter, addr(&counter), kAllAccess));
  }

  // Lower half of a side's buffer: what it sends, slot m % 16; upper half:
  // where it receives; the last 128 bytes: fetch-and-add results.
  auto byte_of = [](int sender, int m, std::uint32_t j) {
    return static_cast<std::uint8_t>(sender * 31 + m * 7 + j);
  };
  std::atomic<bool> give_up{false};
  auto run = [&](int self_index, int peer_index) -> std::string {
    Endpoint& self = sides[self_index];
    const std::uint32_t counter_rkey = counter_mrs[peer_index]->rkey();
    int sends_done = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    auto reap_sends = [&]() -> std::string {
      std::array<ibv_wc, 16> wcs{};
      const int n = self.send_cq->poll(wcs);
      for (int k = 0; k < n; ++k) {
        if (wcs[k].status != IBV_WC_SUCCESS) return "send completion status " + std::to_string(wcs[k].status);
      }
      sends_done += n;
      return {};
    };
    for (int m = 0; m < kMessages; ++m) {
      // At most 6 messages (12 requests) outstanding of the 16 the QP takes.
      while (2 * m - sends_done > 12) {
        if (auto e = reap_sends(); !e.empty()) return e;
        if (give_up || std::chrono::steady_clock::now() > deadline) return "stuck waiting for send completions";
        std::this_thread::yield();
      }
      const std::uint32_t out = (m % 16) * kSize;
      for (std::uint32_t j = 0; j < kSize; ++j) self.buffer[out + j] = byte_of(self_index, m, j);
      if (post_send(self, IBV_WR_SEND, out, kSize) != 0) return "post SEND failed";
      ibv_sge sge{addr(self.buffer.data()) + 3968 + (m % 16) * 8, 8, self.mr->lkey()};
      ibv_send_wr wr{};
      wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.sg_list = &sge;
      wr.num_sge = 1;
      wr.wr.atomic.remote_addr = addr(&counter);
      wr.wr.atomic.rkey = counter_rkey;
      wr.wr.atomic.compare_add = 1;
      const ibv_send_wr* bad = nullptr;
      if (self.qp->post_send(&wr, &bad) != 0) return "post FETCH_AND_ADD failed";
      // The receive for the peer's message m, posted only now: the peer's
      // SEND may well be waiting for it.
      const std::uint32_t in = 2048 + (m % 16) * kSize;
      if (post_recv(self, in, kSize, static_cast<std::uint64_t>(m)) != 0) return "post_recv failed";
      ibv_wc wc{};
      while (self.recv_cq->poll({&wc, 1}) == 0) {
        if (auto e = reap_sends(); !e.empty()) return e;
        if (give_up || std::chrono::steady_clock::now() > deadline)
          return "message " + std::to_string(m) + " never arrived";
        std::this_thread::yield();
      }
      if (wc.status != IBV_WC_SUCCESS || wc.wr_id != static_cast<std::uint64_t>(m) || wc.byte_len != kSize)
        return "receive " + std::to_string(m) + ": status " + std::to_string(wc.status) + ", wr_id " +
               std::to_string(wc.wr_id) + ", " + std::to_string(wc.byte_len) + " bytes";
      for (std::uint32_t j = 0; j < kSize; ++j) {
        if (self.buffer[in + j] != byte_of(peer_index, m, j))
          return "message " + std::to_string(m) + " byte " + std::to_string(j) + " altered";
      }
    }
    while (sends_done < 2 * kMessages) {
      if (auto e = reap_sends(); !e.empty()) return e;
      if (give_up || std::chrono::steady_clock::now() > deadline) return "stuck waiting for the last completions";
      std::this_thread::yield();
    }
    return {};
  };
  std::vector<std::string> verdicts(sides.size());
  std::vector<std::thread> threads;
  for (int i = 0; i < 2 * kPairs; ++i) {
    threads.emplace_back([&, i] {
      verdicts[i] = run(i, i ^ 1);
      if (!verdicts[i].empty()) give_up = true;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 2 * kPairs; ++i) EXPECT_EQ(verdicts[i], "") << "side " << i;
  EXPECT_EQ(counter, std::uint64_t{2} * kPairs * kMessages);
}

}  // namespace
