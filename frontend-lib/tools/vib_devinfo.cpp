// vib-devinfo: what a guest sees of its vib device, like ibv_devinfo, talking
// to the back-end over the vib protocol.
#include <cstring>
#include <iomanip>
#include <iostream>

#include "vib/front/channel.hpp"

namespace {

void usage(std::ostream& out) {
  out << "Usage: vib-devinfo [--devid N] [--local-xen DIR --domid N]\n"
         "Prints the vib device's attributes as the guest sees them, then\n"
         "allocates and frees a protection domain to prove the control path.\n";
}

int check(const vibif_response& rsp, const char* what) {
  if (rsp.hdr.status != VIBIF_OK) {
    std::cerr << "vib-devinfo: " << what << " failed: " << std::strerror(-rsp.hdr.status) << "\n";
    return 1;
  }
  return 0;
}

vibif_request request(std::uint16_t op) {
  vibif_request req;
  std::memset(&req, 0, sizeof(req));
  req.hdr.op = op;
  return req;
}

}  // namespace

int main(int argc, char** argv) {
  vib::front::ChannelOptions options;
  std::string local_dir;
  long domid = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help") {
      usage(std::cout);
      return 0;
    }
    if (i + 1 >= argc) {
      usage(std::cerr);
      return 2;
    }
    const std::string v = argv[++i];
    if (arg == "--devid") options.devid = static_cast<unsigned>(std::stoul(v));
    else if (arg == "--local-xen") local_dir = v;
    else if (arg == "--domid") domid = std::stol(v);
    else {
      usage(std::cerr);
      return 2;
    }
  }
  if (!local_dir.empty()) {
    if (domid < 1) {
      std::cerr << "vib-devinfo: --local-xen needs --domid of the guest to act as\n";
      return 2;
    }
    options.xen = vib::platform::XenTarget::local(local_dir, static_cast<vib::platform::DomId>(domid));
  }
  try {
    auto channel = vib::front::Channel::open(options);
    std::cout << "vib" << options.devid << ": context " << channel->context_id() << " connected to back-end domain "
              << channel->backend_domid() << "\n";
    auto dev = channel->call(request(VIBIF_OP_QUERY_DEVICE));
    if (check(dev, "query device")) return 1;
    const auto& d = dev.u.query_device;
    std::cout << "  fw_ver:        " << d.fw_ver << "\n"
              << "  node_guid:     " << std::hex << std::setw(16) << std::setfill('0') << be64toh(d.node_guid) << std::dec << "\n"
              << "  max_qp:        " << d.max_qp << "\n"
              << "  max_cq:        " << d.max_cq << "\n"
              << "  max_mr:        " << d.max_mr << "\n"
              << "  max_pd:        " << d.max_pd << "\n"
              << "  max_mr_size:   " << d.max_mr_size << "\n"
              << "  phys_port_cnt: " << unsigned(d.phys_port_cnt) << "\n";
    // Every registered page is one grant of this guest's table: how close
    // registrations are to its end (docs/frontend.md).
    if (const auto use = channel->sharer().table_use())
      std::cout << "  grant table:   " << use->size << " entries (max_grant_frames=" << use->size / 512 << "), "
                << use->held_by_vib << " held by vib\n";
    else
      std::cout << "  grant table:   size unknown (no vibgrant module)\n";
    auto port_req = request(VIBIF_OP_QUERY_PORT);
    port_req.u.query_port.port = 1;
    auto port = channel->call(port_req);
    if (check(port, "query port")) return 1;
    const auto& p = port.u.query_port;
    std::cout << "  port 1: state " << (p.state == 4 ? "PORT_ACTIVE" : std::to_string(p.state)) << ", lid " << p.lid
              << ", active_mtu " << (128 << p.active_mtu) << ", pkeys " << p.pkey_tbl_len << ", gids "
              << p.gid_tbl_len << "\n";
    auto pkey_req = request(VIBIF_OP_QUERY_PKEY);
    pkey_req.u.query_pkey.port = 1;
    auto pkey = channel->call(pkey_req);
    if (check(pkey, "query pkey")) return 1;
    std::cout << "  pkey[0]: 0x" << std::hex << pkey.u.query_pkey.pkey << std::dec << "\n";
    auto pd = channel->call(request(VIBIF_OP_ALLOC_PD));
    if (check(pd, "alloc pd")) return 1;
    std::cout << "  allocated PD handle 0x" << std::hex << pd.u.handle.handle << std::dec << "\n";
    auto dealloc = request(VIBIF_OP_DEALLOC_PD);
    dealloc.u.handle.handle = pd.u.handle.handle;
    if (check(channel->call(dealloc), "dealloc pd")) return 1;
    std::cout << "  freed it\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "vib-devinfo: " << e.what() << "\n";
    return 1;
  }
}
