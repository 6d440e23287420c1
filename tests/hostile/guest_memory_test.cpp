// The malicious-frontend suite (docs/security.md), attacks through the
// guest memory a request names: grant refs that are forged, granted to
// someone else, ended, revoked while vibd uses them or read-only where vibd
// would write, and page lists that lie (levels, counts, loops). Each attack
// gets a clear status, vibd lets go of everything it took for it, the
// device's pinned-page quota is whole again, and the victim is still served.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "hostile_fixture.hpp"
#include "raw_guest.hpp"

using namespace vib::platform;
using namespace std::chrono_literals;
using vib::test::Footprint;
using vib::test::HostileContext;
using vib::test::RawGuest;

namespace {

class HostileMemory : public HostileContext {};

}  // namespace

// Refs the guest never granted, granted to another domain, or already
// ended: nothing is mapped, the request is refused with EACCES, and a list
// that mixes good refs with a bad one leaves none of the good ones mapped.
TEST_F(HostileMemory, ForgedForeignAndEndedGrantRefsAreRefused) {
  auto to_victim = share(1, true, 6);
  // Shared and ended from a connection of its own: the guest's next grants
  // (the indirect pages below) would otherwise reuse the free ref.
  const GrantRef ended_ref = open_grant_sharer(xen_.as(5))->share(kDom0, 1, true)->refs()[0];
  auto good = share(3);
  const std::vector<std::pair<const char*, std::vector<GrantRef>>> lies = {
      {"never granted", {0x7fffffff}},
      {"the largest ref", {0xffffffff}},
      {"granted to domain 6", {to_victim->refs()[0]}},
      {"ended", {ended_ref}},
      {"good refs, then a forged one", {good->refs()[0], good->refs()[1], 0x7ffffff0}},
      {"a good ref after an ended one", {ended_ref, good->refs()[2]}},
  };
  for (const auto& [what, refs] : lies) {
    SCOPED_TRACE(what);
    EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, inline_list(refs), refs.size())), VIBIF_EACCES);
    EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_REMOTE_READ, indirect(refs), refs.size())), VIBIF_EACCES);
    if (refs.size() == 1) {
      EXPECT_EQ(status_of(create_cq(inline_list(refs))), VIBIF_EACCES);
    }
  }
  // The indirect page itself forged.
  vibif_page_list forged_indirect{};
  forged_indirect.nr_pages = 2;
  forged_indirect.levels = 1;
  forged_indirect.nr_refs = 1;
  forged_indirect.refs[0] = 0x7fffffff;
  EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, forged_indirect, 2)), VIBIF_EACCES);
  nothing_was_lost();
}

// vibd writes into CQ buffers and, for MRs with write access, the HCA does:
// pages granted read-only are refused for those, and accepted where only
// reads happen.
TEST_F(HostileMemory, ReadOnlyGrantsAreRefusedWhereVibdOrTheHcaWouldWrite) {
  auto read_only = share(2, /*writable=*/false);
  const auto list = inline_list(read_only->refs());
  for (std::uint32_t access : {VIBIF_ACCESS_LOCAL_WRITE, VIBIF_ACCESS_REMOTE_WRITE, VIBIF_ACCESS_REMOTE_ATOMIC,
                               VIBIF_ACCESS_REMOTE_READ | VIBIF_ACCESS_REMOTE_WRITE}) {
    SCOPED_TRACE("access " + std::to_string(access));
    EXPECT_EQ(status_of(reg_mr(access, list, 2)), VIBIF_EACCES);
  }
  EXPECT_EQ(status_of(create_cq(inline_list(read_only->refs().first(1)))), VIBIF_EACCES);
  const auto readable = guest_->call(reg_mr(VIBIF_ACCESS_REMOTE_READ, list, 2));
  ASSERT_TRUE(readable);
  EXPECT_EQ(readable->hdr.status, VIBIF_OK) << "read-only memory registers for reads";
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, readable->u.reg_mr.mr)), VIBIF_OK);
  nothing_was_lost();
}

// A guest that ends its grants while vibd holds them (an MR, a CQ) cannot
// pull the pages from under vibd: vibd's mappings stay valid until the
// object goes, the object goes cleanly, and the ended refs map no more.
TEST_F(HostileMemory, GrantsEndedWhileInUseStayMappedUntilTheObjectGoes) {
  auto mr_pages = share(4);
  auto cq_page = share(1);
  const std::vector<GrantRef> mr_refs(mr_pages->refs().begin(), mr_pages->refs().end());
  const std::vector<GrantRef> cq_refs(cq_page->refs().begin(), cq_page->refs().end());
  const auto mr = ok(VIBIF_OP_REG_MR, reg_mr(VIBIF_ACCESS_LOCAL_WRITE, inline_list(mr_refs), 4));
  const auto cq = ok(VIBIF_OP_CREATE_CQ, create_cq(inline_list(cq_refs)));
  const Footprint holding = footprint();
  EXPECT_EQ(holding.guest_pages_mapped, before_.guest_pages_mapped + 5) << "the MR's and the CQ's pages";
  mr_pages.reset();
  cq_page.reset();
  EXPECT_EQ(footprint().guest_pages_mapped, holding.guest_pages_mapped) << "vibd's mappings outlive the grants";
  EXPECT_EQ(status_of(request(VIBIF_OP_QUERY_DEVICE)), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, mr.u.reg_mr.mr)), VIBIF_OK);
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DESTROY_CQ, cq.u.create_cq.cq)), VIBIF_OK);
  EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, inline_list(mr_refs), 4)), VIBIF_EACCES)
      << "ended refs map no more";
  EXPECT_EQ(status_of(create_cq(inline_list(cq_refs))), VIBIF_EACCES);
  nothing_was_lost();
}

// Page lists whose fields disagree, or that ask for more than anyone may
// pin, are refused before anything is mapped; lists whose indirect pages
// point at themselves (a loop, one level or two) resolve to that page
// repeated, bounded by the levels, and count every repetition against the
// quota.
TEST_F(HostileMemory, PageListsThatLieAreRefusedAndLoopsAreBounded) {
  auto data = share(2);
  auto list_of = [&](std::uint32_t nr_pages, std::uint8_t levels, std::uint8_t nr_refs) {
    vibif_page_list list{};
    list.nr_pages = nr_pages;
    list.levels = levels;
    list.nr_refs = nr_refs;
    for (unsigned i = 0; i < VIBIF_PAGE_LIST_INLINE; ++i) list.refs[i] = data->refs()[i % 2];
    return list;
  };
  const struct {
    const char* what;
    vibif_page_list list;
    std::uint64_t pages;  // what the request's length claims
    std::int32_t status;
  } lies[] = {
      {"three levels", list_of(2, 3, 2), 2, VIBIF_EINVAL},
      {"255 levels", list_of(2, 255, 2), 2, VIBIF_EINVAL},
      {"more inline refs than fit", list_of(2, 0, VIBIF_PAGE_LIST_INLINE + 1), 2, VIBIF_EINVAL},
      {"255 inline refs", list_of(2, 0, 255), 2, VIBIF_EINVAL},
      {"fewer refs than pages", list_of(2, 0, 1), 2, VIBIF_EINVAL},
      {"more refs than pages", list_of(1, 0, 2), 1, VIBIF_EINVAL},
      {"no pages", list_of(0, 0, 0), 1, VIBIF_EINVAL},
      {"one level, two indirect pages for 2 refs", list_of(2, 1, 2), 2, VIBIF_EINVAL},
      {"two levels, two pages for 2 refs", list_of(2, 2, 2), 2, VIBIF_EINVAL},
      {"a length beyond the pages", list_of(1, 0, 1), 2, VIBIF_EINVAL},
      {"4 GiB, beyond the quota", list_of(1u << 20, 1, 40), 1u << 20, VIBIF_EDQUOT},
      {"16 TiB less a page, two levels", list_of(0xffffffff, 2, 4), 0xffffffffull, VIBIF_EINVAL},
  };
  for (const auto& lie : lies) {
    SCOPED_TRACE(lie.what);
    EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, lie.list, lie.pages)), lie.status);
  }
  EXPECT_TRUE(footprint_returns_to(before_)) << "nothing mapped for a refused list";

  // A one-level loop: the indirect page lists itself. Granted read-only, so
  // the registration is for reads.
  auto loop = share(1, /*writable=*/false);
  const GrantRef self = loop->refs()[0];
  for (std::size_t i = 0; i < VIBIF_REFS_PER_PAGE; ++i)
    std::memcpy(loop->bytes().data() + i * sizeof(GrantRef), &self, sizeof self);
  vibif_page_list one_level{};
  one_level.nr_pages = HostileContext::kQuotaPages;
  one_level.levels = 1;
  one_level.nr_refs = 1;
  one_level.refs[0] = self;
  const auto looped = guest_->call(reg_mr(VIBIF_ACCESS_REMOTE_READ, one_level, HostileContext::kQuotaPages));
  ASSERT_TRUE(looped);
  EXPECT_EQ(looped->hdr.status, VIBIF_OK) << "one page registered 64 times over";
  EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_REMOTE_READ, inline_list(loop->refs()), 1)), VIBIF_EDQUOT)
      << "every repetition counts against the quota";
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, looped->u.reg_mr.mr)), VIBIF_OK);
  // Two levels of the same loop, asking for more than the quota: refused
  // before any indirect page is read.
  vibif_page_list two_levels{};
  two_levels.nr_pages = 1u << 21;
  two_levels.levels = 2;
  two_levels.nr_refs = 1;
  two_levels.refs[0] = self;
  EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_REMOTE_READ, two_levels, 1u << 21)), VIBIF_EDQUOT);
  two_levels.nr_pages = HostileContext::kQuotaPages;
  const auto looped2 = guest_->call(reg_mr(VIBIF_ACCESS_REMOTE_READ, two_levels, HostileContext::kQuotaPages));
  ASSERT_TRUE(looped2);
  EXPECT_EQ(looped2->hdr.status, VIBIF_OK) << "two levels of the loop end at the data pages";
  EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, looped2->u.reg_mr.mr)), VIBIF_OK);
  nothing_was_lost();
}

// Requests and indirect page lists that the guest rewrites while vibd reads
// them: a back-end that read a field twice (validated one value, used
// another) would see two requests in one. vibd copies a request slot once,
// and an indirect page's refs once, before it looks at them, so whatever it
// copied is one request: each gets an answer, the context stays open, and
// once the attacker closes it nothing it registered stays mapped or pinned.
// The attacker is one thread that keeps flipping the slot in flight (op,
// the page list's counts and levels, the length) and the indirect page's
// refs (good, forged, or the indirect page itself) until vibd answers.
TEST_F(HostileMemory, RequestsAndPageListsRewrittenWhileVibdReadsThem) {
  {
    RawGuest attacker(xen_.as(5), 5, 61);
    const auto pd = attacker.call(request(VIBIF_OP_ALLOC_PD));
    ASSERT_TRUE(pd && pd->hdr.status == VIBIF_OK);
    auto data = attacker.sharer().share(kDom0, 8, true);
    auto list = attacker.sharer().share(kDom0, 1, false);
    auto* refs = reinterpret_cast<volatile GrantRef*>(list->bytes().data());
    const GrantRef list_ref = list->refs()[0];

    vibif_request clean = request(VIBIF_OP_REG_MR);
    clean.u.reg_mr.pd = pd->u.handle.handle;
    clean.u.reg_mr.access = VIBIF_ACCESS_LOCAL_WRITE;
    clean.u.reg_mr.iova = kIova;
    clean.u.reg_mr.length = 8 * VIBIF_PAGE_SIZE;
    clean.u.reg_mr.pages.nr_pages = 8;
    clean.u.reg_mr.pages.levels = 1;
    clean.u.reg_mr.pages.nr_refs = 1;
    clean.u.reg_mr.pages.refs[0] = list_ref;

    // The ring by hand from here on (RawGuest::call has used one slot).
    auto& ring = attacker.sring();
    const unsigned size = attacker.ring_size();
    RING_IDX prod = 1;
    std::uint64_t flips = 0;
    std::map<std::int32_t, unsigned> statuses;
    std::uint32_t seed = 2024;
    auto next = [&] { return seed = seed * 1103515245u + 12345u; };
    auto rewrite = [&](volatile vibif_request& req) {
      const std::uint32_t x = next();
      for (unsigned i = 0; i < 8; ++i) {
        const unsigned pick = (x >> (2 * i)) % 3;
        refs[i] = pick == 0 ? data->refs()[i] : pick == 1 ? GrantRef{0xffffffff} : list_ref;
      }
      switch ((x >> 20) % 5) {
        case 0: req.u.reg_mr.pages.nr_pages = (x >> 8) % 2 ? 8u : 1u << 20; break;
        case 1: req.u.reg_mr.pages.levels = static_cast<std::uint8_t>((x >> 8) % 4); break;
        case 2: req.u.reg_mr.pages.nr_refs = static_cast<std::uint8_t>((x >> 8) % 3 == 0 ? 255 : (x >> 8) % 3); break;
        case 3: req.hdr.op = (x >> 8) % 2 ? VIBIF_OP_REG_MR : VIBIF_OP_DEREG_MR; break;
        default: req.u.reg_mr.length = (x >> 8) % 2 ? 8 * VIBIF_PAGE_SIZE : ~std::uint64_t{0}; break;
      }
    };
    // One request: placed, pushed, kicked, then rewritten until answered.
    auto storm = [&](bool flip) -> std::optional<vibif_response> {
      auto* slot = &ring.ring[prod % size];
      std::memcpy(&slot->req, &clean, sizeof clean);
      slot->req.hdr.id = prod;
      ++prod;
      __atomic_store_n(&ring.req_prod, prod, __ATOMIC_RELEASE);
      attacker.kick();
      const auto until = std::chrono::steady_clock::now() + 10s;
      while (__atomic_load_n(&ring.rsp_prod, __ATOMIC_ACQUIRE) != prod) {
        if (std::chrono::steady_clock::now() > until) return std::nullopt;
        if (flip) {
          rewrite(*const_cast<volatile vibif_request*>(&slot->req));
          ++flips;
        }
      }
      vibif_response rsp;
      std::memcpy(&rsp, &slot->rsp, sizeof rsp);
      return rsp;
    };

    for (int i = 0; i < 1000; ++i) {
      const auto rsp = storm(/*flip=*/true);
      ASSERT_TRUE(rsp) << "request " << i << " never answered";
      ++statuses[rsp->hdr.status];
    }
    std::cout << "1000 requests, " << flips << " rewrites while in flight; statuses (as the last rewrite left them):";
    for (const auto& [status, n] : statuses) std::cout << " " << status << " x" << n;
    std::cout << std::endl;
    EXPECT_TRUE(attacker.open_at_backend()) << "a request rewritten in flight closes nothing";
    // The context still answers a request left alone, with every field.
    for (unsigned i = 0; i < 8; ++i) refs[i] = data->refs()[i];
    const auto query = storm(/*flip=*/false);
    ASSERT_TRUE(query);
    EXPECT_EQ(query->hdr.id, prod - 1);
    EXPECT_TRUE(query->hdr.status == VIBIF_OK || query->hdr.status == VIBIF_EDQUOT)
        << "a clean registration: " << query->hdr.status;
    victim_is_served();
  }
  EXPECT_TRUE(eventually(be(5) + "/ctx/61", std::nullopt)) << "the attacker's context closed";
  nothing_was_lost();
}
