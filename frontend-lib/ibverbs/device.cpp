// libibverbs over libvibfront: devices, contexts, queries, completion
// channels and asynchronous events.
//
// Events. vibd queues completion and asynchronous events in the context's
// doorbell page and notifies its event channel; libvibfront's control calls
// wait on that same event channel. Applications, on the other hand, wait on
// a completion channel's fd or on context->async_fd, and may block there
// while no verbs call of theirs runs. So each context has a dispatcher
// thread that sleeps on the event channel and routes what is queued to an
// eventfd per completion channel (and to async_fd). It drains through
// Device::take_events(), which holds the ring's lock: it can never consume
// the notification a control call is waiting for. The other way round, a
// control call can consume an event's notification before the dispatcher
// sees it; that is why every entry point that makes a control call pumps
// after it (PumpAfter). An event is therefore dispatched either by the
// dispatcher (woken by a notification nobody consumed) or by the caller
// that consumed it — never lost.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "objects.hpp"
#include "vib_private.h"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"

// Defined here under their exported names, which verbs.h maps to inline wrappers.
#undef ibv_get_device_list
#undef ibv_query_port

namespace vib::ibverbs {

namespace {

using platform::kNoTransaction;
using platform::XenbusState;

[[noreturn]] void fail(int err, const std::string& what) {
  throw std::system_error(err, std::generic_category(), "vib: " + what);
}

// The process-wide device registry (see DeviceEntry); entries are never freed.
struct Registry {
  std::mutex mu;
  std::map<unsigned, std::unique_ptr<DeviceEntry>> devices;
};
Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: devices outlive static destructors
  return *r;
}

constexpr const char* kDeviceNodeName = "vib";

DeviceEntry& entry_for(unsigned devid) {
  auto& r = registry();
  std::lock_guard lock(r.mu);
  auto& slot = r.devices[devid];
  if (!slot) {
    slot = std::make_unique<DeviceEntry>();
    auto& d = slot->verbs;
    d.node_type = IBV_NODE_CA;
    d.transport_type = IBV_TRANSPORT_IB;
    std::snprintf(d.name, sizeof(d.name), "vib%u", devid);
    // UCX uses a device only if /dev/infiniband/<dev_name> is a character
    // device the process may read and write. Every vib device is reached
    // through the same grant-allocation device, which vib's guest udev rule
    // links there (frontend-lib/udev/90-vib.rules): one name for all.
    std::snprintf(d.dev_name, sizeof(d.dev_name), "%s", kDeviceNodeName);
    // No kernel device backs it: sysfs reads of these paths fail cleanly.
    std::snprintf(d.dev_path, sizeof(d.dev_path), "/sys/class/infiniband_verbs/uverbs-vib%u", devid);
    std::snprintf(d.ibdev_path, sizeof(d.ibdev_path), "/sys/class/infiniband/vib%u", devid);
    slot->devid = devid;
  }
  return *slot;
}

// The vib devices of this domain whose back-end can serve them: one whose
// back-end closed (an error, or removal in progress) cannot be opened, so
// it is not listed, as a kernel does not list an unregistered device.
std::vector<unsigned> discover() {
  const auto target = xen_target_from_env();
  auto store = platform::open_xenstore(target);
  const auto self = store->read(kNoTransaction, "domid");
  const auto domid = self ? platform::parse_decimal(*self, 0x7FEF) : std::nullopt;
  if (!domid) fail(ENODEV, "cannot read this domain's id from xenstore");
  const std::string base = store->domain_path(static_cast<platform::DomId>(*domid)) + "/device/" VIBIF_XS_DEVICE_TYPE;
  std::vector<unsigned> found;
  for (const auto& name : store->directory(kNoTransaction, base).value_or(std::vector<std::string>{})) {
    const auto devid = platform::parse_decimal(name, 0xffff);
    if (!devid) continue;
    const auto backend = store->read(kNoTransaction, base + "/" + name + "/backend");
    if (!backend) continue;
    const auto state = platform::parse_state(store->read(kNoTransaction, *backend + "/state").value_or(""));
    if (!state || *state == XenbusState::closing || *state == XenbusState::closed) continue;
    found.push_back(static_cast<unsigned>(*devid));
  }
  return found;
}

front::ChannelOptions options_for(const DeviceEntry& entry) {
  front::ChannelOptions options;
  options.xen = xen_target_from_env();
  options.devid = entry.devid;
  return options;
}

void post_eventfd(int fd) {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(fd, &one, sizeof(one));
}

// Reads one count from an eventfd in semaphore mode: blocks unless the
// application made the fd non-blocking. false with errno set on failure.
bool take_eventfd(int fd) {
  std::uint64_t value = 0;
  for (;;) {
    const auto n = ::read(fd, &value, sizeof(value));
    if (n == sizeof(value)) return true;
    if (n < 0 && errno == EINTR) continue;
    return false;
  }
}

platform::UniqueFd make_eventfd() {
  platform::UniqueFd fd(::eventfd(0, EFD_CLOEXEC | EFD_SEMAPHORE));
  if (!fd) fail(errno, "eventfd");
  return fd;
}

enum class Target { qp, cq, srq, port, device };
Target target_of(int event) {
  switch (event) {
    case IBV_EVENT_CQ_ERR:
      return Target::cq;
    case IBV_EVENT_SRQ_ERR:
    case IBV_EVENT_SRQ_LIMIT_REACHED:
      return Target::srq;
    case IBV_EVENT_PORT_ACTIVE:
    case IBV_EVENT_PORT_ERR:
    case IBV_EVENT_LID_CHANGE:
    case IBV_EVENT_PKEY_CHANGE:
    case IBV_EVENT_SM_CHANGE:
    case IBV_EVENT_CLIENT_REREGISTER:
    case IBV_EVENT_GID_CHANGE:
      return Target::port;
    case IBV_EVENT_DEVICE_FATAL:
      return Target::device;
    default:
      return Target::qp;
  }
}

constexpr std::size_t kMaxQueuedAsyncEvents = 4096;

// How often the dispatcher asks whether the back-end still serves the
// context. A vibd that dies (or restarts) sends nothing: without asking, a
// program blocked in ibv_get_async_event or waiting for completions would
// never learn. One xenstore read a second per open device.
constexpr std::chrono::seconds kLivenessInterval{1};

void dispatcher_main(Context* ctx) {
  pollfd fds[2] = {{ctx->device->event_fd(), POLLIN, 0}, {ctx->stop_fd.get(), POLLIN, 0}};
  auto next_check = std::chrono::steady_clock::now() + kLivenessInterval;
  bool fatal = false;
  for (;;) {
    const int timeout = fatal ? -1 : static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                          kLivenessInterval).count());
    if (::poll(fds, 2, timeout) < 0 && errno != EINTR) return;
    if (fds[1].revents) return;
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) return;  // the context is gone
    if (fds[0].revents) ctx->pump();
    const auto now = std::chrono::steady_clock::now();
    if (fatal || now < next_check) continue;
    next_check = now + kLivenessInterval;
    if (ctx->device->backend_gone().value_or(false)) {
      ctx->pump();  // what the back-end queued before it went, first
      ctx->report_fatal();
      fatal = true;
    }
  }
}

ibv_context* open_device(ibv_device* device) {
  auto* entry = to_dev(device);
  auto ctx = std::make_unique<Context>();
  ctx->entry = entry;
  ctx->device = front::Device::open(options_for(*entry));
  ctx->async_fd = make_eventfd();
  ctx->stop_fd = make_eventfd();
  auto& c = ctx->vctx.context;
  c.device = device;
  c.cmd_fd = -1;  // no kernel command channel
  c.async_fd = ctx->async_fd.get();
  c.num_comp_vectors = 1;
  ::pthread_mutex_init(&c.mutex, nullptr);
  // An extended context: the inline verbs of <infiniband/verbs.h>
  // (ibv_query_port, ibv_query_device_ex, ibv_create_qp_ex) look here.
  c.abi_compat = __VERBS_ABI_IS_EXTENDED;
  ctx->vctx.sz = sizeof(verbs_context);
  fill_ops(ctx->vctx);
  // VIB_EVENT_THREAD=0 (tests only) leaves delivery to the pumps after
  // control calls, so a test can prove those alone lose nothing.
  const char* thread = std::getenv("VIB_EVENT_THREAD");
  if (!thread || std::strcmp(thread, "0") != 0) ctx->dispatcher = std::thread(dispatcher_main, ctx.get());
  return &ctx.release()->vctx.context;  // owned by the application until ibv_close_device
}

}  // namespace

platform::XenTarget xen_target_from_env() {
  const char* dir = std::getenv("VIB_LOCAL_XEN");
  if (!dir || !*dir) return platform::XenTarget::real();
  const char* dom = std::getenv("VIB_DOMID");
  const auto domid = dom ? platform::parse_decimal(dom, 0x7FEF) : std::nullopt;
  if (!domid) fail(EINVAL, "VIB_LOCAL_XEN is set but VIB_DOMID is not a domain id");
  return platform::XenTarget::local(dir, static_cast<platform::DomId>(*domid));
}

void Context::pump() noexcept {
  try {
    for (const auto& e : device->take_events()) {
      if (e.type == VIBIF_EVENT_CM) {
        void (*handler)(void*, std::uint32_t) = nullptr;
        void* arg = nullptr;
        {
          std::lock_guard lock(mu);
          handler = cm_handler;
          arg = cm_handler_arg;
        }
        if (handler) handler(arg, e.handle);
        continue;
      }
      std::lock_guard lock(mu);
      if (e.type == VIBIF_EVENT_COMPLETION) {
        auto it = cqs.find(e.handle);
        if (it == cqs.end() || !it->second->channel) continue;  // destroyed, or nobody listens
        auto* channel = it->second->channel;
        std::lock_guard channel_lock(channel->mu);
        channel->events.push_back(&it->second->verbs);
        post_eventfd(channel->fd.get());
        continue;
      }
      if (e.type != VIBIF_EVENT_ASYNC) continue;
      ibv_async_event a{};
      a.event_type = static_cast<ibv_event_type>(e.event);
      switch (target_of(e.event)) {
        case Target::qp: {
          auto it = qps.find(e.handle);
          if (it == qps.end()) continue;
          a.element.qp = &it->second->ex.qp_base;
          break;
        }
        case Target::cq: {
          auto it = cqs.find(e.handle);
          if (it == cqs.end()) continue;
          a.element.cq = &it->second->verbs;
          break;
        }
        case Target::srq: {
          auto it = srqs.find(e.handle);
          if (it == srqs.end()) continue;
          a.element.srq = &it->second->verbs;
          break;
        }
        case Target::port:
          a.element.port_num = e.handle > 0 && e.handle < 256 ? static_cast<int>(e.handle) : 1;
          break;
        case Target::device:
          break;
      }
      // An application that never reads async events must not grow this
      // without bound; the oldest are the least interesting.
      if (async_events.size() >= kMaxQueuedAsyncEvents) async_events.pop_front();
      async_events.push_back(a);
      post_eventfd(async_fd.get());
    }
  } catch (...) {
    // Nothing to report to: the events stay queued for the next pump.
  }
}

void Context::report_fatal() noexcept {
  ibv_async_event a{};
  a.event_type = IBV_EVENT_DEVICE_FATAL;
  a.element.port_num = 0;
  std::lock_guard lock(mu);
  if (async_events.size() >= kMaxQueuedAsyncEvents) async_events.pop_front();
  async_events.push_back(a);
  post_eventfd(async_fd.get());
  // No completion will come: a thread blocked in ibv_get_cq_event wakes
  // with EIO, as rdma-core's does when the kernel disassociates a removed
  // HCA.
  for (auto& [handle, cq] : cqs) {
    if (!cq->channel) continue;
    std::lock_guard channel_lock(cq->channel->mu);
    if (cq->channel->device_gone) continue;
    cq->channel->device_gone = true;
    post_eventfd(cq->channel->fd.get());
  }
}

}  // namespace vib::ibverbs

using namespace vib::ibverbs;

extern "C" {

// ---- devices ------------------------------------------------------------------

ibv_device** ibv_get_device_list(int* num_devices) {
  auto list = or_null([&]() -> ibv_device** {
    std::vector<unsigned> ids;
    try {
      ids = discover();
    } catch (const std::bad_alloc&) {
      throw;
    } catch (const std::exception&) {
      // No xenstore, or not a guest with vib devices: no devices, as
      // libibverbs answers on a machine without HCAs.
    }
    auto** out = static_cast<ibv_device**>(std::calloc(ids.size() + 1, sizeof(ibv_device*)));
    if (!out) throw std::bad_alloc();
    for (std::size_t i = 0; i < ids.size(); ++i) out[i] = &entry_for(ids[i]).verbs;
    if (num_devices) *num_devices = static_cast<int>(ids.size());
    return out;  // the application frees it with ibv_free_device_list
  });
  if (!list && num_devices) *num_devices = 0;
  return list;
}

void ibv_free_device_list(ibv_device** list) { std::free(list); }

const char* ibv_get_device_name(ibv_device* device) { return device ? device->name : nullptr; }

int ibv_get_device_index(ibv_device*) { return -1; }  // no kernel device index

__be64 ibv_get_device_guid(ibv_device* device) {
  auto* entry = to_dev(device);
  try {
    std::lock_guard lock(entry->mu);
    if (!entry->guid_known) {
      // The GUID is the HCA's (the back-end's answer); ask once.
      auto dev = vib::front::Device::open(options_for(*entry));
      ibv_device_attr attr;
      dev->query_device(attr);
      entry->guid = attr.node_guid;
      entry->guid_known = true;
    }
    return entry->guid;
  } catch (...) {
    errno = errno_of_current_exception();
    return 0;
  }
}

ibv_context* ibv_open_device(ibv_device* device) {
  if (!device) {
    errno = EINVAL;
    return nullptr;
  }
  return or_null([&] { return open_device(device); });
}

int ibv_close_device(ibv_context* context) {
  std::unique_ptr<Context> ctx(to_ctx(context));
  post_eventfd(ctx->stop_fd.get());
  const int err = or_errno([&] {
    if (ctx->dispatcher.joinable()) ctx->dispatcher.join();
    return 0;
  });
  if (err) ctx->dispatcher.detach();  // never std::terminate in the application
  ::pthread_mutex_destroy(&context->mutex);
  return 0;  // the Device closes the context; the back-end frees what is left
}

// ---- queries --------------------------------------------------------------------

int ibv_query_device(ibv_context* context, ibv_device_attr* attr) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ctx.device->query_device(*attr);
    return 0;
  });
}

namespace {
int query_port(ibv_context* context, uint8_t port, ibv_port_attr& attr) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ctx.device->query_port(port, attr);
    return 0;
  });
}
}  // namespace

// The pre-1.4 entry point: the caller's struct ends before `flags`.
int ibv_query_port(ibv_context* context, uint8_t port, _compat_ibv_port_attr* out) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ibv_port_attr attr;
    ctx.device->query_port(port, attr);
    std::memcpy(static_cast<void*>(out), &attr, offsetof(ibv_port_attr, flags));
    return 0;
  });
}

int ibv_query_gid(ibv_context* context, uint8_t port, int index, ibv_gid* gid) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    ctx.device->query_gid(port, index, *gid);
    return 0;
  }) ? -1 : 0;
}

int ibv_query_pkey(ibv_context* context, uint8_t port, int index, __be16* pkey) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] {
    std::uint16_t value = 0;
    ctx.device->query_pkey(port, index, value);
    *pkey = value;
    return 0;
  }) ? -1 : 0;
}

int ibv_get_pkey_index(ibv_context* context, uint8_t port, __be16 pkey) {
  ibv_port_attr attr;
  if (query_port(context, port, attr)) return -1;
  for (int i = 0; i < static_cast<int>(attr.pkey_tbl_len); ++i) {
    __be16 value = 0;
    if (ibv_query_pkey(context, port, i, &value) == 0 && value == pkey) return i;
  }
  errno = ENOENT;
  return -1;
}

int _ibv_query_gid_ex(ibv_context* context, uint32_t port, uint32_t index, ibv_gid_entry* entry, uint32_t flags,
                      size_t entry_size) {
  if (flags || entry_size < sizeof(ibv_gid_entry)) return EINVAL;
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  ibv_gid gid;
  int type = IBV_GID_TYPE_IB;
  if (or_errno([&] {
        ctx.device->query_gid(static_cast<std::uint8_t>(port), static_cast<int>(index), gid, &type);
        return 0;
      }))
    return errno;
  *entry = ibv_gid_entry{};
  entry->gid = gid;
  entry->gid_index = index;
  entry->port_num = port;
  entry->gid_type = static_cast<uint32_t>(type);  // IB on the soft HCA; what the HCA says on others
  return 0;
}

ssize_t _ibv_query_gid_table(ibv_context* context, ibv_gid_entry* entries, size_t max_entries, uint32_t flags,
                             size_t entry_size) {
  if (flags || entry_size < sizeof(ibv_gid_entry)) return -EINVAL;
  ibv_device_attr dev;
  if (int err = ibv_query_device(context, &dev)) return -err;
  size_t n = 0;
  for (uint8_t port = 1; port <= dev.phys_port_cnt; ++port) {
    ibv_port_attr attr;
    if (query_port(context, port, attr)) return -errno;
    for (int i = 0; i < attr.gid_tbl_len; ++i) {
      if (n == max_entries) return -EINVAL;
      if (int err = _ibv_query_gid_ex(context, port, static_cast<uint32_t>(i), &entries[n], 0, entry_size)) return -err;
      ++n;
    }
  }
  return static_cast<ssize_t>(n);
}

// rdma-core's private enum ibv_gid_type_sysfs: 0 is IB / RoCE v1, 1 RoCE v2.
int ibv_query_gid_type(ibv_context* context, uint8_t port, unsigned int index, int* type) {
  ibv_gid_entry entry;
  if (int err = _ibv_query_gid_ex(context, port, index, &entry, 0, sizeof(entry))) {
    errno = err;
    return -1;
  }
  *type = entry.gid_type == IBV_GID_TYPE_ROCE_V2 ? 1 : 0;
  return 0;
}

// ---- completion channels and events -----------------------------------------------------

ibv_comp_channel* ibv_create_comp_channel(ibv_context* context) {
  return or_null([&] {
    auto channel = std::make_unique<CompChannel>();
    channel->fd = make_eventfd();
    channel->verbs.context = context;
    channel->verbs.fd = channel->fd.get();
    return &channel.release()->verbs;  // the application's until ibv_destroy_comp_channel
  });
}

int ibv_destroy_comp_channel(ibv_comp_channel* channel) {
  delete to_channel(channel);
  return 0;
}

int ibv_get_cq_event(ibv_comp_channel* verbs_channel, ibv_cq** cq, void** cq_context) {
  auto* channel = to_channel(verbs_channel);
  for (;;) {
    if (!take_eventfd(channel->fd.get())) return -1;
    std::lock_guard lock(channel->mu);
    if (channel->events.empty() && channel->device_gone) {
      post_eventfd(channel->fd.get());  // stays readable for every waiter
      errno = EIO;
      return -1;
    }
    // Empty only if the CQ whose event this count announced was destroyed.
    if (channel->events.empty()) continue;
    *cq = channel->events.front();
    channel->events.pop_front();
    *cq_context = (*cq)->cq_context;
    return 0;
  }
}

void ibv_ack_cq_events(ibv_cq* cq, unsigned int nevents) {
  ::pthread_mutex_lock(&cq->mutex);
  cq->comp_events_completed += nevents;
  ::pthread_cond_signal(&cq->cond);
  ::pthread_mutex_unlock(&cq->mutex);
}

int ibv_get_async_event(ibv_context* context, ibv_async_event* event) {
  auto& ctx = *to_ctx(context);
  for (;;) {
    if (!take_eventfd(ctx.async_fd.get())) return -1;
    std::lock_guard lock(ctx.mu);
    if (ctx.async_events.empty()) continue;  // dropped by the bound on the queue
    *event = ctx.async_events.front();
    ctx.async_events.pop_front();
    return 0;
  }
}

void ibv_ack_async_event(ibv_async_event*) {}  // destroying an object never waits for acks here

// ---- vib's librdmacm ------------------------------------------------------------

int vib_ibv_call(ibv_context* context, const vibif_request* request, vibif_response* response) {
  auto& ctx = *to_ctx(context);
  PumpAfter pump(ctx);
  return or_errno([&] { return ctx.device->call_errno(*request, *response); });
}

void vib_ibv_set_cm_handler(ibv_context* context, vib_cm_handler handler, void* arg) {
  auto& ctx = *to_ctx(context);
  std::lock_guard lock(ctx.mu);
  ctx.cm_handler = handler;
  ctx.cm_handler_arg = arg;
}

// ---- sysfs, fork ------------------------------------------------------------------

const char* ibv_get_sysfs_path(void) { return "/sys"; }

int ibv_read_sysfs_file(const char* dir, const char* file, char* buf, size_t size) {
  std::string path = std::string(dir) + "/" + file;
  const vib::platform::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd || size == 0) return -1;
  const auto n = ::read(fd.get(), buf, size);
  if (n <= 0) return -1;
  auto len = static_cast<size_t>(n);
  if (len == size) --len;
  if (len > 0 && buf[len - 1] == '\n') --len;
  buf[len] = '\0';
  return static_cast<int>(len);
}

// Registration grants the application's own pages in place (pinned by the
// vibgrant module on real Xen), so after fork() the child writes copies, as
// the kernel gives it for pinned pages, and the parent's registrations are
// untouched: nothing to set up, on every platform vib registers memory on.
int ibv_fork_init(void) { return 0; }
ibv_fork_status ibv_is_fork_initialized(void) { return IBV_FORK_UNNEEDED; }
int ibv_dontfork_range(void*, size_t) { return 0; }
int ibv_dofork_range(void*, size_t) { return 0; }

}  // extern "C"
