// The attributes that take an RC QP from RESET to RTS towards its peer:
// INIT, RTR, RTS, each with its ibv_modify_qp mask. One recipe for every QP
// kind the tests drive (libvibfront, the platform HCA, libibverbs itself);
// callers apply the steps with their own modify call.
#pragma once

#include <infiniband/verbs.h>

#include <array>
#include <cstdint>

namespace vib::test {

struct QpTransition {
  ibv_qp_attr attr{};
  int mask = 0;
};

inline std::array<QpTransition, 3> rc_connect_steps(std::uint16_t peer_lid, std::uint32_t peer_qpn, int access,
                                                    ibv_mtu mtu = IBV_MTU_1024, std::uint8_t min_rnr_timer = 12) {
  std::array<QpTransition, 3> steps{};
  auto& init = steps[0];
  init.attr.qp_state = IBV_QPS_INIT;
  init.attr.pkey_index = 0;
  init.attr.port_num = 1;
  init.attr.qp_access_flags = access;
  init.mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
  auto& rtr = steps[1];
  rtr.attr.qp_state = IBV_QPS_RTR;
  rtr.attr.path_mtu = mtu;
  rtr.attr.dest_qp_num = peer_qpn;
  rtr.attr.rq_psn = 0;
  rtr.attr.max_dest_rd_atomic = 1;
  rtr.attr.min_rnr_timer = min_rnr_timer;
  rtr.attr.ah_attr.dlid = peer_lid;
  rtr.attr.ah_attr.port_num = 1;
  rtr.mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
             IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
  auto& rts = steps[2];
  rts.attr.qp_state = IBV_QPS_RTS;
  rts.attr.timeout = 14;
  rts.attr.retry_cnt = 7;
  rts.attr.rnr_retry = 7;  // wait for receives rather than fail
  rts.attr.sq_psn = 0;
  rts.attr.max_rd_atomic = 1;
  rts.mask = IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
             IBV_QP_MAX_QP_RD_ATOMIC;
  return steps;
}

}  // namespace vib::test
