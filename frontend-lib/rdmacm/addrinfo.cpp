// rdma_getaddrinfo over the C library's getaddrinfo: vibd needs IP
// addresses and ports, which is what it resolves (numeric or by name).
#include <netdb.h>
#include <rdma/rdma_cma.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

extern "C" {

int rdma_getaddrinfo(const char* node, const char* service, const rdma_addrinfo* hints, rdma_addrinfo** res) {
  if (!res || (!node && !service)) {
    errno = EINVAL;
    return -1;
  }
  addrinfo want{};
  want.ai_socktype = SOCK_STREAM;
  int flags = 0, port_space = RDMA_PS_TCP, qp_type = IBV_QPT_RC;
  if (hints) {
    flags = hints->ai_flags;
    if (hints->ai_port_space) port_space = hints->ai_port_space;
    if (hints->ai_qp_type) qp_type = hints->ai_qp_type;
    if (flags & RAI_FAMILY) want.ai_family = hints->ai_family;
  }
  if (port_space == RDMA_PS_UDP) qp_type = IBV_QPT_UD;
  if (flags & RAI_PASSIVE) want.ai_flags |= AI_PASSIVE;
  if (flags & RAI_NUMERICHOST) want.ai_flags |= AI_NUMERICHOST;
  addrinfo* found = nullptr;
  if (const int rc = ::getaddrinfo(node, service, &want, &found); rc != 0) {
    errno = rc == EAI_SYSTEM ? errno : ENOENT;
    return rc;
  }
  auto* out = static_cast<rdma_addrinfo*>(std::calloc(1, sizeof(rdma_addrinfo)));
  auto* addr = static_cast<sockaddr*>(std::calloc(1, found->ai_addrlen));
  if (!out || !addr) {
    std::free(out);
    std::free(addr);
    ::freeaddrinfo(found);
    errno = ENOMEM;
    return EAI_MEMORY;
  }
  std::memcpy(addr, found->ai_addr, found->ai_addrlen);
  out->ai_flags = flags;
  out->ai_family = found->ai_family;
  out->ai_qp_type = qp_type;
  out->ai_port_space = port_space;
  if (flags & RAI_PASSIVE) {
    out->ai_src_addr = addr;
    out->ai_src_len = found->ai_addrlen;
  } else {
    out->ai_dst_addr = addr;
    out->ai_dst_len = found->ai_addrlen;
    if (hints && hints->ai_src_addr && hints->ai_src_len) {
      out->ai_src_addr = static_cast<sockaddr*>(std::malloc(hints->ai_src_len));
      if (out->ai_src_addr) {
        std::memcpy(out->ai_src_addr, hints->ai_src_addr, hints->ai_src_len);
        out->ai_src_len = hints->ai_src_len;
      }
    }
  }
  ::freeaddrinfo(found);
  *res = out;
  return 0;
}

void rdma_freeaddrinfo(rdma_addrinfo* res) {
  while (res) {
    rdma_addrinfo* next = res->ai_next;
    std::free(res->ai_src_addr);
    std::free(res->ai_dst_addr);
    std::free(res->ai_src_canonname);
    std::free(res->ai_dst_canonname);
    std::free(res->ai_route);
    std::free(res->ai_connect);
    std::free(res);
    res = next;
  }
}

}  // extern "C"
