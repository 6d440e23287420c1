// The malicious-frontend suite (docs/security.md), attacks through the
// guest's own xenstore nodes: context keys with huge, negative, non-numeric,
// padded and path-like values or naming grants and ports that are not
// there; context states written in every order; and a flood of writes under
// a directory of junk. vibd refuses what it cannot use with a reason,
// removes what it wrote when the guest's node goes, holds nothing for a
// refused context, and goes on serving the victim.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "hostile_fixture.hpp"
#include "vib/platform/event_channels.hpp"
#include "vib/platform/xenbus.hpp"

using namespace vib::platform;
using namespace std::chrono_literals;
using vib::test::Footprint;
using vib::test::Hostile;
using vib::test::RawGuest;

namespace {

// The nodes a context's handshake writes, as a well-behaved process would
// (a real ring, doorbell and port), for a test to spoil one of them.
struct ContextNodes {
  std::unique_ptr<SharedPages> ring, doorbell;
  std::unique_ptr<EventChannels> events;
  EventPort port = 0;
  std::vector<std::pair<std::string, std::string>> keys;
};

ContextNodes good_context_nodes(GrantSharer& sharer, const XenTarget& xen) {
  ContextNodes n;
  n.events = open_event_channels(xen);
  n.port = n.events->bind_unbound(kDom0);
  n.ring = sharer.share(kDom0, 1, true);
  n.doorbell = sharer.share(kDom0, 1, true);
  n.keys = {{VIBIF_XS_RING_PAGE_ORDER, "0"},
            {VIBIF_XS_RING_REF, std::to_string(n.ring->refs()[0])},
            {VIBIF_XS_EVENT_CHANNEL, std::to_string(n.port)},
            {VIBIF_XS_DOORBELL_REF, std::to_string(n.doorbell->refs()[0])}};
  return n;
}

class HostileXenstore : public Hostile {
 protected:
  void SetUp() override {
    Hostile::SetUp();
    ASSERT_NO_FATAL_FAILURE(attacker_and_victim({"--control-threads", "1"}));
    // A context opened and closed, so that everything a context starts
    // once (its worker's first wake-up, the control pool) is counted.
    {
      RawGuest warm(xen_.as(5), 5, 1);
      ASSERT_TRUE(warm.call(request(VIBIF_OP_ALLOC_PD)));
      warm.set_state(5);
      ASSERT_TRUE(eventually(be(5) + "/ctx/1/state", std::nullopt));
    }
    sharer_ = open_grant_sharer(xen_.as(5));
    // Its node goes first; its pages, port and fds once the control pool
    // has freed it.
    before_ = footprint_without_guest_pages(5s);
    ASSERT_EQ(before_.guest_pages_mapped, 0u) << "the warm-up context was freed";
  }

  // Writes the keys and state=Initialised in one transaction (as the
  // protocol says), waits for vibd's answer, removes the guest's node and
  // waits for vibd's to go; returns the back-end's state and error.
  std::pair<std::optional<std::string>, std::optional<std::string>> ask(
      unsigned id, const std::vector<std::pair<std::string, std::string>>& keys) {
    const std::string fe_ctx = fe(5) + "/ctx/" + std::to_string(id), be_ctx = be(5) + "/ctx/" + std::to_string(id);
    with_transaction(*attacker_store_, [&](TransactionId tx) {
      for (const auto& [key, value] : keys) attacker_store_->write(tx, fe_ctx + "/" + key, value);
      attacker_store_->write(tx, fe_ctx + "/state", "3");
    });
    const auto state = wait_for_node(
        *store_, be_ctx + "/state", [](const std::optional<std::string>& v) { return v == "4" || v == "6"; }, 5s);
    const auto error = store_->read(kNoTransaction, be_ctx + "/" VIBIF_XS_ERROR);
    attacker_store_->remove(kNoTransaction, fe_ctx);
    EXPECT_TRUE(eventually(be_ctx, std::nullopt)) << "vibd's node goes with the guest's";
    return {state, error};
  }

  std::unique_ptr<GrantSharer> sharer_;
  Footprint before_;
};

}  // namespace

// Each context key with every kind of bad value: refused, with the key's
// name in the reason; nothing of the refused context stays in vibd.
TEST_F(HostileXenstore, ContextKeysThatLieAreRefusedByName) {
  const std::vector<std::string> bad_values = {
      "", "-1", "4294967296", "18446744073709551616", "99999999999999999999999999", " 7", "7 ", "0x10", "1e3",
      "+5", "7\n", "../../backend/vib", "/local/domain/0/backend", "٣", std::string(4000, '9'),
      std::string("7\0", 2)};
  unsigned id = 100;
  for (const char* key : {VIBIF_XS_RING_PAGE_ORDER, VIBIF_XS_RING_REF, VIBIF_XS_EVENT_CHANNEL, VIBIF_XS_DOORBELL_REF}) {
    for (const auto& value : bad_values) {
      SCOPED_TRACE(std::string(key) + " = \"" + value.substr(0, 30) + "\"");
      auto nodes = good_context_nodes(*sharer_, xen_.as(5));
      for (auto& [k, v] : nodes.keys)
        if (k == key) v = value;
      const auto [state, error] = ask(id++, nodes.keys);
      EXPECT_EQ(state, "6");
      EXPECT_NE(error.value_or("").find(key), std::string::npos) << "the reason names the key: " << error.value_or("");
    }
  }
  // A key left out.
  auto nodes = good_context_nodes(*sharer_, xen_.as(5));
  nodes.keys.pop_back();
  EXPECT_EQ(ask(id++, nodes.keys).first, "6");
  victim_is_served();
  EXPECT_TRUE(footprint_returns_to(before_));
  EXPECT_LE(log_lines_with("refused:"), 20u) << "the refusals' lines are bounded";
}

// Well-formed values that name what the guest does not have: a ring or
// doorbell ref never granted, granted read-only or to another domain, an
// event channel that is not open for dom0, a ring order beyond the maximum
// or ring-ref<i> keys missing. Refused; nothing stays mapped or bound.
TEST_F(HostileXenstore, ContextKeysNamingWhatTheGuestDoesNotHaveAreRefused) {
  auto read_only = sharer_->share(kDom0, 1, false);
  auto to_victim = sharer_->share(6, 1, true);
  auto other_events = open_event_channels(xen_.as(5));
  const EventPort to_victim_port = other_events->bind_unbound(6);
  const struct {
    const char* what;
    const char* key;
    std::string value;
    const char* named = nullptr;  // the key the reason names, if not `key`
  } lies[] = {
      {"a ring never granted", VIBIF_XS_RING_REF, "123456"},
      {"a read-only ring", VIBIF_XS_RING_REF, std::to_string(read_only->refs()[0])},
      {"a ring granted to domain 6", VIBIF_XS_RING_REF, std::to_string(to_victim->refs()[0])},
      {"a doorbell never granted", VIBIF_XS_DOORBELL_REF, "123456"},
      {"a read-only doorbell", VIBIF_XS_DOORBELL_REF, std::to_string(read_only->refs()[0])},
      {"a doorbell granted to domain 6", VIBIF_XS_DOORBELL_REF, std::to_string(to_victim->refs()[0])},
      {"a port never allocated", VIBIF_XS_EVENT_CHANNEL, "999"},
      {"a port allocated for domain 6", VIBIF_XS_EVENT_CHANNEL, std::to_string(to_victim_port)},
      {"a ring order beyond the maximum", VIBIF_XS_RING_PAGE_ORDER, std::to_string(VIBIF_MAX_RING_PAGE_ORDER + 1)},
      {"ring-ref0..3 missing", VIBIF_XS_RING_PAGE_ORDER, "2", "ring-ref0"},
      {"ring-ref with order 1", VIBIF_XS_RING_PAGE_ORDER, "1", "ring-ref0"},
  };
  unsigned id = 300;
  for (const auto& lie : lies) {
    SCOPED_TRACE(lie.what);
    auto nodes = good_context_nodes(*sharer_, xen_.as(5));
    for (auto& [k, v] : nodes.keys)
      if (k == lie.key) v = lie.value;
    const auto [state, error] = ask(id++, nodes.keys);
    EXPECT_EQ(state, "6");
    const std::string named = lie.named ? lie.named : lie.key;
    EXPECT_EQ(error.value_or("").rfind(named + ": ", 0), 0u) << "the reason names the key: " << error.value_or("");
  }
  victim_is_served();
  EXPECT_TRUE(footprint_returns_to(before_));
}

// A connected context whose guest then writes every state (and garbage)
// into its state node: vibd closes it for Closing and Closed, ignores the
// rest, never crashes; the id can be opened again at once afterwards.
TEST_F(HostileXenstore, EveryContextStateFromConnectedIsHandled) {
  const std::vector<std::string> states = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "-1", "", "4 ", "connected",
                                           "99999999999"};
  for (const auto& state : states) {
    SCOPED_TRACE("state \"" + state + "\"");
    RawGuest guest(xen_.as(5), 5, 400);
    ASSERT_TRUE(guest.call(request(VIBIF_OP_ALLOC_PD)));
    guest.store().write(kNoTransaction, guest.frontend_ctx() + "/state", state);
    if (state == "5" || state == "6") {
      EXPECT_TRUE(eventually(be(5) + "/ctx/400/state", std::nullopt)) << "closed";
    } else {
      // vibd has looked (a victim's handshake needs as many passes), and
      // the context is either open and answering, or was closed.
      victim_is_served();
      if (guest.open_at_backend()) {
        const auto rsp = guest.call(request(VIBIF_OP_QUERY_DEVICE));
        ASSERT_TRUE(rsp);
        EXPECT_EQ(rsp->hdr.status, VIBIF_OK);
      }
    }
    guest.set_state(5);
    EXPECT_TRUE(eventually(be(5) + "/ctx/400/state", std::nullopt));
  }
  victim_is_served();
  EXPECT_TRUE(footprint_returns_to(before_));
}

// The guest fills its ctx/ directory with junk (ids that are not canonical,
// contexts claimed but never finished) and then rewrites a node under it
// as fast as it can. Every write wakes vibd, and each pass reads the
// directory: a victim must still get its contexts opened and served. The
// figure (the victim's open and call, during the flood and without it) is
// printed.
TEST_F(HostileXenstore, AFloodOfWritesUnderAJunkDirectoryDelaysNoOtherGuest) {
  for (unsigned i = 0; i < 300; ++i) {
    const std::string node = fe(5) + "/ctx/" + (i % 2 ? "0" + std::to_string(i) : std::to_string(10000 + i));
    attacker_store_->write(kNoTransaction, node + "/state", "1");
  }
  auto victim_round = [&] {
    const auto began = std::chrono::steady_clock::now();
    victim_is_served();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count();
  };
  double quiet = 0;
  for (int i = 0; i < 5; ++i) quiet = std::max(quiet, victim_round());
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> writes{0};
  std::thread flood([&] {
    auto store = open_xenstore(xen_.as(5));
    while (!stop.load()) {
      store->write(kNoTransaction, fe(5) + "/ctx/10000/junk", std::to_string(writes.load()));
      ++writes;
    }
  });
  // At least five rounds, and until the flood has made its 2000 writes.
  double flooded = 0;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  for (int round = 0; (round < 5 || writes.load() < 2000) && std::chrono::steady_clock::now() < deadline; ++round)
    flooded = std::max(flooded, victim_round());
  stop = true;
  flood.join();
  std::printf("victim's open+call, worst round: %.1f ms quiet, %.1f ms during a flood of %llu xenstore writes "
              "under 300 junk contexts\n",
              quiet, flooded, static_cast<unsigned long long>(writes.load()));
  EXPECT_GE(writes.load(), 2000u) << "the flood ran";
  EXPECT_EQ(footprint().backend_ctx_nodes, 0u) << "vibd wrote nothing for junk";
}
