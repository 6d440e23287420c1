// The malicious-frontend suite's fixture (docs/security.md): the test is the
// attacker, a guest that speaks the protocol by hand against a real vibd on
// the host-local Xen; domain 5 attacks, domain 6 is the victim that must
// still be served, and what vibd holds is counted before and after.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <ostream>
#include <sstream>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "raw_guest.hpp"
#include "vib/front/channel.hpp"
#include "vibd_fixture.hpp"

namespace vib::test {

// What vibd holds in dom0 that a guest could make it leak.
struct Footprint {
  std::size_t fds = 0;
  std::map<std::string, std::size_t> threads;  // by name (vibd names its threads): how many
  std::size_t guest_pages_mapped = 0;  // guests' granted pages in vibd's address space
  std::size_t backend_ctx_nodes = 0;   // the attacker device's back-end ctx/ entries
  bool operator==(const Footprint&) const = default;
};

inline std::ostream& operator<<(std::ostream& out, const Footprint& f) {
  std::size_t threads = 0;
  std::string names;
  for (const auto& [name, n] : f.threads) {
    threads += n;
    names += (names.empty() ? "" : " ") + name + (n > 1 ? " x" + std::to_string(n) : "");
  }
  return out << "{fds " << f.fds << ", threads " << threads << " (" << names << "), guest pages mapped "
             << f.guest_pages_mapped << ", back-end ctx nodes " << f.backend_ctx_nodes << "}";
}

class Hostile : public VibdFixture {
 protected:
  void start_vibd(const std::vector<std::string>& args = {}) {
    log_ = xen_.dir() + "/vibd.log";
    VibdFixture::start_vibd(VIBD, log_, args);
    ASSERT_GT(pid_, 0) << "vibd did not start";
  }
  std::unique_ptr<front::Channel> open_channel(platform::DomId domid) {
    front::ChannelOptions options;
    options.xen = xen_.as(domid);
    return front::Channel::open(options);
  }
  // The victim: a well-behaved guest on domain 6 that must still be served.
  void victim_is_served() {
    auto victim = open_channel(6);
    EXPECT_EQ(victim->call(request(VIBIF_OP_QUERY_DEVICE)).hdr.status, VIBIF_OK);
    auto pd = victim->call(request(VIBIF_OP_ALLOC_PD));
    EXPECT_EQ(pd.hdr.status, VIBIF_OK);
  }
  std::string log_text() const {
    std::ifstream in(log_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::size_t log_lines_with(const std::string& needle) const {
    std::istringstream in(log_text());
    std::size_t n = 0;
    for (std::string line; std::getline(in, line);)
      if (line.find(needle) != std::string::npos) ++n;
    return n;
  }
  // The attacker's device (domain 5) connected, the victim's (domain 6)
  // provisioned, vibd started with `args`; `attacker_keys` are written into
  // the attacker's back-end directory first (quotas, as the toolstack
  // would). The attacker's own xenstore connection is kept in
  // attacker_store_.
  void attacker_and_victim(const std::vector<std::string>& args = {},
                           const std::vector<std::pair<std::string, std::string>>& attacker_keys = {}) {
    provision(5);
    provision(6);
    for (const auto& [key, value] : attacker_keys) store_->write(platform::kNoTransaction, be(5) + "/" + key, value);
    start_vibd(args);
    ASSERT_TRUE(eventually(be(5) + "/state", "2"));
    attacker_store_ = platform::open_xenstore(xen_.as(5));
    attacker_store_->write(platform::kNoTransaction, fe(5) + "/state", "4");
    ASSERT_TRUE(eventually(be(5) + "/state", "4"));
  }
  // SIGTERM must end vibd whatever the guests do: its exit status.
  int terminate_vibd() { return stop_vibd(); }

  Footprint footprint() const {
    Footprint f;
    const std::string proc = "/proc/" + std::to_string(pid_);
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(proc + "/fd")) ++f.fds;
    for (const auto& task : std::filesystem::directory_iterator(proc + "/task")) {
      std::string name;
      std::getline(std::ifstream(task.path() / "comm"), name);
      ++f.threads[name];
    }
    // The host-local Xen's granted pages are memfds named "vib-grant".
    std::ifstream maps(proc + "/maps");
    for (std::string line; std::getline(maps, line);) {
      if (line.find("vib-grant") == std::string::npos) continue;
      unsigned long long begin = 0, end = 0;
      char dash = 0;
      std::istringstream range(line);
      range >> std::hex >> begin >> dash >> end;
      f.guest_pages_mapped += static_cast<std::size_t>((end - begin) / VIBIF_PAGE_SIZE);
    }
    f.backend_ctx_nodes =
        store_->directory(platform::kNoTransaction, be(5) + "/ctx").value_or(std::vector<std::string>{}).size();
    return f;
  }
  // vibd's footprint once it has stopped changing (two readings 100 ms
  // apart agree, within 5 s): a context being freed lets go of its pieces
  // one after another (its ring's pages before its event channel), and a
  // baseline taken between two of them would never be met again.
  Footprint settled_footprint() const {
    Footprint last = footprint();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const Footprint now = footprint();
      if (now == last) return now;
      last = now;
    }
    return last;
  }
  // The settled footprint once no guest page is mapped into vibd (waiting
  // up to `limit`): the baseline after warm-up contexts have been freed.
  Footprint footprint_without_guest_pages(std::chrono::milliseconds limit) const {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (footprint().guest_pages_mapped != 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return settled_footprint();
  }
  // vibd lets go of what an attack made it take, within a bound: frees run
  // on vibd's threads after the guest's side has gone.
  ::testing::AssertionResult footprint_returns_to(const Footprint& before,
                                                  std::chrono::milliseconds limit = std::chrono::seconds(5)) const {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    Footprint now = footprint();
    while (!(now == before) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      now = footprint();
    }
    if (now == before) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "vibd holds " << now << ", before the attack " << before;
  }

  std::string log_;
  std::unique_ptr<platform::XenStore> attacker_store_;
};

// One context of the attacker's, opened by hand (RawGuest) on a device whose
// pinned-page quota is kQuotaPages, with a PD; before_ is vibd's footprint
// once every path the attacks take has run once.
class HostileContext : public Hostile {
 protected:
  static constexpr std::uint32_t kQuotaPages = 64;
  static constexpr std::uint64_t kIova = 0x40000000;

  void SetUp() override {
    Hostile::SetUp();
    // One control thread: the pool's threads are part of vibd's footprint
    // once started, and the warm-up starts the only one there is.
    ASSERT_NO_FATAL_FAILURE(attacker_and_victim({"--control-threads", "1"},
                                                {{VIBIF_XS_MAX_PINNED_PAGES, std::to_string(kQuotaPages)}}));
    guest_ = std::make_unique<RawGuest>(xen_.as(5), 5, 50);
    pd_ = ok(VIBIF_OP_ALLOC_PD, request(VIBIF_OP_ALLOC_PD)).u.handle.handle;
    // Warm: every path the attacks take has run once (a registration large
    // enough for the control pool, a CQ), then everything is let go.
    auto pages = share(kQuotaPages);
    const auto mr = ok(VIBIF_OP_REG_MR, reg_mr(VIBIF_ACCESS_LOCAL_WRITE, indirect(pages->refs()), kQuotaPages));
    ok(VIBIF_OP_DEREG_MR, handle_request(VIBIF_OP_DEREG_MR, mr.u.reg_mr.mr));
    auto cq_page = share(1);
    const auto cq = ok(VIBIF_OP_CREATE_CQ, create_cq(inline_list(cq_page->refs())));
    ok(VIBIF_OP_DESTROY_CQ, handle_request(VIBIF_OP_DESTROY_CQ, cq.u.create_cq.cq));
    indirect_pages_.clear();
    before_ = settled_footprint();
  }

  std::unique_ptr<platform::SharedPages> share(std::size_t pages, bool writable = true,
                                               platform::DomId to = platform::kDom0) {
    return guest_->sharer().share(to, pages, writable);
  }
  static vibif_page_list inline_list(std::span<const platform::GrantRef> refs) {
    vibif_page_list list{};
    list.nr_pages = static_cast<std::uint32_t>(refs.size());
    list.nr_refs = static_cast<std::uint8_t>(refs.size());
    std::copy(refs.begin(), refs.end(), list.refs);
    return list;
  }
  // A one-level list: the refs go into a page granted read-only, kept until
  // the fixture ends.
  vibif_page_list indirect(std::span<const platform::GrantRef> refs) {
    auto page = share(1, /*writable=*/false);
    std::memcpy(page->bytes().data(), refs.data(), refs.size_bytes());
    vibif_page_list list{};
    list.nr_pages = static_cast<std::uint32_t>(refs.size());
    list.levels = 1;
    list.nr_refs = 1;
    list.refs[0] = page->refs()[0];
    indirect_pages_.push_back(std::move(page));
    return list;
  }
  vibif_request reg_mr(std::uint32_t access, const vibif_page_list& list, std::uint64_t pages) const {
    auto req = request(VIBIF_OP_REG_MR);
    req.u.reg_mr.pd = pd_;
    req.u.reg_mr.access = access;
    req.u.reg_mr.iova = kIova;
    req.u.reg_mr.length = pages * VIBIF_PAGE_SIZE;
    req.u.reg_mr.pages = list;
    return req;
  }
  static vibif_request create_cq(const vibif_page_list& list) {
    auto req = request(VIBIF_OP_CREATE_CQ);
    req.u.create_cq.cqe = VIBIF_PAGE_SIZE / sizeof(vibif_cqe);  // one page
    req.u.create_cq.pages = list;
    return req;
  }
  static vibif_request handle_request(std::uint16_t op, vibif_handle_t handle) {
    auto req = request(op);
    req.u.handle.handle = handle;
    return req;
  }
  // Calls on guest_'s context, or another one of the attacker's.
  std::int32_t status_of(const vibif_request& req, RawGuest* context = nullptr) {
    const auto rsp = (context ? *context : *guest_).call(req);
    return rsp ? rsp->hdr.status : 1;  // 1: no answer at all
  }
  vibif_response ok(std::uint16_t op, const vibif_request& req, RawGuest* context = nullptr) {
    const auto rsp = (context ? *context : *guest_).call(req);
    EXPECT_TRUE(rsp && rsp->hdr.status == VIBIF_OK) << "op " << op << ": " << (rsp ? rsp->hdr.status : 1);
    return rsp.value_or(vibif_response{});
  }

  // After an attack: the attacker's context still works, vibd holds what it
  // held before, the whole quota can be pinned (and no more), and the
  // victim is served.
  void nothing_was_lost() {
    EXPECT_EQ(status_of(request(VIBIF_OP_QUERY_DEVICE)), VIBIF_OK) << "the attacker's context still answers";
    EXPECT_TRUE(footprint_returns_to(before_));
    auto pages = share(kQuotaPages + 1);
    const auto all = pages->refs().first(kQuotaPages);
    const auto mr = guest_->call(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, indirect(all), kQuotaPages));
    ASSERT_TRUE(mr);
    EXPECT_EQ(mr->hdr.status, VIBIF_OK) << "the device's whole pinned-page quota is free again";
    EXPECT_EQ(status_of(reg_mr(VIBIF_ACCESS_LOCAL_WRITE, inline_list(pages->refs().last(1)), 1)), VIBIF_EDQUOT)
        << "and it still holds";
    if (mr->hdr.status == VIBIF_OK) {
      EXPECT_EQ(status_of(handle_request(VIBIF_OP_DEREG_MR, mr->u.reg_mr.mr)), VIBIF_OK);
    }
    victim_is_served();
  }

  std::unique_ptr<RawGuest> guest_;
  vibif_handle_t pd_ = 0;
  std::vector<std::unique_ptr<platform::SharedPages>> indirect_pages_;
  Footprint before_;
};

}  // namespace vib::test
