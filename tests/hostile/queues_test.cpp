// The malicious-frontend suite (docs/security.md), attacks through the fast
// path: work requests with every bad opcode, length, SGE count, key, address
// and alignment written straight into a QP's shared queues, a doorbell page
// scribbled over while vibd serves it, and an SRQ fed malformed entries and
// an overrun. The QP (or context) that was lied to breaks, the SRQ drops
// what it cannot use; vibd, the attacker's other objects and the victim
// carry on.
#include <gtest/gtest.h>
#include <infiniband/verbs.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <thread>

#include "hostile_fixture.hpp"
#include "rc_connect.hpp"
#include "vib/front/wire.hpp"

using namespace vib::platform;
using namespace std::chrono_literals;
using vib::test::HostileContext;
using vib::test::RawGuest;

namespace {

constexpr std::uint32_t kCqEntries = VIBIF_PAGE_SIZE / sizeof(vibif_cqe);
constexpr std::uint32_t kWr = 8, kSge = 4, kInline = 64;
constexpr std::uint32_t kMrPages = 4;

class HostileQueues : public HostileContext {
 protected:
  // The attacker's objects in `context`: a CQ, an MR over mr_pages_ with
  // every access right, and RC QPs made by make_qp().
  void objects_in(RawGuest& context) {
    context_ = &context;
    pd_here_ = ok(VIBIF_OP_ALLOC_PD, request(VIBIF_OP_ALLOC_PD), context_).u.handle.handle;
    cq_pages_ = share(1);
    auto cq_req = create_cq(inline_list(cq_pages_->refs()));
    const auto cq = ok(VIBIF_OP_CREATE_CQ, cq_req, context_);
    cq_ = cq.u.create_cq.cq;
    cq_slot_ = cq.u.create_cq.doorbell_slot;
    mr_pages_ = share(kMrPages);
    auto mr_req = reg_mr(VIBIF_ACCESS_ALL, inline_list(mr_pages_->refs()), kMrPages);
    mr_req.u.reg_mr.pd = pd_here_;
    const auto mr = ok(VIBIF_OP_REG_MR, mr_req, context_);
    mr_ = mr.u.reg_mr.mr;
    lkey_ = mr.u.reg_mr.lkey;
    rkey_ = mr.u.reg_mr.rkey;
    auto port = request(VIBIF_OP_QUERY_PORT);
    port.u.query_port.port = 1;
    lid_ = ok(VIBIF_OP_QUERY_PORT, port, context_).u.query_port.lid;
    qp_pages_ = share(vibif_qp_buffer_pages(kWr, vibif_send_wqe_stride(kSge, kInline), kWr,
                                            vibif_recv_wqe_stride(kSge)));
  }

  struct Queue {
    std::uint16_t slot = 0;
    std::uint32_t stride = 0;
    std::uint64_t offset = 0;
    std::uint32_t producer = 0;
  };
  struct Qp {
    vibif_handle_t handle = 0;
    std::uint32_t qp_num = 0;
    Queue sq, rq;
  };

  // An RC QP on qp_pages_, connected to itself (loopback through the HCA);
  // with `srq`, receiving from that SRQ (and so without a receive queue).
  Qp make_qp(vibif_handle_t srq = VIBIF_HANDLE_NONE) {
    auto req = request(VIBIF_OP_CREATE_QP);
    auto& q = req.u.create_qp;
    q.pd = pd_here_;
    q.send_cq = q.recv_cq = cq_;
    q.srq = srq;
    q.qp_type = VIBIF_QPT_RC;
    q.cap = {kWr, srq ? 0u : kWr, kSge, srq ? 0u : kSge, kInline};
    q.pages = inline_list(qp_pages_->refs().first(
        srq ? vibif_qp_buffer_pages(kWr, vibif_send_wqe_stride(kSge, kInline), 0, 0) : qp_pages_->refs().size()));
    const auto rsp = ok(VIBIF_OP_CREATE_QP, req, context_).u.create_qp;
    Qp qp{rsp.qp, rsp.qp_num, {rsp.sq_doorbell_slot, rsp.send_wqe_stride, 0, 0},
          {rsp.rq_doorbell_slot, rsp.recv_wqe_stride, rsp.recv_queue_offset, 0}};
    const int access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                       IBV_ACCESS_REMOTE_ATOMIC;
    for (const auto& step : vib::test::rc_connect_steps(lid_, qp.qp_num, access)) {
      auto m = request(VIBIF_OP_MODIFY_QP);
      m.u.modify_qp.qp = qp.handle;
      m.u.modify_qp.attr_mask = static_cast<std::uint32_t>(step.mask);
      vib::front::to_wire(step.attr, m.u.modify_qp.attr);
      ok(VIBIF_OP_MODIFY_QP, m, context_);
    }
    return qp;
  }

  std::byte* entry(Queue& q) {
    return qp_pages_->bytes().data() + q.offset + std::size_t{q.producer % kWr} * q.stride;
  }
  // Publishes the queue's producer as the protocol says (release, then a
  // kick unless vibd polls); a control request then makes vibd serve the
  // queues before it answers (vibif.h: WQEs before a request reach the HCA
  // before its response).
  void ring(Queue& q, std::uint32_t producer) {
    __atomic_store_n(&context_->doorbell().slots[q.slot].producer, producer, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&context_->doorbell().backend_polling, __ATOMIC_ACQUIRE)) context_->kick();
  }
  std::uint32_t qp_state(const Qp& qp) {
    const auto rsp = ok(VIBIF_OP_QUERY_QP, handle_request(VIBIF_OP_QUERY_QP, qp.handle), context_);
    return rsp.u.query_qp.attr.qp_state;
  }
  // Polls every CQE written so far, as a guest would, checking that each
  // is one the protocol allows.
  std::vector<vibif_cqe> poll_cq() {
    std::vector<vibif_cqe> polled;
    auto& slot = context_->doorbell().slots[cq_slot_];
    for (;;) {
      const std::uint32_t i = cq_consumer_;
      const std::byte* at = cq_pages_->bytes().data() + std::size_t{i % kCqEntries} * sizeof(vibif_cqe);
      const auto owner = __atomic_load_n(reinterpret_cast<const std::uint8_t*>(at) + offsetof(vibif_cqe, owner),
                                         __ATOMIC_ACQUIRE);
      if (owner != vibif_cqe_owner(i, kCqEntries)) break;
      vibif_cqe cqe;
      std::memcpy(&cqe, at, sizeof cqe);
      polled.push_back(cqe);
      ++cq_consumer_;
    }
    __atomic_store_n(&slot.consumer, cq_consumer_, __ATOMIC_RELEASE);
    return polled;
  }
  // Until every completion of the WQEs posted has come (or `limit`).
  std::vector<vibif_cqe> completions(std::size_t want, std::chrono::milliseconds limit = 5s) {
    std::vector<vibif_cqe> all;
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (all.size() < want && std::chrono::steady_clock::now() < deadline) {
      auto more = poll_cq();
      all.insert(all.end(), more.begin(), more.end());
      if (more.empty()) std::this_thread::sleep_for(1ms);
    }
    return all;
  }

  // Posts one receive into the MR's second page: the WQE written at `at` (a
  // slot of `q`, a QP's receive queue or an SRQ) and published.
  void post_receive(Queue& q, std::byte* at, std::uint64_t wr_id, std::uint32_t bytes) {
    std::memset(at, 0, q.stride);
    const vibif_recv_wqe w{wr_id, 1, 0};
    const vibif_sge sge{kIova + VIBIF_PAGE_SIZE, bytes, lkey_};
    std::memcpy(at, &w, sizeof w);
    std::memcpy(at + sizeof w, &sge, sizeof sge);
    ring(q, ++q.producer);
  }
  // A well-formed SEND of `bytes` bytes from the MR's first page through
  // `qp`, into the receive posted to the second: both complete, and every
  // byte arrived.
  void send_arrives(Qp& qp, std::uint32_t bytes) {
    auto* mr = mr_pages_->bytes().data();
    for (std::size_t i = 0; i < bytes; ++i) mr[i] = static_cast<std::byte>(i * 7 + 3);
    std::memset(mr + VIBIF_PAGE_SIZE, 0, bytes);
    auto* swqe = reinterpret_cast<vibif_send_wqe*>(entry(qp.sq));
    std::memset(swqe, 0, qp.sq.stride);
    swqe->wr_id = 0x2222;
    swqe->opcode = VIBIF_WR_SEND;
    swqe->num_sge = 1;
    swqe->send_flags = VIBIF_SEND_SIGNALED;
    const vibif_sge ssge{kIova, bytes, lkey_};
    std::memcpy(reinterpret_cast<std::byte*>(swqe) + sizeof(vibif_send_wqe), &ssge, sizeof ssge);
    ring(qp.sq, ++qp.sq.producer);
    const auto done = completions(2);
    ASSERT_EQ(done.size(), 2u);
    for (const auto& cqe : done) EXPECT_EQ(cqe.status, IBV_WC_SUCCESS) << "wr_id " << cqe.wr_id;
    EXPECT_EQ(std::memcmp(mr, mr + VIBIF_PAGE_SIZE, bytes), 0) << "every byte arrived";
  }
  // The same through the QP's own receive queue.
  void send_works(Qp& qp, std::uint32_t bytes) {
    post_receive(qp.rq, entry(qp.rq), 0x1111, bytes);
    send_arrives(qp, bytes);
  }

  // QUERY_SRQ's status: answered once vibd has served the queues.
  std::int32_t query_srq(vibif_handle_t srq) {
    return status_of(handle_request(VIBIF_OP_QUERY_SRQ, srq), context_);
  }

  void destroy(const Qp& qp) { ok(VIBIF_OP_DESTROY_QP, handle_request(VIBIF_OP_DESTROY_QP, qp.handle), context_); }

  RawGuest* context_ = nullptr;
  vibif_handle_t pd_here_ = 0, cq_ = 0, mr_ = 0;
  std::uint16_t cq_slot_ = 0;
  std::uint32_t cq_consumer_ = 0;
  std::uint32_t lkey_ = 0, rkey_ = 0;
  std::uint16_t lid_ = 0;
  std::unique_ptr<SharedPages> cq_pages_, mr_pages_, qp_pages_;
};

// 32-bit draws (std::mt19937's result_type is wider than its values).
struct Random {
  explicit Random(std::uint32_t seed) : engine(seed) {}
  std::uint32_t operator()() { return static_cast<std::uint32_t>(engine()); }
  std::mt19937 engine;
};

// Where the MR sits in the guest's address space (the fixture's kIova).
struct MrView {
  std::uint64_t iova;
  std::uint32_t lkey, rkey;
};

// A WQE as an attacker writes it: a valid one (a SEND, RDMA WRITE, RDMA
// READ or atomic within the MR) with one thing made wrong (an opcode, SGE
// count, length, key, address, alignment or inline length), a valid one as
// it is, or random bytes, so the decoder meets every check on its own.
void hostile_send_wqe(std::byte* at, std::uint32_t stride, Random& rng, const MrView& mr) {
  std::memset(at, 0, stride);
  vibif_send_wqe w{};
  vibif_sge sge{mr.iova + 8 * (rng() % 64), 8 + rng() % 256, mr.lkey};
  const std::uint8_t valid_ops[] = {VIBIF_WR_SEND, VIBIF_WR_SEND_WITH_IMM, VIBIF_WR_RDMA_WRITE, VIBIF_WR_RDMA_READ,
                                    VIBIF_WR_ATOMIC_FETCH_AND_ADD, VIBIF_WR_ATOMIC_CMP_AND_SWP};
  w.wr_id = rng();
  w.opcode = valid_ops[rng() % std::size(valid_ops)];
  w.num_sge = 1;
  w.send_flags = VIBIF_SEND_SIGNALED;
  w.rkey = mr.rkey;
  w.remote_addr = mr.iova + 2 * VIBIF_PAGE_SIZE + 8 * (rng() % 64);
  if (w.opcode == VIBIF_WR_ATOMIC_FETCH_AND_ADD || w.opcode == VIBIF_WR_ATOMIC_CMP_AND_SWP) sge.length = 8;
  switch (rng() % 20) {
    case 0: w.opcode = static_cast<std::uint8_t>(7 + rng() % 249); break;
    case 1: w.num_sge = static_cast<std::uint8_t>(kSge + 1 + rng() % (256 - kSge - 1)); break;
    case 2: sge.length = 0x80000000u + rng() % 0x7fffffffu; break;
    case 3: sge.addr = mr.iova + kMrPages * VIBIF_PAGE_SIZE - 4; break;  // runs off the MR's end
    case 4: sge.addr = rng() % 2 ? 0 : ~std::uint64_t{0} - 16; break;
    case 5: sge.lkey = mr.lkey ^ (1u + rng() % 0xffu); break;
    case 6: w.rkey = rng(); w.opcode = VIBIF_WR_RDMA_WRITE; break;
    case 7: w.remote_addr = mr.iova + 3; w.opcode = VIBIF_WR_ATOMIC_CMP_AND_SWP; sge.length = 8; break;
    case 8: w.send_flags |= VIBIF_SEND_INLINE; w.inline_length = kInline + 1 + rng() % 10000; w.opcode = VIBIF_WR_SEND; break;
    case 9: w.send_flags = rng(); w.reserved = static_cast<std::uint16_t>(rng()); break;
    case 10: case 11:
      for (std::uint32_t i = 0; i < stride; ++i) at[i] = static_cast<std::byte>(rng());
      return;
    default: break;  // valid as it is
  }
  std::memcpy(at, &w, sizeof w);
  std::memcpy(at + sizeof w, &sge, sizeof sge);
}

void hostile_recv_wqe(std::byte* at, std::uint32_t stride, Random& rng, const MrView& mr) {
  std::memset(at, 0, stride);
  vibif_recv_wqe w{rng(), 1, 0};
  vibif_sge sge{mr.iova + VIBIF_PAGE_SIZE, VIBIF_PAGE_SIZE, mr.lkey};
  switch (rng() % 8) {
    case 0: w.num_sge = kSge + 1 + rng() % 1000; break;
    case 1: sge.lkey = rng(); break;
    case 2: sge.length = 0xffffffffu; break;
    case 3: sge.addr = mr.iova - VIBIF_PAGE_SIZE; break;
    case 4:
      for (std::uint32_t i = 0; i < stride; ++i) at[i] = static_cast<std::byte>(rng());
      return;
    default: break;  // valid
  }
  std::memcpy(at, &w, sizeof w);
  std::memcpy(at + sizeof w, &sge, sizeof sge);
}

}  // namespace

// 150 QPs, each fed a few hostile WQEs on both queues, then moved to the
// error state (flushing what is left) and destroyed: every completion vibd
// writes is one the protocol allows (it names a QP of the context, never
// more of them for a QP than WQEs were posted to it), QPs vibd finds lied
// to go to the error state, and the CQ, the MR and the context stay usable:
// a clean QP afterwards moves data byte-exact.
TEST_F(HostileQueues, HostileWorkRequestsBreakOnlyTheQpTheyWerePostedTo) {
  objects_in(*guest_);
  Random rng(20261207);
  std::size_t broken = 0;
  std::map<std::uint32_t, std::size_t> posted, completed, succeeded;  // by QP number
  auto account = [&](const std::vector<vibif_cqe>& cqes) {
    for (const auto& cqe : cqes) {
      EXPECT_TRUE(posted.contains(cqe.qp_num)) << "a completion for QP " << cqe.qp_num;
      EXPECT_LE(cqe.status, static_cast<std::uint32_t>(IBV_WC_GENERAL_ERR));
      ++completed[cqe.qp_num];
      if (cqe.status == IBV_WC_SUCCESS) ++succeeded[cqe.qp_num];
    }
  };
  for (int round = 0; round < 150; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    Qp qp = make_qp();
    const std::uint32_t sends = 1 + rng() % 3, receives = rng() % 4;  // some QPs get only valid ones
    posted[qp.qp_num] = sends + receives;
    for (std::uint32_t i = 0; i < receives; ++i, ++qp.rq.producer)
      hostile_recv_wqe(entry(qp.rq), qp.rq.stride, rng, {kIova, lkey_, rkey_});
    ring(qp.rq, qp.rq.producer);
    for (std::uint32_t i = 0; i < sends; ++i, ++qp.sq.producer)
      hostile_send_wqe(entry(qp.sq), qp.sq.stride, rng, {kIova, lkey_, rkey_});
    ring(qp.sq, qp.sq.producer);
    broken += qp_state(qp) == IBV_QPS_ERR;  // answered once vibd served the queues
    auto to_error = request(VIBIF_OP_MODIFY_QP);
    to_error.u.modify_qp.qp = qp.handle;
    to_error.u.modify_qp.attr_mask = IBV_QP_STATE;
    to_error.u.modify_qp.attr.qp_state = IBV_QPS_ERR;
    ok(VIBIF_OP_MODIFY_QP, to_error, context_);
    account(poll_cq());
    destroy(qp);
    account(poll_cq());
  }
  account(completions(1, 100ms));  // the last ones, if any are still on their way
  for (const auto& [qp_num, n] : completed)
    EXPECT_LE(n, posted[qp_num]) << "QP " << qp_num << ": more completions than WQEs";
  std::size_t total = 0, successes = 0;
  for (const auto& [qp_num, n] : completed) total += n;
  for (const auto& [qp_num, n] : succeeded) successes += n;
  std::printf("hostile WQEs: %zu of 150 QPs broken by them, %zu completions (%zu successful)\n", broken, total,
              successes);
  EXPECT_GT(broken, 0u) << "hostile WQEs broke QPs";
  EXPECT_GT(successes, 0u) << "some steered WQEs were valid and did their work";
  Qp clean = make_qp();
  send_works(clean, 3000);
  destroy(clean);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, mr_), context_), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DESTROY_CQ, cq_), context_), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEALLOC_PD, pd_here_), context_), VIBIF_OK);
  nothing_was_lost();
  EXPECT_LE(log_lines_with("dom5/vib0/ctx50:"), 60u) << "what the attack makes vibd log is bounded";
}

// Another context of the attacker's scribbles random values over its whole
// doorbell page (producers, consumers, arm sequences, the polling flag, the
// event queue's indices) and kicks as fast as it can: vibd serves the
// victim and the attacker's first context meanwhile, and when the
// scribbling context closes, everything it had goes.
TEST_F(HostileQueues, AScribbledDoorbellPageHurtsOnlyItsContext) {
  {
    RawGuest scribbler(xen_.as(5), 5, 51);
    objects_in(scribbler);
    Qp qp = make_qp();
    send_works(qp, 100);
    std::atomic<bool> stop{false};
    std::thread scribble([&] {
      Random rng(7);
      auto* words = reinterpret_cast<std::uint32_t*>(&scribbler.doorbell());
      while (!stop.load()) {
        for (int i = 0; i < 64; ++i)
          __atomic_store_n(&words[rng() % (VIBIF_PAGE_SIZE / 4)], static_cast<std::uint32_t>(rng()), __ATOMIC_RELAXED);
        scribbler.kick();
        std::this_thread::yield();
      }
    });
    for (int i = 0; i < 50; ++i) {
      victim_is_served();
      EXPECT_EQ(status_of(request(VIBIF_OP_QUERY_DEVICE)), VIBIF_OK) << "the attacker's other context";
    }
    stop = true;
    scribble.join();
    // The scribbler's own requests still get answers (its ring is intact).
    EXPECT_TRUE(scribbler.call(request(VIBIF_OP_QUERY_DEVICE)));
    scribbler.set_state(5);
    EXPECT_TRUE(eventually(be(5) + "/ctx/51/state", std::nullopt)) << "closed";
  }
  nothing_was_lost();
}

// Issue 11, finding 4, through a real vibd: an SRQ fed 20,000 malformed
// receive entries (too many SGEs, garbage) and an overrun producer. vibd
// drops each (the log says so a bounded number of times), reports the
// overrun as an SRQ error event, keeps serving the victim meanwhile, and
// the SRQ's next valid receive still gets a message, byte-exact.
TEST_F(HostileQueues, AnSrqFedMalformedEntriesDropsThemAndStillWorks) {
  objects_in(*guest_);
  constexpr std::uint32_t kSrqWr = 8;
  auto srq_pages = share(vibif_pages_for(kSrqWr * vibif_recv_wqe_stride(kSge)), /*writable=*/false);
  auto create = request(VIBIF_OP_CREATE_SRQ);
  create.u.create_srq.pd = pd_here_;
  create.u.create_srq.max_wr = kSrqWr;
  create.u.create_srq.max_sge = kSge;
  create.u.create_srq.pages = inline_list(srq_pages->refs());
  const auto srq = ok(VIBIF_OP_CREATE_SRQ, create, context_).u.create_srq;
  Queue q{srq.doorbell_slot, srq.wqe_stride, 0, 0};
  auto srq_entry = [&] { return srq_pages->bytes().data() + std::size_t{q.producer % kSrqWr} * q.stride; };
  Random rng(11);
  std::uint64_t waits = 0;
  for (int i = 0; i < 20000; ++i) {
    // Within the queue, as the protocol allows: every entry is decoded (an
    // overrun would drop them unread).
    while (q.producer - __atomic_load_n(&context_->doorbell().slots[q.slot].consumer, __ATOMIC_ACQUIRE) >= kSrqWr) {
      context_->kick();
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      ASSERT_LT(++waits, 1000000u) << "vibd stopped consuming the SRQ";
    }
    std::byte* at = srq_entry();
    for (std::uint32_t b = 0; b < q.stride; ++b) at[b] = static_cast<std::byte>(rng());
    vibif_recv_wqe w{rng(), kSge + 1 + rng() % 100000, 0};
    if (i % 2) std::memcpy(at, &w, sizeof w);
    ring(q, ++q.producer);
    if (i % 4000 == 0) victim_is_served();
  }
  EXPECT_EQ(query_srq(srq.srq), VIBIF_OK) << "vibd has caught up and answers";
  bool overrun_before = false;
  {
    auto& page = context_->doorbell();
    for (std::uint32_t i = 0; i < __atomic_load_n(&page.event_producer, __ATOMIC_ACQUIRE); ++i)
      overrun_before |= page.events[i % VIBIF_EVENT_QUEUE_LEN].event == IBV_EVENT_SRQ_ERR;
  }
  EXPECT_FALSE(overrun_before) << "the guest kept within the SRQ";
  // An overrun: the producer claims far more than the SRQ holds.
  q.producer += 1000;
  ring(q, q.producer);
  EXPECT_EQ(query_srq(srq.srq), VIBIF_OK);
  bool srq_error = false;
  auto& page = context_->doorbell();
  for (std::uint32_t i = 0; i < __atomic_load_n(&page.event_producer, __ATOMIC_ACQUIRE); ++i) {
    const auto& e = page.events[i % VIBIF_EVENT_QUEUE_LEN];
    srq_error |= e.type == VIBIF_EVENT_ASYNC && e.event == IBV_EVENT_SRQ_ERR && e.handle == srq.srq;
  }
  EXPECT_TRUE(srq_error) << "the overrun is reported as an SRQ error event";
  // A valid receive on the SRQ, then a SEND to it through a loopback QP.
  Qp qp = make_qp(srq.srq);
  post_receive(q, srq_entry(), 0x5151, 1000);
  send_arrives(qp, 1000);
  destroy(qp);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DESTROY_SRQ, srq.srq), context_), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, mr_), context_), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DESTROY_CQ, cq_), context_), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEALLOC_PD, pd_here_), context_), VIBIF_OK);
  nothing_was_lost();
  EXPECT_LE(log_lines_with("malformed SRQ receive WQE"), 10u) << "20,000 drops are not 20,000 lines";
  EXPECT_GE(log_lines_with("malformed SRQ receive WQE"), 1u) << "the first drops are logged";
}
