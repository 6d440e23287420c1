#include "hotplug.hpp"

#include <system_error>

namespace vib::backend {

std::optional<std::string> hotplug_script_path(const std::string& script, const std::string& scripts_dir) {
  if (script.empty()) return std::nullopt;
  if (script.front() == '/') return script;
  // A relative path could climb out of the scripts directory.
  if (script.find('/') != std::string::npos || script == "." || script == "..") return std::nullopt;
  return scripts_dir + "/" + script;
}

HotplugRun::HotplugRun(const HotplugSettings& settings, const std::string& path, const std::string& action,
                       const std::string& backend_path, std::function<void()> done)
    : path_(path), action_(action) {
  std::vector<std::string> env = settings.extra_env;
  env.push_back("XENBUS_PATH=" + backend_path);
  env.push_back("XENBUS_TYPE=vib");
  env.push_back("XENBUS_BASE_PATH=" + backend_path.substr(0, backend_path.find("/backend/") + 8));
  thread_ = std::thread([this, env = std::move(env), timeout = settings.timeout, done = std::move(done)] {
    platform::name_this_thread("vib-hotplug");
    platform::ProgramResult r;
    try {
      r = platform::run_program({path_, action_}, env, timeout, &cancel_);
    } catch (const std::system_error& e) {
      r.output = e.what();
    }
    {
      std::lock_guard lock(mu_);
      result_ = std::move(r);
    }
    done();
  });
}

HotplugRun::~HotplugRun() {
  cancel_.store(true, std::memory_order_relaxed);
  thread_.join();
}

std::optional<platform::ProgramResult> HotplugRun::result() const {
  std::lock_guard lock(mu_);
  return result_;
}

}  // namespace vib::backend
