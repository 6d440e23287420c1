// Test fixture: a host-local Xen with guest domains 5 and 6, vibd as a real
// process on it, and devices provisioned the way the toolstack does.
#pragma once

#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "local_xen.hpp"
#include "vibd_process.hpp"
#include "vib/platform/xenstore.hpp"
#include "vib/vibif.h"

namespace vib::test {

class VibdFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    xen_.create_domain(5);
    xen_.create_domain(6);
    store_ = platform::open_xenstore(xen_.as(0));
  }
  void TearDown() override { stop_vibd(); }

  // Starts vibd (the path comes from the test's build) on the local Xen;
  // with a log path, its log goes there. Returns once vibd has announced
  // itself (what the toolstack looks for before it waits on vibd), or has
  // exited.
  void start_vibd(const char* vibd, const std::string& log = {}, const std::vector<std::string>& extra_args = {}) {
    pid_ = spawn_vibd(vibd, xen_.dir(), log, extra_args);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (store_->read(platform::kNoTransaction, "/local/domain/0/libxl/vibd/pid") == std::to_string(pid_)) return;
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  int stop_vibd() { return vib::test::stop_vibd(pid_); }
  // vibd dies without a chance to close anything (kill -9, a crash).
  void kill_vibd() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  static std::string be(platform::DomId domid, unsigned devid = 0) { return backend_path(domid, devid); }
  static std::string fe(platform::DomId domid, unsigned devid = 0) { return frontend_path(domid, devid); }

  // What the toolstack writes for a device, with libxl's permissions.
  void provision(platform::DomId domid, const std::string& hca = "soft") {
    platform::with_transaction(*store_, [&](platform::TransactionId tx) { provision_in(tx, domid, hca); });
  }
  void provision_in(platform::TransactionId tx, platform::DomId domid, const std::string& hca) {
    provision_device(*store_, tx, domid, hca);
  }
  // A device with the RDMA-CM address `ip` (the toolstack's `ip=`).
  void provision_with_ip(platform::DomId domid, const std::string& ip, const std::string& hca = "soft") {
    platform::with_transaction(*store_, [&](platform::TransactionId tx) {
      provision_in(tx, domid, hca);
      store_->write(tx, be(domid) + "/" VIBIF_XS_IP, ip);
      store_->set_permissions(tx, be(domid) + "/" VIBIF_XS_IP,
                              {{platform::kDom0, platform::Access::none}, {domid, platform::Access::read}});
    });
  }

  // Polls xenstore (bounded) until `path` reads `want` (nullopt: is absent).
  bool eventually(const std::string& path, std::optional<std::string> want,
                  std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (store_->read(platform::kNoTransaction, path) == want) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  static vibif_request request(std::uint16_t op) {
    vibif_request req;
    std::memset(&req, 0, sizeof(req));
    req.hdr.op = op;
    return req;
  }

  LocalXen xen_;
  std::unique_ptr<platform::XenStore> store_;
  pid_t pid_ = -1;
};

}  // namespace vib::test
