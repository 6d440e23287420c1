// This process's helpers: programs it runs (a hotplug script) with a time
// limit, and names for its threads.
#pragma once

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

namespace vib::platform {

struct ProgramResult {
  int exit_status = -1;  // -1: killed (time limit) or did not start
  bool timed_out = false;
  bool cancelled = false;
  std::string output;  // stdout and stderr, at most 64 KiB, for error messages
};

// Runs argv[0] with the current environment plus `extra_env` ("K=V"), stdin
// from /dev/null, killing it after `timeout`. Done when the program exits:
// a daemon it leaves behind holding its output does not keep us waiting.
// Setting *cancel kills it early (its owner no longer wants the verdict).
// Throws std::system_error if it cannot be started at all.
ProgramResult run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                          std::chrono::milliseconds timeout, const std::atomic<bool>* cancel = nullptr);

// Names the calling thread as `top -H`, ps, gdb and /proc/<pid>/task/*/comm
// show it: what an administrator sees of vibd's threads. Linux keeps 15
// characters; the rest is cut.
void name_this_thread(const std::string& name);

}  // namespace vib::platform
