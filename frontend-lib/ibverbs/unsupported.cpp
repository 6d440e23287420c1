// Names of libibverbs' ABI that vib does not provide, defined so that the
// dynamic loader accepts this library in place of rdma-core's (libmlx5,
// libefa and librdmacm import them; perftest links those, BIND_NOW) and so
// that any call fails cleanly instead of crashing: EOPNOTSUPP, NULL, or
// nothing done.
//
// This file deliberately does not include <infiniband/verbs.h>: each name
// is defined with a parameter list of its own (none), which the x86-64 C
// calling convention makes safe to call with any arguments, and the return
// type of the real declaration (int, pointer, void, ...).
#include <cerrno>

// verbs_register_driver_34 is called by libmlx5's and libefa's constructors
// when they load; vib has no kernel devices for them to match, so there is
// nothing to register.

#define VIB_RETURNS_ERRNO(name) \
  int name() {                  \
    errno = EOPNOTSUPP;         \
    return EOPNOTSUPP;          \
  }
#define VIB_RETURNS_MINUS_ONE(name) \
  int name() {                      \
    errno = EOPNOTSUPP;             \
    return -1;                      \
  }
#define VIB_RETURNS_NULL(name) \
  void* name() {               \
    errno = EOPNOTSUPP;        \
    return nullptr;            \
  }
#define VIB_DOES_NOTHING(name) \
  void name() {}

extern "C" {

// Return an errno value (0 = success), as the real ones do.
VIB_RETURNS_ERRNO(ibv_attach_mcast)
VIB_RETURNS_ERRNO(ibv_detach_mcast)
VIB_RETURNS_ERRNO(ibv_resolve_eth_l2_from_gid)
VIB_RETURNS_ERRNO(ibv_query_ece)
VIB_RETURNS_ERRNO(ibv_set_ece)
VIB_RETURNS_ERRNO(execute_ioctl)
VIB_RETURNS_ERRNO(ibv_cmd_advise_mr)
VIB_RETURNS_ERRNO(ibv_cmd_alloc_dm)
VIB_RETURNS_ERRNO(ibv_cmd_alloc_mw)
VIB_RETURNS_ERRNO(ibv_cmd_alloc_pd)
VIB_RETURNS_ERRNO(ibv_cmd_attach_mcast)
VIB_RETURNS_ERRNO(ibv_cmd_close_xrcd)
VIB_RETURNS_ERRNO(ibv_cmd_create_ah)
VIB_RETURNS_ERRNO(ibv_cmd_create_counters)
VIB_RETURNS_ERRNO(ibv_cmd_create_cq)
VIB_RETURNS_ERRNO(ibv_cmd_create_cq_ex)
VIB_RETURNS_ERRNO(ibv_cmd_create_flow)
VIB_RETURNS_ERRNO(ibv_cmd_create_flow_action_esp)
VIB_RETURNS_ERRNO(ibv_cmd_create_qp)
VIB_RETURNS_ERRNO(ibv_cmd_create_qp_ex)
VIB_RETURNS_ERRNO(ibv_cmd_create_qp_ex2)
VIB_RETURNS_ERRNO(ibv_cmd_create_rwq_ind_table)
VIB_RETURNS_ERRNO(ibv_cmd_create_srq)
VIB_RETURNS_ERRNO(ibv_cmd_create_srq_ex)
VIB_RETURNS_ERRNO(ibv_cmd_create_wq)
VIB_RETURNS_ERRNO(ibv_cmd_dealloc_mw)
VIB_RETURNS_ERRNO(ibv_cmd_dealloc_pd)
VIB_RETURNS_ERRNO(ibv_cmd_dereg_mr)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_ah)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_counters)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_cq)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_flow)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_flow_action)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_qp)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_rwq_ind_table)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_srq)
VIB_RETURNS_ERRNO(ibv_cmd_destroy_wq)
VIB_RETURNS_ERRNO(ibv_cmd_detach_mcast)
VIB_RETURNS_ERRNO(ibv_cmd_free_dm)
VIB_RETURNS_ERRNO(ibv_cmd_get_context)
VIB_RETURNS_ERRNO(ibv_cmd_modify_cq)
VIB_RETURNS_ERRNO(ibv_cmd_modify_flow_action_esp)
VIB_RETURNS_ERRNO(ibv_cmd_modify_qp)
VIB_RETURNS_ERRNO(ibv_cmd_modify_qp_ex)
VIB_RETURNS_ERRNO(ibv_cmd_modify_srq)
VIB_RETURNS_ERRNO(ibv_cmd_modify_wq)
VIB_RETURNS_ERRNO(ibv_cmd_open_qp)
VIB_RETURNS_ERRNO(ibv_cmd_open_xrcd)
VIB_RETURNS_ERRNO(ibv_cmd_poll_cq)
VIB_RETURNS_ERRNO(ibv_cmd_post_recv)
VIB_RETURNS_ERRNO(ibv_cmd_post_send)
VIB_RETURNS_ERRNO(ibv_cmd_post_srq_recv)
VIB_RETURNS_ERRNO(ibv_cmd_query_context)
VIB_RETURNS_ERRNO(ibv_cmd_query_device_any)
VIB_RETURNS_ERRNO(ibv_cmd_query_mr)
VIB_RETURNS_ERRNO(ibv_cmd_query_port)
VIB_RETURNS_ERRNO(ibv_cmd_query_qp)
VIB_RETURNS_ERRNO(ibv_cmd_query_srq)
VIB_RETURNS_ERRNO(ibv_cmd_read_counters)
VIB_RETURNS_ERRNO(ibv_cmd_reg_dm_mr)
VIB_RETURNS_ERRNO(ibv_cmd_reg_dmabuf_mr)
VIB_RETURNS_ERRNO(ibv_cmd_reg_mr)
VIB_RETURNS_ERRNO(ibv_cmd_req_notify_cq)
VIB_RETURNS_ERRNO(ibv_cmd_rereg_mr)
VIB_RETURNS_ERRNO(ibv_cmd_resize_cq)

// Return -1 with errno set.
VIB_RETURNS_MINUS_ONE(ibv_rereg_mr)
VIB_RETURNS_MINUS_ONE(ibv_read_ibdev_sysfs_file)

// Return an object: none.
VIB_RETURNS_NULL(ibv_import_device)
VIB_RETURNS_NULL(ibv_import_mr)
VIB_RETURNS_NULL(ibv_import_pd)
VIB_RETURNS_NULL(ibv_import_dm)
VIB_RETURNS_NULL(ibv_reg_dmabuf_mr)
VIB_RETURNS_NULL(_verbs_init_and_alloc_context)
VIB_RETURNS_NULL(verbs_open_device)

// Copy helpers for kernel structs, logging and provider plumbing: no-ops.
VIB_DOES_NOTHING(ibv_copy_path_rec_from_kern)
VIB_DOES_NOTHING(ibv_copy_path_rec_to_kern)
VIB_DOES_NOTHING(ibv_copy_qp_attr_from_kern)
VIB_DOES_NOTHING(ibv_copy_ah_attr_from_kern)
VIB_DOES_NOTHING(ibv_unimport_mr)
VIB_DOES_NOTHING(ibv_unimport_pd)
VIB_DOES_NOTHING(ibv_unimport_dm)
VIB_DOES_NOTHING(__verbs_log)
VIB_DOES_NOTHING(verbs_init_cq)
VIB_DOES_NOTHING(verbs_set_ops)
VIB_DOES_NOTHING(verbs_uninit_context)
VIB_DOES_NOTHING(verbs_register_driver_34)

unsigned int __ioctl_final_num_attrs() { return 0; }
bool verbs_allow_disassociate_destroy() { return false; }

}  // extern "C"
