#include "bench_support.hpp"

#include <dirent.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "vib/platform/xenstore.hpp"
#include "vibd_process.hpp"

namespace vib::bench {

using namespace std::chrono_literals;

namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  return out + "\"";
}

std::string json_number(std::optional<double> v) {
  if (!v) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", *v);
  return buf;
}

}  // namespace

void Report::print_table(std::FILE* out) const {
  std::string section;
  std::fprintf(out, "\n%-44s %12s %12s %10s %12s  %s\n", "metric", "direct", "via vib", "vib/direct", "shm floor",
               "target");
  for (const auto& r : rows_) {
    if (r.section != section) {
      section = r.section;
      std::fprintf(out, "-- %s\n", section.c_str());
    }
    const std::string name = r.metric + " (" + r.unit + ")";
    char direct[32] = "-", ratio[32] = "-", floor[32] = "-";
    if (r.direct) {
      std::snprintf(direct, sizeof direct, "%.2f", *r.direct);
      if (*r.direct > 0) std::snprintf(ratio, sizeof ratio, "%.2f", r.via / *r.direct);
    }
    if (r.floor) std::snprintf(floor, sizeof floor, "%.2f", *r.floor);
    std::fprintf(out, "%-44s %12s %12.2f %10s %12s  %s\n", name.c_str(), direct, r.via, ratio, floor,
                 r.target.c_str());
  }
  for (const auto& n : notes_) std::fprintf(out, "note: %s\n", n.c_str());
}

void Report::print_json(std::FILE* out, const std::string& header_json) const {
  std::fprintf(out, "{%s\"rows\":[", header_json.c_str());
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    const auto& r = rows_[i];
    std::optional<double> ratio;
    if (r.direct && *r.direct > 0) ratio = r.via / *r.direct;
    std::fprintf(out, "%s{\"section\":%s,\"metric\":%s,\"unit\":%s,\"direct\":%s,\"via_vib\":%s,\"ratio\":%s,"
                      "\"shm_floor\":%s,\"target\":%s}",
                 i ? "," : "", json_string(r.section).c_str(), json_string(r.metric).c_str(),
                 json_string(r.unit).c_str(), json_number(r.direct).c_str(), json_number(r.via).c_str(),
                 json_number(ratio).c_str(), json_number(r.floor).c_str(), json_string(r.target).c_str());
  }
  std::fprintf(out, "],\"notes\":[");
  for (std::size_t i = 0; i < notes_.size(); ++i)
    std::fprintf(out, "%s%s", i ? "," : "", json_string(notes_[i]).c_str());
  std::fprintf(out, "]}\n");
}

VibHost::VibHost(const std::vector<platform::DomId>& domains, const std::string& vibd_log,
                 const std::vector<std::string>& args) {
  for (auto d : domains) xen_.create_domain(d);
  auto store = platform::open_xenstore(xen_.as(0));
  platform::with_transaction(*store, [&](platform::TransactionId tx) {
    for (auto d : domains) test::provision_device(*store, tx, d, "soft");
  });
  vibd_ = test::spawn_vibd(VIBD, xen_.dir(), vibd_log.empty() ? xen_.dir() + "/vibd.log" : vibd_log, args);
  const auto deadline = Clock::now() + 10s + domains.size() * 100ms;
  for (auto d : domains) {
    const auto path = test::backend_path(d) + "/state";
    while (store->read(platform::kNoTransaction, path) != std::optional<std::string>("2")) {
      if (Clock::now() > deadline) {
        test::stop_vibd(vibd_);
        fail("vibd did not bring up the device of domain " + std::to_string(d));
      }
      std::this_thread::sleep_for(5ms);
    }
  }
}

VibHost::~VibHost() { test::stop_vibd(vibd_); }

std::vector<std::string>& vibd_args() {
  static std::vector<std::string> args;
  return args;
}

namespace {

long long status_field(const std::string& path, const char* key) {
  std::ifstream in(path);
  std::string line;
  const std::size_t len = std::strlen(key);
  while (std::getline(in, line))
    if (line.compare(0, len, key) == 0) return std::atoll(line.c_str() + len);
  return 0;
}

}  // namespace

ProcessReading read_process(pid_t pid) {
  ProcessReading r;
  const std::string base = "/proc/" + std::to_string(pid);
  r.threads = static_cast<long>(status_field(base + "/status", "Threads:"));
  r.rss_kib = static_cast<long>(status_field(base + "/status", "VmRSS:"));
  std::error_code error;
  for (auto it = std::filesystem::directory_iterator(base + "/fd", error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error))
    ++r.open_files;
  {
    std::ifstream in(base + "/stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // Fields after the command name (which may hold spaces): state is field 3,
    // utime 14 and stime 15.
    const auto close = stat.rfind(')');
    if (close != std::string::npos) {
      std::istringstream fields(stat.substr(close + 2));
      std::string f;
      long long utime = 0, stime = 0;
      for (int i = 3; fields >> f; ++i) {
        if (i == 14) utime = std::atoll(f.c_str());
        if (i == 15) {
          stime = std::atoll(f.c_str());
          break;
        }
      }
      r.cpu_ticks = utime + stime;
    }
  }
  if (DIR* tasks = ::opendir((base + "/task").c_str())) {
    while (dirent* e = ::readdir(tasks)) {
      if (e->d_name[0] == '.') continue;
      const std::string status = base + "/task/" + e->d_name + "/status";
      r.voluntary_switches += status_field(status, "voluntary_ctxt_switches:");
      r.involuntary_switches += status_field(status, "nonvoluntary_ctxt_switches:");
    }
    ::closedir(tasks);
  }
  return r;
}

double load_average() {
  double load[1] = {0};
  return ::getloadavg(load, 1) == 1 ? load[0] : -1;
}

}  // namespace vib::bench
