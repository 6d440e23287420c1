#include "vib/platform/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <system_error>

#include "vib/platform/unique_fd.hpp"

extern char** environ;

namespace vib::platform {

ProgramResult run_program(const std::vector<std::string>& argv, const std::vector<std::string>& extra_env,
                          std::chrono::milliseconds timeout, const std::atomic<bool>* cancel) {
  ProgramResult result;
  // Everything the child needs is built before fork: after it, only
  // async-signal-safe calls.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    const std::string entry(*e);
    const std::string name = entry.substr(0, entry.find('='));
    bool overridden = false;
    for (const auto& x : extra_env) overridden |= x.compare(0, name.size() + 1, name + "=") == 0;
    if (!overridden) env_strings.push_back(entry);
  }
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp, args;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& s : argv_copy) args.push_back(s.data());
  args.push_back(nullptr);

  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::generic_category(), "pipe");
  UniqueFd read_end(fds[0]), write_end(fds[1]);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::system_error(errno, std::generic_category(), "fork");
  if (pid == 0) {
    // vibd blocks SIGTERM for its signalfd; the script must not inherit that.
    sigset_t none;
    ::sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::dup2(write_end.get(), STDOUT_FILENO);
    ::dup2(write_end.get(), STDERR_FILENO);
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, STDIN_FILENO);
    ::execve(args[0], args.data(), envp.data());
    const char msg[] = "cannot execute the script\n";
    [[maybe_unused]] auto n = ::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(127);
  }
  write_end = UniqueFd();
  // The verdict is the script's exit, not the end of its output: a daemon
  // it started may keep the pipe open for ever.
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::array<char, 512> buf;
  int status = 0;
  bool eof = false;
  auto drain = [&](int wait_ms) {
    pollfd p{read_end.get(), POLLIN, 0};
    if (eof) {
      ::poll(nullptr, 0, wait_ms);
      return;
    }
    while (::poll(&p, 1, wait_ms) > 0) {
      const ssize_t got = ::read(read_end.get(), buf.data(), buf.size());
      if (got <= 0) {
        eof = got == 0 || errno != EINTR;
        return;
      }
      if (result.output.size() < 64 * 1024) result.output.append(buf.data(), static_cast<std::size_t>(got));
      wait_ms = 0;
    }
  };
  for (;;) {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid || (done < 0 && errno != EINTR)) break;
    result.cancelled = cancel && cancel->load(std::memory_order_relaxed);
    if (result.cancelled || std::chrono::steady_clock::now() >= deadline) {
      result.timed_out = !result.cancelled;
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    drain(20);
  }
  drain(0);
  result.exit_status = !result.timed_out && !result.cancelled && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  while (!result.output.empty() && result.output.back() == '\n') result.output.pop_back();
  return result;
}

void name_this_thread(const std::string& name) {
  // Fails only with a name too long, which the cut rules out; a thread
  // without its name works the same.
  (void)::pthread_setname_np(::pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace vib::platform
