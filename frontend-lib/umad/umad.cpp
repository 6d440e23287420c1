// libibumad.so.3 over vib: what diagnostics such as ibstat ask of CAs and
// ports, answered from verbs (vib's libibverbs), since a guest has no
// kernel CA in sysfs. MADs themselves are not offered: guests get no QP0 or
// QP1, so opening a port, sending and receiving fail with ENOSYS. The pure
// helpers on a caller's MAD buffer work as rdma-core's do.
#include <infiniband/umad.h>
#include <infiniband/verbs.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct DeviceList {
  ibv_device** list = nullptr;
  int count = 0;
  DeviceList() { list = ibv_get_device_list(&count); }
  ~DeviceList() {
    if (list) ibv_free_device_list(list);
  }
  ibv_device* find(const char* name) const {
    for (int i = 0; list && i < count; ++i)
      if (!name || std::strcmp(ibv_get_device_name(list[i]), name) == 0) return list[i];
    return nullptr;
  }
};

struct Context {
  ibv_context* verbs = nullptr;
  explicit Context(ibv_device* device) : verbs(device ? ibv_open_device(device) : nullptr) {}
  ~Context() {
    if (verbs) ibv_close_device(verbs);
  }
};

// ibstat's "Rate": lanes times the lane speed, in Gb/s.
unsigned rate_of(const ibv_port_attr& a) {
  const unsigned lanes = a.active_width == 1 ? 1 : a.active_width == 2 ? 4 : a.active_width == 4 ? 8 : 12;
  unsigned lane = 0;
  switch (a.active_speed) {
    case 1: lane = 25; break;      // SDR 2.5
    case 2: lane = 50; break;      // DDR 5
    case 4: case 8: lane = 100; break;  // QDR, FDR10
    case 16: lane = 140; break;    // FDR 14
    case 32: lane = 250; break;    // EDR 25
    case 64: lane = 500; break;    // HDR 50
    case 128: lane = 1000; break;  // NDR 100
    default: lane = 0;
  }
  return lanes * lane / 10;
}

int fill_port(ibv_context* verbs, const char* ca_name, int portnum, umad_port_t* port) {
  ibv_port_attr a{};
  if (ibv_query_port(verbs, static_cast<std::uint8_t>(portnum), &a)) return -errno;
  *port = umad_port_t{};
  std::snprintf(port->ca_name, sizeof(port->ca_name), "%s", ca_name);
  port->portnum = portnum;
  port->base_lid = a.lid;
  port->lmc = a.lmc;
  port->sm_lid = a.sm_lid;
  port->sm_sl = a.sm_sl;
  port->state = a.state;
  port->phys_state = a.phys_state;
  port->rate = rate_of(a);
  port->capmask = htobe32(a.port_cap_flags);
  ibv_gid gid{};
  if (a.gid_tbl_len > 0 && ibv_query_gid(verbs, static_cast<std::uint8_t>(portnum), 0, &gid) == 0) {
    port->gid_prefix = gid.global.subnet_prefix;
    port->port_guid = gid.global.interface_id;
  }
  port->pkeys_size = a.pkey_tbl_len;
  port->pkeys = static_cast<std::uint16_t*>(std::calloc(std::max<unsigned>(a.pkey_tbl_len, 1), sizeof(std::uint16_t)));
  if (!port->pkeys) return -ENOMEM;
  for (unsigned i = 0; i < a.pkey_tbl_len; ++i) {
    __be16 pkey = 0;
    if (ibv_query_pkey(verbs, static_cast<std::uint8_t>(portnum), static_cast<int>(i), &pkey) == 0)
      port->pkeys[i] = be16toh(pkey);
  }
  std::snprintf(port->link_layer, sizeof(port->link_layer), "%s",
                a.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "InfiniBand");
  return 0;
}

}  // namespace

extern "C" {

int umad_init(void) { return 0; }
int umad_done(void) { return 0; }
int umad_debug(int level) { return level; }

int umad_get_cas_names(char cas[][UMAD_CA_NAME_LEN], int max) {
  DeviceList devices;
  int n = 0;
  for (int i = 0; i < devices.count && n < max; ++i)
    std::snprintf(cas[n++], UMAD_CA_NAME_LEN, "%s", ibv_get_device_name(devices.list[i]));
  return n;
}

umad_device_node* umad_get_ca_device_list(void) {
  DeviceList devices;
  umad_device_node* head = nullptr;
  for (int i = devices.count - 1; i >= 0; --i) {
    auto* node = static_cast<umad_device_node*>(std::calloc(1, sizeof(umad_device_node)));
    char* name = strdup(ibv_get_device_name(devices.list[i]));
    if (!node || !name) {
      std::free(node);
      std::free(name);
      umad_free_ca_device_list(head);
      errno = ENOMEM;
      return nullptr;
    }
    node->ca_name = name;
    node->next = head;
    head = node;
  }
  return head;
}

void umad_free_ca_device_list(umad_device_node* head) {
  while (head) {
    umad_device_node* next = head->next;
    std::free(const_cast<char*>(head->ca_name));
    std::free(head);
    head = next;
  }
}

int umad_sort_ca_device_list(umad_device_node** head, size_t) {
  std::vector<umad_device_node*> nodes;
  for (umad_device_node* n = *head; n; n = n->next) nodes.push_back(n);
  std::sort(nodes.begin(), nodes.end(),
            [](const umad_device_node* a, const umad_device_node* b) { return std::strcmp(a->ca_name, b->ca_name) < 0; });
  for (std::size_t i = 0; i < nodes.size(); ++i) nodes[i]->next = i + 1 < nodes.size() ? nodes[i + 1] : nullptr;
  *head = nodes.empty() ? nullptr : nodes.front();
  return 0;
}

int umad_get_ca(const char* ca_name, umad_ca_t* ca) {
  DeviceList devices;
  ibv_device* device = devices.find(ca_name);
  if (!device) return -ENODEV;
  Context ctx(device);
  if (!ctx.verbs) return -errno;
  ibv_device_attr a{};
  if (ibv_query_device(ctx.verbs, &a)) return -errno;
  *ca = umad_ca_t{};
  std::snprintf(ca->ca_name, sizeof(ca->ca_name), "%s", ibv_get_device_name(device));
  ca->node_type = IBV_NODE_CA;
  ca->numports = a.phys_port_cnt;
  std::snprintf(ca->fw_ver, sizeof(ca->fw_ver), "%.*s", static_cast<int>(sizeof(ca->fw_ver) - 1), a.fw_ver);
  std::snprintf(ca->ca_type, sizeof(ca->ca_type), "vib (virtual InfiniBand)");
  std::snprintf(ca->hw_ver, sizeof(ca->hw_ver), "0x%x", a.hw_ver);
  ca->node_guid = a.node_guid;
  ca->system_guid = a.sys_image_guid;
  for (int p = 1; p <= a.phys_port_cnt && p < UMAD_CA_MAX_PORTS; ++p) {
    auto* port = static_cast<umad_port_t*>(std::calloc(1, sizeof(umad_port_t)));
    if (!port) return -ENOMEM;
    if (int err = fill_port(ctx.verbs, ca->ca_name, p, port)) {
      std::free(port);
      return err;
    }
    ca->ports[p] = port;
  }
  return 0;
}

int umad_release_port(umad_port_t* port) {
  std::free(port->pkeys);
  port->pkeys = nullptr;
  return 0;
}

int umad_release_ca(umad_ca_t* ca) {
  for (auto*& port : ca->ports) {
    if (!port) continue;
    umad_release_port(port);
    std::free(port);
    port = nullptr;
  }
  return 0;
}

int umad_get_port(const char* ca_name, int portnum, umad_port_t* port) {
  DeviceList devices;
  ibv_device* device = devices.find(ca_name);
  if (!device) return -ENODEV;
  Context ctx(device);
  if (!ctx.verbs) return -errno;
  return fill_port(ctx.verbs, ibv_get_device_name(device), portnum ? portnum : 1, port);
}

int umad_get_ca_portguids(const char* ca_name, __be64* portguids, int max) {
  umad_ca_t ca;
  if (int err = umad_get_ca(ca_name, &ca)) return err;
  if (ca.numports + 1 > max) {
    umad_release_ca(&ca);
    return -ENOMEM;
  }
  portguids[0] = 0;  // index 0: no port (rdma-core's layout)
  for (int p = 1; p <= ca.numports; ++p) portguids[p] = ca.ports[p] ? ca.ports[p]->port_guid : 0;
  umad_release_ca(&ca);
  return ca.numports + 1;
}

// ---- MADs: no QP0/QP1 for guests ------------------------------------------

int umad_get_issm_path(const char*, int, char[], int) { return -ENOSYS; }
int umad_open_port(const char*, int) { return -ENOSYS; }
int umad_close_port(int) { return -ENOSYS; }
int umad_send(int, int, void*, int, int, int) { return -ENOSYS; }
int umad_recv(int, void*, int*, int) { return -ENOSYS; }
int umad_poll(int, int) { return -ENOSYS; }
int umad_get_fd(int) { return -ENOSYS; }
int umad_register(int, int, int, uint8_t, long[]) { return -ENOSYS; }
int umad_register2(int, umad_reg_attr*, uint32_t*) { return -ENOSYS; }
int umad_register_oui(int, int, uint8_t, uint8_t*, long[]) { return -ENOSYS; }
int umad_unregister(int, int) { return -ENOSYS; }

// ---- helpers on the caller's buffer --------------------------------------------

size_t umad_size(void) { return sizeof(ib_user_mad_t); }
void* umad_get_mad(void* umad) { return static_cast<ib_user_mad_t*>(umad)->data; }
int umad_status(void* umad) { return static_cast<int>(static_cast<ib_user_mad_t*>(umad)->status); }
ib_mad_addr_t* umad_get_mad_addr(void* umad) { return &static_cast<ib_user_mad_t*>(umad)->addr; }

int umad_set_grh(void* umad, void* mad_addr) {
  auto& addr = static_cast<ib_user_mad_t*>(umad)->addr;
  if (!mad_addr) {
    addr.grh_present = 0;
    return 0;
  }
  const auto* from = static_cast<const ib_mad_addr_t*>(mad_addr);
  addr.grh_present = 1;
  std::memcpy(addr.gid, from->gid, sizeof(addr.gid));
  addr.flow_label = from->flow_label;
  addr.hop_limit = from->hop_limit;
  addr.traffic_class = from->traffic_class;
  return 0;
}

int umad_set_pkey(void* umad, int pkey_index) {
  static_cast<ib_user_mad_t*>(umad)->addr.pkey_index = static_cast<std::uint16_t>(pkey_index);
  return 0;
}

int umad_get_pkey(void* umad) { return static_cast<ib_user_mad_t*>(umad)->addr.pkey_index; }

int umad_set_addr(void* umad, int dlid, int dqp, int sl, int qkey) {
  auto& addr = static_cast<ib_user_mad_t*>(umad)->addr;
  addr.qpn = htobe32(static_cast<std::uint32_t>(dqp));
  addr.lid = htobe16(static_cast<std::uint16_t>(dlid));
  addr.qkey = htobe32(static_cast<std::uint32_t>(qkey));
  addr.sl = static_cast<std::uint8_t>(sl);
  return 0;
}

int umad_set_addr_net(void* umad, __be16 dlid, __be32 dqp, int sl, __be32 qkey) {
  auto& addr = static_cast<ib_user_mad_t*>(umad)->addr;
  addr.qpn = dqp;
  addr.lid = dlid;
  addr.qkey = qkey;
  addr.sl = static_cast<std::uint8_t>(sl);
  return 0;
}

void umad_addr_dump(ib_mad_addr_t*) {}
void umad_dump(void*) {}

const char* umad_class_str(uint8_t) { return "<unknown>"; }
const char* umad_method_str(uint8_t, uint8_t) { return "<unknown>"; }
const char* umad_common_mad_status_str(__be16) { return "<unknown>"; }
const char* umad_sa_mad_status_str(__be16) { return "<unknown>"; }
const char* umad_attribute_str(uint8_t, __be16) { return "<unknown>"; }

}  // extern "C"
