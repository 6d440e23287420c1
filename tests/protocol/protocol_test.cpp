// The vibif ABI: layout, ring use, and agreement with rdma-core's numbering.
#include <gtest/gtest.h>
#include <infiniband/verbs.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "vib/vibif.h"

extern "C" {
size_t vibif_c_request_size(void);
size_t vibif_c_doorbell_events_offset(void);
unsigned vibif_c_ring_entries(unsigned order);
}

TEST(Protocol, CAndCxxSeeTheSameLayout) {
  EXPECT_EQ(vibif_c_request_size(), sizeof(vibif_request));
  EXPECT_EQ(vibif_c_doorbell_events_offset(), offsetof(vibif_doorbell_page, events));
  EXPECT_EQ(vibif_c_ring_entries(0), VIBIF_CTRL_RING_SIZE(0));
  EXPECT_EQ(vibif_c_ring_entries(4), VIBIF_CTRL_RING_SIZE(4));
}

TEST(Protocol, RingSizesPerPageOrder) {
  // 64 bytes of ring header, 256-byte entries, rounded down to a power of two.
  EXPECT_EQ(VIBIF_CTRL_RING_SIZE(0), 8u);
  EXPECT_EQ(VIBIF_CTRL_RING_SIZE(1), 16u);
  EXPECT_EQ(VIBIF_CTRL_RING_SIZE(VIBIF_MAX_RING_PAGE_ORDER), 128u);
  EXPECT_EQ(offsetof(vibif_ctrl_sring, ring), 64u);
}

TEST(Protocol, RequestsAndResponsesTravelThroughAMultiPageRing) {
  constexpr unsigned order = 2;
  const std::size_t bytes = VIBIF_PAGE_SIZE << order;
  std::unique_ptr<void, decltype(&std::free)> pages(std::aligned_alloc(VIBIF_PAGE_SIZE, bytes), &std::free);
  auto* shared = static_cast<vibif_ctrl_sring*>(pages.get());
  SHARED_RING_INIT(shared);
  vibif_ctrl_front_ring front;
  vibif_ctrl_front_ring_init(&front, shared, bytes);
  vibif_ctrl_back_ring back;
  vibif_ctrl_back_ring_init(&back, shared, bytes);
  ASSERT_EQ(RING_SIZE(&front), VIBIF_CTRL_RING_SIZE(order));

  // Fill the ring completely, twice round, to cross the wrap.
  for (unsigned lap = 0; lap < 2; ++lap) {
    const unsigned n = RING_SIZE(&front);
    for (unsigned i = 0; i < n; ++i) {
      ASSERT_FALSE(RING_FULL(&front));
      vibif_request* req = RING_GET_REQUEST(&front, front.req_prod_pvt);
      std::memset(req, 0, sizeof(*req));
      req->hdr.id = lap * 1000 + i;
      req->hdr.op = VIBIF_OP_ALLOC_PD;
      front.req_prod_pvt++;
    }
    EXPECT_TRUE(RING_FULL(&front));
    int notify = 0;
    notify = vibif_ctrl_front_push(&front);
    EXPECT_TRUE(notify);

    unsigned seen = 0;
    for (int more = 1; more;) {
      // The back-end's idiom: drain, then re-arm req_event and check once more.
      if (!RING_HAS_UNCONSUMED_REQUESTS(&back)) {
        more = vibif_ctrl_back_final_check(&back);
        continue;
      }
      vibif_request copy;  // the back-end copies before it looks
      std::memcpy(&copy, RING_GET_REQUEST(&back, back.req_cons), sizeof(copy));
      back.req_cons++;
      EXPECT_EQ(copy.hdr.id, lap * 1000 + seen);
      vibif_response* rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
      rsp->hdr.id = copy.hdr.id;
      rsp->hdr.op = copy.hdr.op;
      rsp->hdr.status = VIBIF_OK;
      rsp->u.handle.handle = vibif_make_handle(seen, 1);
      back.rsp_prod_pvt++;
      ++seen;
    }
    EXPECT_EQ(seen, n);
    notify = vibif_ctrl_back_push(&back);
    EXPECT_TRUE(notify);
    for (unsigned i = 0; i < n; ++i) {
      ASSERT_TRUE(RING_HAS_UNCONSUMED_RESPONSES(&front));
      const vibif_response* rsp = RING_GET_RESPONSE(&front, front.rsp_cons);
      EXPECT_EQ(rsp->hdr.id, lap * 1000 + i);
      EXPECT_EQ(VIBIF_HANDLE_INDEX(rsp->u.handle.handle), i);
      EXPECT_EQ(VIBIF_HANDLE_GENERATION(rsp->u.handle.handle), 1u);
      front.rsp_cons++;
    }
    int more_responses = 0;
    more_responses = vibif_ctrl_front_final_check(&front);
    EXPECT_FALSE(more_responses);
  }
}

TEST(Protocol, FastPathLayouts) {
  EXPECT_EQ(sizeof(vibif_send_wqe), 64u);
  EXPECT_EQ(sizeof(vibif_sge), 16u);
  EXPECT_EQ(sizeof(vibif_recv_wqe), 16u);
  EXPECT_EQ(sizeof(vibif_cqe), 64u);
  EXPECT_EQ(offsetof(vibif_cqe, owner), 63u);
  EXPECT_EQ(sizeof(vibif_doorbell_page), VIBIF_PAGE_SIZE);
  EXPECT_EQ(offsetof(vibif_doorbell_page, slots), 64u);
  EXPECT_EQ(offsetof(vibif_doorbell_page, events) + sizeof(vibif_event) * VIBIF_EVENT_QUEUE_LEN,
            VIBIF_PAGE_SIZE);
  // A send WQE with the most SGEs, or the most inline data, fits a stride of
  // at most 1 KiB.
  EXPECT_LE(sizeof(vibif_send_wqe) + VIBIF_MAX_SGE * sizeof(vibif_sge), 1024u);
  EXPECT_LE(sizeof(vibif_send_wqe) + VIBIF_MAX_INLINE, 1024u);
}

TEST(Protocol, PageListsReachTheDocumentedSizes) {
  const std::uint64_t two_levels = std::uint64_t{VIBIF_PAGE_LIST_INLINE} * VIBIF_REFS_PER_PAGE * VIBIF_REFS_PER_PAGE;
  EXPECT_GE(two_levels * VIBIF_PAGE_SIZE, std::uint64_t{16} << 30);  // at least 16 GiB
  EXPECT_EQ(VIBIF_REFS_PER_PAGE, 1024u);
}

TEST(Protocol, NumberingIsRdmaCores) {
  EXPECT_EQ(VIBIF_QPT_RC, IBV_QPT_RC);
  EXPECT_EQ(VIBIF_QPT_UC, IBV_QPT_UC);
  EXPECT_EQ(VIBIF_QPT_UD, IBV_QPT_UD);
  EXPECT_EQ(VIBIF_ACCESS_LOCAL_WRITE, IBV_ACCESS_LOCAL_WRITE);
  EXPECT_EQ(VIBIF_ACCESS_REMOTE_WRITE, IBV_ACCESS_REMOTE_WRITE);
  EXPECT_EQ(VIBIF_ACCESS_REMOTE_READ, IBV_ACCESS_REMOTE_READ);
  EXPECT_EQ(VIBIF_ACCESS_REMOTE_ATOMIC, IBV_ACCESS_REMOTE_ATOMIC);
  EXPECT_EQ(VIBIF_GID_TYPE_IB, IBV_GID_TYPE_IB);
  EXPECT_EQ(VIBIF_GID_TYPE_ROCE_V1, IBV_GID_TYPE_ROCE_V1);
  EXPECT_EQ(VIBIF_GID_TYPE_ROCE_V2, IBV_GID_TYPE_ROCE_V2);
  EXPECT_EQ(VIBIF_WR_RDMA_WRITE, IBV_WR_RDMA_WRITE);
  EXPECT_EQ(VIBIF_WR_RDMA_WRITE_WITH_IMM, IBV_WR_RDMA_WRITE_WITH_IMM);
  EXPECT_EQ(VIBIF_WR_SEND, IBV_WR_SEND);
  EXPECT_EQ(VIBIF_WR_SEND_WITH_IMM, IBV_WR_SEND_WITH_IMM);
  EXPECT_EQ(VIBIF_WR_RDMA_READ, IBV_WR_RDMA_READ);
  EXPECT_EQ(VIBIF_WR_ATOMIC_CMP_AND_SWP, IBV_WR_ATOMIC_CMP_AND_SWP);
  EXPECT_EQ(VIBIF_WR_ATOMIC_FETCH_AND_ADD, IBV_WR_ATOMIC_FETCH_AND_ADD);
  EXPECT_EQ(VIBIF_SEND_FENCE, IBV_SEND_FENCE);
  EXPECT_EQ(VIBIF_SEND_SIGNALED, IBV_SEND_SIGNALED);
  EXPECT_EQ(VIBIF_SEND_SOLICITED, IBV_SEND_SOLICITED);
  EXPECT_EQ(VIBIF_SEND_INLINE, IBV_SEND_INLINE);
}

TEST(Protocol, HandlesNeverCollideWithNone) {
  for (unsigned index : {0u, 1u, 0xffffu})
    for (unsigned gen : {1u, 2u, 0xffffu}) {
      const vibif_handle_t h = vibif_make_handle(index, gen);
      EXPECT_NE(h, VIBIF_HANDLE_NONE);
      EXPECT_EQ(VIBIF_HANDLE_INDEX(h), index);
      EXPECT_EQ(VIBIF_HANDLE_GENERATION(h), gen);
    }
}
