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
  // with a log path, its log goes there.
  void start_vibd(const char* vibd, const std::string& log = {}, const std::vector<std::string>& extra_args = {}) {
    std::vector<std::string> args = {vibd, "--local-xen", xen_.dir()};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a killed test
      if (::getppid() != parent) ::_exit(1);
      if (!log.empty()) {
        const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || ::dup2(fd, 2) < 0) ::_exit(126);
      }
      ::execv(vibd, argv.data());
      ::_exit(127);
    }
  }
  int stop_vibd() {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

  static std::string be(platform::DomId domid, unsigned devid = 0) {
    return "/local/domain/0/backend/vib/" + std::to_string(domid) + "/" + std::to_string(devid);
  }
  static std::string fe(platform::DomId domid, unsigned devid = 0) {
    return "/local/domain/" + std::to_string(domid) + "/device/vib/" + std::to_string(devid);
  }

  // What the toolstack writes for a device, with libxl's permissions.
  void provision(platform::DomId domid, const std::string& hca = "soft") {
    platform::with_transaction(*store_, [&](platform::TransactionId tx) { provision_in(tx, domid, hca); });
  }
  void provision_in(platform::TransactionId tx, platform::DomId domid, const std::string& hca) {
    using namespace platform;
    {
      store_->write(tx, be(domid) + "/frontend", fe(domid));
      store_->write(tx, be(domid) + "/frontend-id", std::to_string(domid));
      store_->write(tx, be(domid) + "/online", "1");
      store_->write(tx, be(domid) + "/state", "1");
      store_->write(tx, be(domid) + "/hca", hca);
      store_->set_permissions(tx, be(domid), {{kDom0, Access::none}, {domid, Access::read}});
      for (const char* key : {"/frontend", "/frontend-id", "/online", "/state", "/hca"})
        store_->set_permissions(tx, be(domid) + key, {{kDom0, Access::none}, {domid, Access::read}});
      store_->write(tx, fe(domid) + "/backend", be(domid));
      store_->write(tx, fe(domid) + "/backend-id", "0");
      store_->write(tx, fe(domid) + "/state", "1");
      for (const char* key : {"", "/backend", "/backend-id", "/state"})
        store_->set_permissions(tx, fe(domid) + key, {{domid, Access::none}, {kDom0, Access::read}});
    }
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
