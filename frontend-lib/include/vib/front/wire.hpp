// The plain copies between rdma-core's structs and the vibif wire structs,
// shared by libvibfront and vib's librdmacm (policy — ports, GID indices,
// P_Keys — is the back-end's, on top of these).
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <cstring>

#include "vib/vibif.h"

namespace vib::front {

inline vibif_qp_cap to_wire(const ibv_qp_cap& c) {
  return vibif_qp_cap{c.max_send_wr, c.max_recv_wr, c.max_send_sge, c.max_recv_sge, c.max_inline_data};
}
inline ibv_qp_cap from_wire(const vibif_qp_cap& c) {
  return ibv_qp_cap{c.max_send_wr, c.max_recv_wr, c.max_send_sge, c.max_recv_sge, c.max_inline_data};
}

inline void to_wire(const ibv_ah_attr& in, vibif_ah_attr& out) {
  out = vibif_ah_attr{};
  std::memcpy(out.dgid, in.grh.dgid.raw, sizeof(out.dgid));
  out.flow_label = in.grh.flow_label;
  out.sgid_index = in.grh.sgid_index;
  out.hop_limit = in.grh.hop_limit;
  out.traffic_class = in.grh.traffic_class;
  out.is_global = in.is_global;
  out.dlid = in.dlid;
  out.sl = in.sl;
  out.src_path_bits = in.src_path_bits;
  out.static_rate = in.static_rate;
  out.port_num = in.port_num;
}

inline void from_wire(const vibif_ah_attr& in, ibv_ah_attr& out) {
  out = ibv_ah_attr{};
  std::memcpy(out.grh.dgid.raw, in.dgid, sizeof(in.dgid));
  out.grh.flow_label = in.flow_label;
  out.grh.sgid_index = in.sgid_index;
  out.grh.hop_limit = in.hop_limit;
  out.grh.traffic_class = in.traffic_class;
  out.is_global = in.is_global;
  out.dlid = in.dlid;
  out.sl = in.sl;
  out.src_path_bits = in.src_path_bits;
  out.static_rate = in.static_rate;
  out.port_num = in.port_num;
}

inline void to_wire(const ibv_qp_attr& a, vibif_qp_attr& w) {
  w = vibif_qp_attr{};
  w.qp_state = a.qp_state;
  w.cur_qp_state = a.cur_qp_state;
  w.path_mtu = a.path_mtu;
  w.path_mig_state = a.path_mig_state;
  w.qkey = a.qkey;
  w.rq_psn = a.rq_psn;
  w.sq_psn = a.sq_psn;
  w.dest_qp_num = a.dest_qp_num;
  w.qp_access_flags = static_cast<std::uint32_t>(a.qp_access_flags);
  w.cap = to_wire(a.cap);
  to_wire(a.ah_attr, w.ah_attr);
  to_wire(a.alt_ah_attr, w.alt_ah_attr);
  w.pkey_index = a.pkey_index;
  w.alt_pkey_index = a.alt_pkey_index;
  w.en_sqd_async_notify = a.en_sqd_async_notify;
  w.sq_draining = a.sq_draining;
  w.max_rd_atomic = a.max_rd_atomic;
  w.max_dest_rd_atomic = a.max_dest_rd_atomic;
  w.min_rnr_timer = a.min_rnr_timer;
  w.port_num = a.port_num;
  w.timeout = a.timeout;
  w.retry_cnt = a.retry_cnt;
  w.rnr_retry = a.rnr_retry;
  w.alt_port_num = a.alt_port_num;
  w.alt_timeout = a.alt_timeout;
  w.rate_limit = a.rate_limit;
}

inline void from_wire(const vibif_qp_attr& w, ibv_qp_attr& a) {
  a = ibv_qp_attr{};
  a.qp_state = static_cast<ibv_qp_state>(w.qp_state);
  a.cur_qp_state = static_cast<ibv_qp_state>(w.cur_qp_state);
  a.path_mtu = static_cast<ibv_mtu>(w.path_mtu);
  a.path_mig_state = static_cast<ibv_mig_state>(w.path_mig_state);
  a.qkey = w.qkey;
  a.rq_psn = w.rq_psn;
  a.sq_psn = w.sq_psn;
  a.dest_qp_num = w.dest_qp_num;
  a.qp_access_flags = static_cast<int>(w.qp_access_flags);
  a.cap = from_wire(w.cap);
  from_wire(w.ah_attr, a.ah_attr);
  a.pkey_index = w.pkey_index;
  a.en_sqd_async_notify = w.en_sqd_async_notify;
  a.sq_draining = w.sq_draining;
  a.max_rd_atomic = w.max_rd_atomic;
  a.max_dest_rd_atomic = w.max_dest_rd_atomic;
  a.min_rnr_timer = w.min_rnr_timer;
  a.port_num = w.port_num;
  a.timeout = w.timeout;
  a.retry_cnt = w.retry_cnt;
  a.rnr_retry = w.rnr_retry;
}

}  // namespace vib::front
