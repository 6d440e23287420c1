#include "status.hpp"

#include <algorithm>
#include <system_error>

#include "device.hpp"
#include "log.hpp"

namespace vib::backend {

StatusPublisher::StatusPublisher(platform::XenStore& store, std::string dir, std::chrono::milliseconds interval)
    : store_(store), root_(std::move(dir) + "/devices"), interval_(interval), last_(Clock::now() - interval) {}

int StatusPublisher::timeout(bool counters_move) const {
  if (!dirty_ && !counters_move) return -1;
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(last_ + interval_ - Clock::now()).count();
  return static_cast<int>(std::clamp<long long>(left, 0, interval_.count()));
}

bool StatusPublisher::publish_if_due(const Snapshot& snapshot, bool counters_move) {
  if (timeout(counters_move) != 0) return false;
  last_ = Clock::now();
  dirty_ = false;
  try {
    publish(snapshot);
  } catch (const std::system_error& e) {
    log_line(LogLevel::warning, "vibd", std::string("cannot publish the devices' status: ") + e.what());
  }
  return true;
}

void StatusPublisher::publish(const Snapshot& snapshot) {
  std::map<std::string, std::string> wanted;
  for (const auto& [id, device] : snapshot) {
    const std::string path = root_ + "/" + id;
    wanted[path] = toolstack::format_status(device);
    for (const auto& ctx : device.contexts) wanted[path + "/" + std::to_string(ctx.id)] = toolstack::format_status(ctx);
  }
  if (wanted == written_) return;
  platform::with_transaction(store_, [&](platform::TransactionId tx) {
    // Gone devices and contexts first; removing a device removes its contexts.
    for (const auto& [path, text] : written_)
      if (!wanted.count(path)) store_.remove(tx, path);
    for (const auto& [path, text] : wanted) {
      auto old = written_.find(path);
      if (old == written_.end() || old->second != text) store_.write(tx, path, text);
    }
    // Per-domain directories the last device of a domain left behind.
    for (const auto& dom : store_.directory(tx, root_).value_or(std::vector<std::string>{})) {
      auto left = store_.directory(tx, root_ + "/" + dom);
      if (left && left->empty()) store_.remove(tx, root_ + "/" + dom);
    }
  });
  written_ = std::move(wanted);
}


// The two views of status.hpp's snapshot, here rather than in device.cpp:
// they only read what Device and Context keep for their own work.

toolstack::DeviceStatus Device::status() const {
  toolstack::DeviceStatus d;
  d.state = static_cast<int>(state_);
  if (hca_) d.hca = hca_->name();
  if (config_) {
    d.port = config_->port;
    d.quotas = {config_->max_pds, config_->max_cqs, config_->max_qps,
                config_->max_srqs, config_->max_mrs, config_->max_ahs};
    d.max_pinned_pages = config_->max_pinned_pages;
  }
  for (const auto& [id, ctx] : contexts_) d.contexts.push_back(ctx->status());
  return d;
}

toolstack::ContextStatus Context::status() const {
  const ContextStats& s = control_.stats();
  const auto get = [](const ContextStats::Counter& c) { return ContextStats::get(c); };
  toolstack::ContextStatus c;
  c.id = ctxid_;
  c.objects = {get(s.pds), get(s.cqs), get(s.qps), get(s.srqs), get(s.mrs), get(s.ahs)};
  c.pinned_pages = get(s.pinned_pages);
  c.requests = get(s.requests);
  c.request_errors = get(s.request_errors);
  c.wqes = get(s.wqes);
  c.completions = get(s.completions);
  c.completion_errors = get(s.completion_errors);
  c.last_activity = s.last_activity_unix();
  return c;
}

}  // namespace vib::backend
