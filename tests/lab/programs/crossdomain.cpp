// Lab scenario (c): vib's real platform implementations across two domains.
// The guest grants dom0 a page and allocates an event channel; dom0 maps the
// page, answers in it, binds the channel and notifies; each side watches
// the other's xenstore nodes. Exits 0 when every step checked out.
//
//   vib-lab-crossdomain guest
//   vib-lab-crossdomain dom0 GUEST_DOMID
#include <poll.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <string>

#include "vib/platform/event_channels.hpp"
#include "vib/platform/grants.hpp"
#include "vib/platform/xenbus.hpp"
#include "vib/platform/xenstore.hpp"

using namespace vib::platform;

namespace {

constexpr int kTimeoutMs = 60000;

[[noreturn]] void fail(const std::string& what) {
  std::cerr << "crossdomain: FAIL: " << what << std::endl;
  std::exit(1);
}

// Waits, through a watch, until `path` exists; returns its value.
std::string await_node(XenStore& xs, const std::string& path) {
  return *wait_for_node(xs, path, [](const std::optional<std::string>& v) { return v.has_value(); },
                        std::chrono::milliseconds(kTimeoutMs));
}

EventPort await_event(EventChannels& ev) {
  pollfd p{ev.fd(), POLLIN, 0};
  if (::poll(&p, 1, kTimeoutMs) != 1) fail("no event-channel notification");
  auto port = ev.pending();
  if (!port) fail("event fd readable but nothing pending");
  ev.unmask(*port);
  return *port;
}

int guest() {
  auto xs = open_xenstore(XenTarget::real());
  auto ev = open_event_channels(XenTarget::real());
  const EventPort port = ev->bind_unbound(kDom0);
  auto share = open_grant_sharer(XenTarget::real())->share(kDom0, 1, true);
  std::strcpy(reinterpret_cast<char*>(share->bytes().data()), "hello from the guest");
  with_transaction(*xs, [&](TransactionId tx) {
    xs->write(tx, "data/vib-lab/xd/ref", std::to_string(share->refs()[0]));
    xs->write(tx, "data/vib-lab/xd/port", std::to_string(port));
  });
  std::cout << "guest: granted ref " << share->refs()[0] << ", port " << port << std::endl;
  if (await_event(*ev) != port) fail("event on the wrong port");
  if (std::strcmp(reinterpret_cast<const char*>(share->bytes().data()), "hello from dom0") != 0)
    fail("dom0's answer is not in the shared page");
  if (await_node(*xs, "data/vib-lab/xd/ack") != "mapped") fail("dom0's ack");
  ev->notify(port);
  xs->write(kNoTransaction, "data/vib-lab/xd/guest-done", "1");
  std::cout << "guest: page, event and watch all crossed" << std::endl;
  return 0;
}

int dom0(DomId guest_domid) {
  auto xs = open_xenstore(XenTarget::real());
  const std::string area = xs->domain_path(guest_domid) + "/data/vib-lab/xd";
  const auto port_text = await_node(*xs, area + "/port");
  const auto ref_text = await_node(*xs, area + "/ref");
  const auto ref = parse_decimal(ref_text, 0xffffffffu);
  const auto guest_port = parse_decimal(port_text, 0xffffffffu);
  if (!ref || !guest_port) fail("bad ref/port from the guest");
  const GrantRef refs[] = {static_cast<GrantRef>(*ref)};
  auto mapping = open_grant_mapper(XenTarget::real())->map(guest_domid, refs, true);
  const char* page = reinterpret_cast<const char*>(mapping->bytes().data());
  if (std::strcmp(page, "hello from the guest") != 0) fail(std::string("page holds '") + page + "'");
  std::strcpy(reinterpret_cast<char*>(mapping->bytes().data()), "hello from dom0");
  xs->write(kNoTransaction, area + "/ack", "mapped");
  auto ev = open_event_channels(XenTarget::real());
  const EventPort port = ev->bind_interdomain(guest_domid, static_cast<EventPort>(*guest_port));
  if (ev->peer_closed(port) != std::optional<bool>(false)) fail("dom0 cannot see the port's peer as connected");
  ev->notify(port);
  if (await_event(*ev) != port) fail("no answer from the guest");
  if (await_node(*xs, area + "/guest-done") != "1") fail("guest-done");
  std::cout << "dom0: mapped guest ref " << *ref << ", bound port " << port << ", notified both ways" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "guest") return guest();
    if (argc == 3 && std::string(argv[1]) == "dom0") {
      auto id = parse_decimal(argv[2], 0x7FEF);
      if (!id) fail("bad guest domid");
      return dom0(static_cast<DomId>(*id));
    }
    std::cerr << "usage: vib-lab-crossdomain guest | dom0 GUEST_DOMID\n";
    return 2;
  } catch (const std::exception& e) {
    fail(e.what());
  }
}
