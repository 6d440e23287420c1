#include "provisioner.hpp"

#include <exception>

#include "log.hpp"
#include "vib/libxl_ib.hpp"
#include "vib/platform/process.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"

namespace vib::backend {

namespace {

std::string domain_subject(platform::DomId domid) { return "dom" + std::to_string(domid); }

}  // namespace

Provisioner::Provisioner(ProvisionerSettings settings) : settings_(std::move(settings)) {
  thread_ = std::thread([this] {
    platform::name_this_thread("vib-provision");
    run();
  });
}

Provisioner::~Provisioner() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void Provisioner::domains_introduced() {
  {
    std::lock_guard lock(mu_);
    introduced_ = true;
  }
  wake_.notify_one();
}

void Provisioner::domains_released() {
  {
    std::lock_guard lock(mu_);
    released_ = true;
  }
  wake_.notify_one();
}

void Provisioner::run() {
  using Clock = std::chrono::steady_clock;
  std::unique_ptr<toolstack::Toolstack> toolstack;
  try {
    toolstack = std::make_unique<toolstack::Toolstack>(settings_.xen);
  } catch (const std::exception& e) {
    log_line(LogLevel::error, "vibd", std::string("provisioning at domain creation is off: ") + e.what());
    return;
  }
  auto& store = toolstack->store();
  const platform::DomId self = toolstack->self();
  // Domains seen so far; those still waiting for their saved config, with
  // the time they stop waiting.
  std::set<platform::DomId> known;
  std::map<platform::DomId, Clock::time_point> waiting;
  bool first_pass = true;

  for (;;) {
    bool introduced = false, released = false;
    {
      std::unique_lock lock(mu_);
      // While domains wait for their config, look again every 100 ms.
      auto ready = [&] { return stop_ || introduced_ || released_; };
      if (waiting.empty()) wake_.wait(lock, ready);
      else wake_.wait_for(lock, std::chrono::milliseconds(100), ready);
      if (stop_) return;
      std::swap(introduced, introduced_);
      std::swap(released, released_);
    }
    try {
      if (introduced || released) {
        std::set<platform::DomId> now;
        for (const auto& entry : store.directory(platform::kNoTransaction, "/local/domain").value_or(std::vector<std::string>{})) {
          auto id = platform::parse_decimal(entry, 0x7FEF);
          if (id && *id != platform::kDom0 && *id != self) now.insert(static_cast<platform::DomId>(*id));
        }
        for (platform::DomId domid : now)
          if (known.insert(domid).second)
            // A domain that existed before vibd started has its config saved
            // already: one look is enough.
            waiting[domid] = first_pass ? Clock::now() : Clock::now() + settings_.userdata_wait;
        std::erase_if(known, [&](platform::DomId d) { return !now.count(d); });
        std::erase_if(waiting, [&](const auto& w) { return !now.count(w.first); });
        first_pass = false;
      }
      if (released) {
        if (const unsigned removed = toolstack->cleanup_dead_domains())
          log_line(LogLevel::info, "vibd", "removed " + std::to_string(removed) + " vib devices of destroyed domains");
      }
      for (auto it = waiting.begin(); it != waiting.end();) {
        const platform::DomId domid = it->first;
        const std::string subject = domain_subject(domid);
        try {
          toolstack::ProvisionResult result;
          try {
            result = toolstack->provision_stashed(domid, settings_.stash_dir);
          } catch (const toolstack::Error& e) {
            if (e.code() != toolstack::ErrorCode::not_found) throw;
            result = toolstack->provision_domain(domid, settings_.userdata_dir);
          }
          for (const auto& w : result.warnings) log_line(LogLevel::warning, subject, w);
          if (!result.devices.empty())
            log_line(LogLevel::info, subject,
                     "provisioned " + std::to_string(result.devices.size()) + " vib devices from its xl config");
          it = waiting.erase(it);
        } catch (const toolstack::Error& e) {
          if (e.code() == toolstack::ErrorCode::not_found && Clock::now() < it->second) {
            ++it;  // xl has not saved the config yet
            continue;
          }
          // Not an xl-created domain (no saved config), or a bad vib= line:
          // the domain runs without vib devices and the log says why.
          log_line(e.code() == toolstack::ErrorCode::not_found ? LogLevel::debug : LogLevel::error, subject,
                   std::string("no vib devices provisioned: ") + e.what());
          it = waiting.erase(it);
        }
      }
    } catch (const std::exception& e) {
      // A store failure must not end provisioning for the next domains.
      log_line(LogLevel::warning, "vibd", std::string("provisioning: ") + e.what());
    }
  }
}

}  // namespace vib::backend
