/* SPDX-License-Identifier: MIT */
/******************************************************************************
 * vibif.h
 *
 * The vib ("virtual InfiniBand") split-device protocol: RDMA verbs for Xen
 * guests, served by a back-end in dom0 (or a driver domain) on the host's HCA.
 *
 * Both ends are user space: the back-end is vibd, the front-end is a library
 * in the guest process. Privileged, rare operations travel over a request
 * ring; the data path (post send/recv, poll CQ, arm CQ) goes through shared
 * queues and a doorbell page without a round trip; data moves by DMA straight
 * to and from guest pages the guest granted and the back-end registered.
 *
 * Everything here is fixed-size and little-endian (the byte order of every
 * architecture Xen runs guests on). Numeric values of verbs enumerations
 * (access flags, QP states and types, WC status and opcodes, MTUs, attribute
 * masks) are rdma-core's <infiniband/verbs.h> values, so both ends pass them
 * through unchanged; VIBIF_* names are given for the ones the protocol itself
 * checks.
 *
 * Compiles as C11 and C++. Include <xen/io/ring.h>'s prerequisites (stdint)
 * only; this header brings its own memory barriers for ring.h unless the
 * includer already defined xen_mb/xen_rmb/xen_wmb.
 */

#ifndef __VIB_VIBIF_H__
#define __VIB_VIBIF_H__

#include <stddef.h>
#include <stdint.h>

#ifndef __XEN_INTERFACE_VERSION__
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#endif
#ifndef xen_mb
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif
#include <xen/io/ring.h>

#ifdef __cplusplus
#define VIBIF_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define VIBIF_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/*
 * Protocol version. The back-end lists the versions it speaks in
 * "protocol-versions" (comma-separated); the front-end writes the one it
 * chose to "protocol-version" before it leaves Initialising.
 */
#define VIBIF_PROTOCOL_VERSION 2  /* 2: the process shares the doorbell page */

/******************************************************************************
 * XENSTORE LAYOUT
 *
 * Like vif and vbd. For device <devid> of guest <domid>, back-end in <be>:
 *
 *   /local/domain/<be>/backend/vib/<domid>/<devid>/   written by the toolstack
 *     frontend        "/local/domain/<domid>/device/vib/<devid>"
 *     frontend-id     "<domid>"
 *     online          "1"; "0" asks the back-end to close the device
 *     state           XenbusState, written by the back-end
 *     handle          "<devid>"
 *     hotplug-status  "connected" | "error", written by the hotplug script
 *     script          hotplug script (optional)
 *     hca             HCA name ("mlx5_0", "rxe0") or "soft" (built-in software HCA)
 *     port            HCA port number, "1" by default
 *     pkeys           allowed P_Key values, "0xffff,0x8001" (default "0xffff")
 *     gid-indices     allowed GID table indices, "0,1" (default "0")
 *     max-pds max-cqs max-qps max-srqs max-mrs max-ahs   object quotas (of the
 *                     device: all its contexts together)
 *     max-pinned-pages                                   registration quota (pages)
 *     ip              the guest's addresses for RDMA-CM, "192.0.2.5 2001:db8::5"
 *                     (default: its vifs' "ip" nodes; see CONNECTION MANAGEMENT)
 *   written by the back-end when it reaches InitWait:
 *     protocol-versions       "2"
 *     max-ring-page-order     largest ring-page-order it accepts
 *     max-contexts            how many contexts the device may open at once
 *     feature-indirect-grants "1": page lists may be indirect
 *     feature-srq             "1"
 *     feature-atomics         "1"
 *     feature-rdma-cm         "1": the CM_* operations (CONNECTION MANAGEMENT)
 *     feature-completion-retires "1": CQEs say which queue slots they free
 *                             (see "Queue accounting"); absent: a slot is
 *                             free once the back-end consumed its WQE
 *     error                   readable text when the device failed
 *
 *   /local/domain/<domid>/device/vib/<devid>/         guest-writable
 *     backend           "/local/domain/<be>/backend/vib/<domid>/<devid>"
 *     backend-id        "<be>"
 *     state             XenbusState, written by the front-end
 *     handle            "<devid>"
 *     protocol-version  the version the front-end chose
 *
 * PER-PROCESS CONTEXTS
 *
 * Every guest process that opens the device gets its own channel: its own
 * request ring, event channel, doorbell page and verbs objects, so processes
 * are isolated and a crashed one is cleaned up alone (libxenvchan uses the
 * same idea). A context <ctxid> is a decimal number the process picks (its
 * pid is a good choice), below VIBIF_MAX_CTXID, unique among live contexts:
 *
 *   /local/domain/<domid>/device/vib/<devid>/ctx/<ctxid>/
 *     ring-page-order  log2 of the number of ring pages (0..max-ring-page-order)
 *     ring-ref         grant ref of the ring (order 0), or
 *     ring-ref0..N     grant refs of each ring page (order > 0)
 *     event-channel    port the front-end allocated for the back-end
 *     doorbell-ref     grant ref of the doorbell page (granted by the process)
 *     state            XenbusState of this context
 *   /local/domain/<be>/backend/vib/<domid>/<devid>/ctx/<ctxid>/
 *     state            XenbusState of this context, written by the back-end
 *     error            readable text if the context failed
 *
 * Device handshake (per device, like netif):
 *   back-end  Initialising -> InitWait (features published)
 *   front-end Initialising -> Connected (protocol-version written; any
 *             process may do it, it is idempotent)
 *   back-end  InitWait -> Connected
 *   Either end Closing -> Closed; the back-end also closes on online=0 and
 *   when the front-end directory disappears.
 *
 * Context handshake:
 *   front-end claims ctx/<ctxid>: writes state=Initialising in the
 *             transaction that found no state there (the back-end ignores
 *             an Initialising context)
 *   front-end writes ring-ref*, ring-page-order, event-channel, doorbell-ref,
 *             then state=Initialised (one transaction)
 *   back-end  maps the ring and the doorbell page, binds the port, writes
 *             state=Connected
 *   front-end writes state=Connected
 *   Every page is the guest's and only the back-end maps: a guest holding a
 *   mapping of dom0's memory could not be saved, restored or migrated.
 *   Close: the front-end writes state=Closing (or its process dies: the ring
 *   page is shared with an unmap notification on the event channel, and the
 *   port's peer closes); the back-end frees every object of the context,
 *   writes Closed and removes its ctx node; the front-end then removes its.
 */
#define VIBIF_XS_DEVICE_TYPE        "vib"
#define VIBIF_XS_HCA                "hca"
#define VIBIF_XS_PORT               "port"
#define VIBIF_XS_PKEYS              "pkeys"
#define VIBIF_XS_GID_INDICES        "gid-indices"
#define VIBIF_XS_MAX_PDS            "max-pds"
#define VIBIF_XS_MAX_CQS            "max-cqs"
#define VIBIF_XS_MAX_QPS            "max-qps"
#define VIBIF_XS_MAX_SRQS           "max-srqs"
#define VIBIF_XS_MAX_MRS            "max-mrs"
#define VIBIF_XS_MAX_AHS            "max-ahs"
#define VIBIF_XS_MAX_PINNED_PAGES   "max-pinned-pages"
#define VIBIF_XS_PROTOCOL_VERSIONS  "protocol-versions"
#define VIBIF_XS_PROTOCOL_VERSION   "protocol-version"
#define VIBIF_XS_MAX_RING_ORDER     "max-ring-page-order"
#define VIBIF_XS_MAX_CONTEXTS       "max-contexts"
#define VIBIF_XS_FEATURE_INDIRECT   "feature-indirect-grants"
#define VIBIF_XS_FEATURE_SRQ        "feature-srq"
#define VIBIF_XS_FEATURE_ATOMICS    "feature-atomics"
#define VIBIF_XS_FEATURE_RETIRES    "feature-completion-retires"
#define VIBIF_XS_ERROR              "error"
#define VIBIF_XS_CTX_DIR            "ctx"
#define VIBIF_XS_RING_PAGE_ORDER    "ring-page-order"
#define VIBIF_XS_RING_REF           "ring-ref"
#define VIBIF_XS_EVENT_CHANNEL      "event-channel"
#define VIBIF_XS_DOORBELL_REF       "doorbell-ref"

/* Defaults the back-end applies when the toolstack left a key out. */
#define VIBIF_DEFAULT_PORT          1
#define VIBIF_DEFAULT_PKEY          0xffff
#define VIBIF_DEFAULT_MAX_PDS       16
#define VIBIF_DEFAULT_MAX_CQS       256
#define VIBIF_DEFAULT_MAX_QPS       256
#define VIBIF_DEFAULT_MAX_SRQS      64
#define VIBIF_DEFAULT_MAX_MRS       1024
#define VIBIF_DEFAULT_MAX_AHS       1024
#define VIBIF_DEFAULT_MAX_PINNED_PAGES (1u << 18)   /* 1 GiB */

/* Bounds every parser enforces. */
#define VIBIF_MAX_CTXID             (1u << 22)   /* ctxid < this */
#define VIBIF_MAX_CONTEXTS          64           /* per device */
#define VIBIF_MAX_RING_PAGE_ORDER   4            /* 16 pages */
#define VIBIF_MAX_PKEYS             16
#define VIBIF_MAX_GID_INDICES       16

/******************************************************************************
 * STATUS CODES
 *
 * Responses carry 0 or a negative Linux errno value. The ones the protocol
 * gives a meaning to:
 */
#define VIBIF_OK          0
#define VIBIF_EPERM      (-1)    /* P_Key, GID index, QP type or port not allowed */
#define VIBIF_ENOENT     (-2)    /* no such handle (or a stale generation) */
#define VIBIF_EIO        (-5)    /* the HCA failed the operation */
#define VIBIF_EAGAIN     (-11)
#define VIBIF_ENOMEM     (-12)
#define VIBIF_EACCES     (-13)   /* grant refs not mappable */
#define VIBIF_EFAULT     (-14)   /* bad guest address or page list */
#define VIBIF_EBUSY      (-16)   /* object still in use (PD with MRs, CQ with QPs) */
#define VIBIF_EINVAL     (-22)   /* malformed request or attribute */
#define VIBIF_ENOSPC     (-28)   /* no doorbell slot left in the context */
#define VIBIF_ENOSYS     (-38)   /* unknown operation */
#define VIBIF_EOVERFLOW  (-75)
#define VIBIF_EDQUOT     (-122)  /* a quota of the device is exhausted */

/******************************************************************************
 * HANDLES
 *
 * Every object the back-end creates for a context is named by a 32-bit
 * handle: a table index in the low 16 bits and a generation (never 0) in
 * the high 16 bits. Handles are per context and checked on every use; they
 * are never pointers. 0 is never a valid handle.
 */
typedef uint32_t vibif_handle_t;
#define VIBIF_HANDLE_NONE           0u
#define VIBIF_HANDLE_INDEX(h)       ((h) & 0xffffu)
#define VIBIF_HANDLE_GENERATION(h)  ((h) >> 16)
static inline vibif_handle_t vibif_make_handle(uint32_t index, uint32_t generation) {
    return (generation << 16) | (index & 0xffffu);
}

typedef uint32_t vibif_grant_ref_t;

/******************************************************************************
 * PAGE LISTS
 *
 * Guest memory (queue buffers, registered memory) reaches the back-end as a
 * list of grant refs, one per 4 KiB page, in address order:
 *   levels 0: refs[] are the data pages themselves (at most
 *             VIBIF_PAGE_LIST_INLINE pages);
 *   levels 1: refs[] are pages each holding VIBIF_REFS_PER_PAGE data refs;
 *   levels 2: refs[] are pages of refs of pages of data refs.
 * Indirect pages are granted read-only; the back-end copies each one before
 * it looks at it. nr_refs inline refs are used; the rest are ignored.
 * Two levels of VIBIF_PAGE_LIST_INLINE refs cover 160 GiB; the device's
 * max-pinned-pages quota is the real limit.
 */
#define VIBIF_PAGE_SIZE             4096u
#define VIBIF_PAGE_SHIFT            12
#define VIBIF_PAGE_LIST_INLINE      40
#define VIBIF_REFS_PER_PAGE         (VIBIF_PAGE_SIZE / sizeof(vibif_grant_ref_t))
#define VIBIF_PAGE_LIST_MAX_LEVELS  2

struct vibif_page_list {
    uint32_t nr_pages;      /* data pages described */
    uint8_t  levels;        /* 0, 1 or 2 */
    uint8_t  nr_refs;       /* refs[] entries used, <= VIBIF_PAGE_LIST_INLINE */
    uint16_t reserved;
    vibif_grant_ref_t refs[VIBIF_PAGE_LIST_INLINE];
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_page_list) == 168, "vibif_page_list size");

/******************************************************************************
 * CONTROL OPERATIONS (request ring)
 */
#define VIBIF_OP_QUERY_DEVICE      1
#define VIBIF_OP_QUERY_PORT        2
#define VIBIF_OP_QUERY_GID         3
#define VIBIF_OP_QUERY_PKEY        4
#define VIBIF_OP_ALLOC_PD          5
#define VIBIF_OP_DEALLOC_PD        6
#define VIBIF_OP_REG_MR            7
#define VIBIF_OP_DEREG_MR          8
#define VIBIF_OP_CREATE_CQ         9
#define VIBIF_OP_RESIZE_CQ         10
#define VIBIF_OP_DESTROY_CQ        11
#define VIBIF_OP_CREATE_QP         12
#define VIBIF_OP_MODIFY_QP         13
#define VIBIF_OP_QUERY_QP          14
#define VIBIF_OP_DESTROY_QP        15
#define VIBIF_OP_CREATE_SRQ        16
#define VIBIF_OP_MODIFY_SRQ        17
#define VIBIF_OP_QUERY_SRQ         18
#define VIBIF_OP_DESTROY_SRQ       19
#define VIBIF_OP_CREATE_AH         20
#define VIBIF_OP_DESTROY_AH        21
#define VIBIF_OP_MAX               35   /* CM ops: see CONNECTION MANAGEMENT */

/* Verbs values the back-end checks (rdma-core numbering). */
#define VIBIF_QPT_RC               2    /* IBV_QPT_RC */
#define VIBIF_QPT_UC               3    /* IBV_QPT_UC */
#define VIBIF_QPT_UD               4    /* IBV_QPT_UD */
#define VIBIF_ACCESS_LOCAL_WRITE   1
#define VIBIF_ACCESS_REMOTE_WRITE  2
#define VIBIF_ACCESS_REMOTE_READ   4
#define VIBIF_ACCESS_REMOTE_ATOMIC 8
#define VIBIF_ACCESS_ALL           15   /* anything else is refused */

/* A request: 256 bytes, header then an operation body. */
struct vibif_request_header {
    uint64_t id;            /* echoed in the response */
    uint16_t op;            /* VIBIF_OP_* */
    uint16_t reserved0;
    uint32_t reserved1;
};

struct vibif_query_port_req  { uint8_t port; uint8_t pad[7]; };
struct vibif_query_gid_req   { uint8_t port; uint8_t pad[3]; uint32_t index; };
struct vibif_query_pkey_req  { uint8_t port; uint8_t pad[3]; uint32_t index; };
struct vibif_handle_req      { vibif_handle_t handle; uint32_t pad; };  /* dealloc/dereg/destroy/query */

struct vibif_reg_mr_req {
    vibif_handle_t pd;
    uint32_t access;        /* VIBIF_ACCESS_* */
    uint64_t iova;          /* guest virtual address the HCA will see */
    uint64_t length;        /* bytes from iova */
    uint32_t first_offset;  /* iova's offset in the first granted page */
    uint32_t reserved;
    struct vibif_page_list pages;
};

struct vibif_create_cq_req {
    uint32_t cqe;           /* entries, a power of two, <= max_cqe */
    uint32_t comp_vector;
    uint32_t reserved[2];
    struct vibif_page_list pages;   /* cqe * sizeof(struct vibif_cqe) bytes */
};

struct vibif_resize_cq_req {
    vibif_handle_t cq;
    uint32_t cqe;
    uint32_t reserved[2];
    struct vibif_page_list pages;   /* the new buffer; the old one is released */
};

struct vibif_qp_cap {
    uint32_t max_send_wr, max_recv_wr;      /* powers of two */
    uint32_t max_send_sge, max_recv_sge;
    uint32_t max_inline_data;
};

struct vibif_create_qp_req {
    vibif_handle_t pd, send_cq, recv_cq, srq;  /* srq may be VIBIF_HANDLE_NONE */
    uint8_t  qp_type;       /* VIBIF_QPT_* */
    uint8_t  sq_sig_all;
    uint8_t  pad[2];
    struct vibif_qp_cap cap;
    /* One buffer: the send queue, then the receive queue at the next page
     * boundary (absent with an SRQ). */
    struct vibif_page_list pages;
};

/* ibv_global_route + ibv_ah_attr, packed. */
struct vibif_ah_attr {
    uint8_t  dgid[16];
    uint32_t flow_label;
    uint8_t  sgid_index, hop_limit, traffic_class, is_global;
    uint16_t dlid;
    uint8_t  sl, src_path_bits, static_rate, port_num;
    uint8_t  pad[2];
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_ah_attr) == 32, "vibif_ah_attr size");

/* ibv_qp_attr's fields, fixed-width; attr_mask is IBV_QP_* bits. */
struct vibif_qp_attr {
    uint32_t qp_state, cur_qp_state, path_mtu, path_mig_state;
    uint32_t qkey, rq_psn, sq_psn, dest_qp_num;
    uint32_t qp_access_flags;
    struct vibif_qp_cap cap;
    struct vibif_ah_attr ah_attr, alt_ah_attr;
    uint16_t pkey_index, alt_pkey_index;
    uint8_t  en_sqd_async_notify, sq_draining, max_rd_atomic, max_dest_rd_atomic;
    uint8_t  min_rnr_timer, port_num, timeout, retry_cnt;
    uint8_t  rnr_retry, alt_port_num, alt_timeout, pad;
    uint32_t rate_limit;
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_qp_attr) == 140, "vibif_qp_attr size");

struct vibif_modify_qp_req {
    vibif_handle_t qp;
    uint32_t attr_mask;
    struct vibif_qp_attr attr;
};

struct vibif_create_srq_req {
    vibif_handle_t pd;
    uint32_t max_wr, max_sge, srq_limit;
    struct vibif_page_list pages;
};

struct vibif_modify_srq_req {
    vibif_handle_t srq;
    uint32_t attr_mask;     /* IBV_SRQ_MAX_WR | IBV_SRQ_LIMIT */
    uint32_t max_wr, srq_limit;
};

struct vibif_create_ah_req {
    vibif_handle_t pd;
    uint32_t pad;
    struct vibif_ah_attr attr;
};

/******************************************************************************
 * CONNECTION MANAGEMENT (RDMA-CM), with "feature-rdma-cm"
 *
 * The back-end is the guest's connection manager (docs/rdma-cm.md): the
 * guest never sees QP1 or a MAD. A CM id is an object of the context, named
 * by a handle like any other; the guest addresses peers by IP address and
 * port, and the back-end runs the exchange (REQ/REP/RTU/REJ/DREQ/DREP,
 * SIDR for UD) with the peer, a guest of the same back-end or - through the
 * host's own rdma_cm on an rdma-core HCA - any node of the fabric.
 *
 * Addresses. The back-end node "ip" (written by the toolstack: space-
 * separated IPv4/IPv6 addresses) lists the addresses the guest may bind to
 * and be reached at; without it, the back-end uses the "ip" nodes of the
 * guest's vifs. Loopback addresses are the guest itself. Binding, listening
 * at, or resolving from any other address fails with VIBIF_EADDRNOTAVAIL.
 * Ports are in host byte order in vibif_cm_addr.
 *
 * Events. The back-end queues CM events per id and announces each with a
 * doorbell event { VIBIF_EVENT_CM, 0, id }; the guest fetches them, oldest
 * first, with CM_GET_EVENT. Events are rdma_cm's (enum rdma_cm_event_type);
 * statuses are rdma_cm's too: 0, a negative errno (ADDR_ERROR -EHOSTUNREACH,
 * UNREACHABLE -ETIMEDOUT), or for REJECTED the IB CM reject reason
 * (8: no listener, "invalid service ID"; 28: consumer defined, i.e.
 * rdma_reject, a peer that closed its id or died mid-handshake).
 *
 * Who sends what (the active side connects, the passive side listens):
 *   CM_CREATE_ID     either   u.cm_create_id -> u.handle (the id)
 *   CM_DESTROY_ID    either   u.cm_id. A connected id disconnects (the peer
 *                             gets DISCONNECTED), a half-open one rejects
 *                             (the peer gets REJECTED 28).
 *   CM_BIND          either   u.cm_bind -> u.cm_addr (port filled in).
 *                             EADDRNOTAVAIL: not the guest's address;
 *                             EADDRINUSE: port taken on this device.
 *   CM_RESOLVE_ADDR  active   u.cm_resolve_addr (src may be family 0) ->
 *                             u.cm_addr (the source used); then event
 *                             ADDR_RESOLVED, or ADDR_ERROR when no node
 *                             answers at dst.
 *   CM_RESOLVE_ROUTE active   u.cm_id (arg: timeout ms) -> ROUTE_RESOLVED.
 *   CM_LISTEN        passive  u.cm_id (arg: backlog, 0 = default) -> each
 *                             REQ is a CONNECT_REQUEST event on the listener
 *                             with u.cm_event.new_id, a new id already
 *                             carrying the connection.
 *   CM_CONNECT       active   u.cm_connect: param.qp_num (and for UD nothing
 *                             else), the active side's conn params, private
 *                             data (<= 56 bytes RC, <= 180 UD). RC: event
 *                             CONNECT_RESPONSE (REP, with the passive side's
 *                             params and private data), or REJECTED, or
 *                             UNREACHABLE (no answer in time). UD: event
 *                             ESTABLISHED with the peer's QPN and Q_Key.
 *   CM_ACCEPT        passive  u.cm_connect: param.qp_num (param.qkey for
 *                             UD), private data (<= 196 RC, <= 136 UD). RC:
 *                             the passive QP must already be in RTS; event
 *                             ESTABLISHED once the active side sent RTU, or
 *                             UNREACHABLE if it never does.
 *   CM_REJECT        passive  u.cm_reject (private data <= 148) -> the
 *                             active side gets REJECTED 28 with it.
 *   CM_ESTABLISH     active   u.cm_id: RTU, after the active QP reached RTS
 *                             -> the passive side gets ESTABLISHED.
 *   CM_DISCONNECT    either   u.cm_id: DREQ (or DREP) -> DISCONNECTED on both
 *                             sides. ENOTCONN when not connected.
 *   CM_INIT_QP_ATTR  either   u.cm_id (arg: IBV_QPS_INIT/RTR/RTS) ->
 *                             u.cm_qp_attr: the attributes and mask that
 *                             take the id's QP there (rdma_init_qp_attr);
 *                             the guest applies them with MODIFY_QP.
 *   CM_QUERY_ROUTE   either   u.cm_id -> u.cm_route: addresses, the RoCE v2
 *                             GIDs of the IPs, the path as the guest's port
 *                             reaches the peer (an AH attribute), P_Key.
 *   CM_GET_EVENT     either   u.cm_id -> u.cm_event, or VIBIF_EAGAIN when
 *                             no event is queued for the id.
 * Every op answers VIBIF_ENOENT for an unknown id, VIBIF_EINVAL for an op
 * the id's state does not allow, VIBIF_ENOSYS without the feature.
 * Bounds: VIBIF_CM_MAX_IDS ids per context, VIBIF_CM_MAX_EVENTS queued per
 * id (a listener rejects requests beyond that, as a full backlog does).
 */
#define VIBIF_XS_FEATURE_RDMA_CM    "feature-rdma-cm"
#define VIBIF_XS_IP                 "ip"

#define VIBIF_OP_CM_CREATE_ID      22
#define VIBIF_OP_CM_DESTROY_ID     23
#define VIBIF_OP_CM_BIND           24
#define VIBIF_OP_CM_RESOLVE_ADDR   25
#define VIBIF_OP_CM_RESOLVE_ROUTE  26
#define VIBIF_OP_CM_LISTEN         27
#define VIBIF_OP_CM_CONNECT        28
#define VIBIF_OP_CM_ACCEPT         29
#define VIBIF_OP_CM_REJECT         30
#define VIBIF_OP_CM_ESTABLISH      31
#define VIBIF_OP_CM_DISCONNECT     32
#define VIBIF_OP_CM_INIT_QP_ATTR   33
#define VIBIF_OP_CM_QUERY_ROUTE    34
#define VIBIF_OP_CM_GET_EVENT      35

#define VIBIF_EADDRINUSE     (-98)
#define VIBIF_EADDRNOTAVAIL  (-99)
#define VIBIF_ENOTCONN       (-107)

#define VIBIF_CM_MAX_IDS           1024
#define VIBIF_CM_MAX_EVENTS        64
#define VIBIF_CM_MAX_PRIVATE_DATA  196   /* REP; REQ 56, REJ 148, SIDR 180/136 */
#define VIBIF_CM_PS_TCP            0x0106   /* RDMA_PS_TCP: RC */
#define VIBIF_CM_PS_UDP            0x0111   /* RDMA_PS_UDP: UD */
#define VIBIF_AF_INET              2
#define VIBIF_AF_INET6             10

struct vibif_cm_addr {
    uint16_t family;        /* VIBIF_AF_INET, VIBIF_AF_INET6, or 0: unspecified */
    uint16_t port;          /* host byte order; 0: any */
    uint32_t scope_id;      /* IPv6 scope */
    uint8_t  addr[16];      /* IPv4: the first 4 bytes; all zero: wildcard */
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_addr) == 24, "vibif_cm_addr size");

struct vibif_cm_create_id_req {
    uint16_t port_space;    /* VIBIF_CM_PS_TCP or VIBIF_CM_PS_UDP */
    uint8_t  qp_type;       /* VIBIF_QPT_RC or VIBIF_QPT_UD */
    uint8_t  pad[5];
};
struct vibif_cm_id_req { vibif_handle_t id; uint32_t arg; };
struct vibif_cm_bind_req { vibif_handle_t id; uint32_t pad; struct vibif_cm_addr addr; };
struct vibif_cm_resolve_addr_req {
    vibif_handle_t id;
    uint32_t timeout_ms;
    struct vibif_cm_addr src, dst;
};
/* rdma_conn_param / rdma_ud_param, the private data apart. */
struct vibif_cm_conn_param {
    uint8_t  responder_resources, initiator_depth, flow_control, retry_count;
    uint8_t  rnr_retry_count, srq, private_data_len, pad;
    uint32_t qp_num;
    uint32_t qkey;          /* UD */
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_conn_param) == 16, "vibif_cm_conn_param size");
struct vibif_cm_connect_req {   /* CM_CONNECT and CM_ACCEPT */
    vibif_handle_t id;
    uint32_t pad;
    struct vibif_cm_conn_param param;
    uint8_t  private_data[VIBIF_CM_MAX_PRIVATE_DATA];
};
struct vibif_cm_reject_req {
    vibif_handle_t id;
    uint8_t  private_data_len;
    uint8_t  pad[3];
    uint8_t  private_data[VIBIF_CM_MAX_PRIVATE_DATA];
};

struct vibif_cm_addr_resp { struct vibif_cm_addr addr; };
struct vibif_cm_qp_attr_resp {
    uint32_t attr_mask;     /* IBV_QP_* */
    uint32_t pad;
    struct vibif_qp_attr attr;
};
struct vibif_cm_route_resp {
    struct vibif_cm_addr src, dst;
    uint8_t  sgid[16], dgid[16];     /* ::ffff:a.b.c.d for IPv4, the IPv6 address */
    struct vibif_ah_attr ah_attr;    /* the path to the peer, in the guest's port terms */
    uint16_t pkey;                   /* host byte order */
    uint8_t  path_mtu;               /* IBV_MTU_* */
    uint8_t  link_layer;             /* IBV_LINK_LAYER_* of the guest's port */
    uint8_t  pad[4];
};
struct vibif_cm_event_resp {
    uint8_t  event;         /* RDMA_CM_EVENT_* */
    uint8_t  remaining;     /* events still queued for this id (at most 255) */
    uint16_t pad;
    int32_t  status;
    vibif_handle_t new_id;  /* CONNECT_REQUEST: the id of the new connection */
    uint32_t pad2;
    struct vibif_cm_conn_param param;   /* the peer's; private_data_len bytes follow */
    uint8_t  private_data[VIBIF_CM_MAX_PRIVATE_DATA];
};

#define VIBIF_REQUEST_SIZE 256
#define VIBIF_REQUEST_BODY (VIBIF_REQUEST_SIZE - sizeof(struct vibif_request_header))

struct vibif_request {
    struct vibif_request_header hdr;
    union {
        struct vibif_query_port_req   query_port;
        struct vibif_query_gid_req    query_gid;
        struct vibif_query_pkey_req   query_pkey;
        struct vibif_handle_req       handle;
        struct vibif_reg_mr_req       reg_mr;
        struct vibif_create_cq_req    create_cq;
        struct vibif_resize_cq_req    resize_cq;
        struct vibif_create_qp_req    create_qp;
        struct vibif_modify_qp_req    modify_qp;
        struct vibif_create_srq_req   create_srq;
        struct vibif_modify_srq_req   modify_srq;
        struct vibif_create_ah_req    create_ah;
        struct vibif_cm_create_id_req cm_create_id;
        struct vibif_cm_id_req        cm_id;
        struct vibif_cm_bind_req      cm_bind;
        struct vibif_cm_resolve_addr_req cm_resolve_addr;
        struct vibif_cm_connect_req   cm_connect;
        struct vibif_cm_reject_req    cm_reject;
        uint8_t raw[VIBIF_REQUEST_SIZE - 16];
    } u;
};

/* Responses: 256 bytes. */
struct vibif_response_header {
    uint64_t id;            /* the request's id */
    uint16_t op;            /* the request's op */
    uint16_t reserved;
    int32_t  status;        /* VIBIF_OK or a negative VIBIF_E* */
};

/* ibv_device_attr's fields the verbs API reports. */
struct vibif_device_attr {
    char     fw_ver[64];
    uint64_t node_guid, sys_image_guid, max_mr_size, page_size_cap;
    uint32_t vendor_id, vendor_part_id, hw_ver;
    uint32_t max_qp, max_qp_wr, device_cap_flags, max_sge, max_cq, max_cqe;
    uint32_t max_mr, max_pd, max_qp_rd_atom, max_qp_init_rd_atom, atomic_cap;
    uint32_t max_ah, max_srq, max_srq_wr, max_srq_sge, max_pkeys;
    uint8_t  phys_port_cnt, local_ca_ack_delay;
    uint8_t  pad[2];
    uint32_t max_sge_rd, max_res_rd_atom;   /* 0 from a back-end before these existed */
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_device_attr) == 184, "vibif_device_attr size");

/* ibv_port_attr's fields. */
struct vibif_port_attr {
    uint32_t state, max_mtu, active_mtu, gid_tbl_len, port_cap_flags, max_msg_sz;
    uint32_t bad_pkey_cntr, qkey_viol_cntr;
    uint16_t pkey_tbl_len, lid, sm_lid;
    uint8_t  lmc, max_vl_num, sm_sl, subnet_timeout, init_type_reply;
    uint8_t  active_width, active_speed, phys_state, link_layer, flags;
    uint16_t pad[3];
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_port_attr) == 56, "vibif_port_attr size");

/* gid_type: what the entry is on the wire, as enum ibv_gid_type: */
#define VIBIF_GID_TYPE_IB       0   /* InfiniBand, or a back-end that does not say */
#define VIBIF_GID_TYPE_ROCE_V1  1
#define VIBIF_GID_TYPE_ROCE_V2  2
struct vibif_gid_resp   { uint8_t gid[16]; uint8_t gid_type; uint8_t pad[7]; };
struct vibif_pkey_resp  { uint16_t pkey; uint16_t pad[3]; };
struct vibif_handle_resp { vibif_handle_t handle; uint32_t pad; };

struct vibif_reg_mr_resp {
    vibif_handle_t mr;
    uint32_t lkey, rkey;    /* the HCA's real keys */
    uint32_t pad;
};

struct vibif_create_cq_resp {
    vibif_handle_t cq;
    uint32_t cqe;           /* entries of the buffer */
    uint16_t doorbell_slot; /* VIBIF_DB_* slot of this CQ */
    uint16_t pad[3];
};

struct vibif_create_qp_resp {
    vibif_handle_t qp;
    uint32_t qp_num;
    struct vibif_qp_cap cap;        /* what the back-end granted */
    uint32_t send_wqe_stride, recv_wqe_stride;   /* bytes, powers of two */
    uint32_t recv_queue_offset;     /* bytes into the buffer */
    uint16_t sq_doorbell_slot, rq_doorbell_slot;
};

struct vibif_query_qp_resp {
    struct vibif_qp_attr attr;
    struct vibif_qp_cap init_cap;
    uint8_t qp_type, sq_sig_all, pad[2];
};

struct vibif_create_srq_resp {
    vibif_handle_t srq;
    uint32_t max_wr, max_sge, wqe_stride;
    uint16_t doorbell_slot, pad[3];
};

struct vibif_query_srq_resp { uint32_t max_wr, max_sge, srq_limit, pad; };

struct vibif_response {
    struct vibif_response_header hdr;
    union {
        struct vibif_device_attr      query_device;
        struct vibif_port_attr        query_port;
        struct vibif_gid_resp         query_gid;
        struct vibif_pkey_resp        query_pkey;
        struct vibif_handle_resp      handle;   /* alloc_pd, create_ah */
        struct vibif_reg_mr_resp      reg_mr;
        struct vibif_create_cq_resp   create_cq;
        struct vibif_create_qp_resp   create_qp;
        struct vibif_query_qp_resp    query_qp;
        struct vibif_create_srq_resp  create_srq;
        struct vibif_query_srq_resp   query_srq;
        struct vibif_cm_addr_resp     cm_addr;
        struct vibif_cm_qp_attr_resp  cm_qp_attr;
        struct vibif_cm_route_resp    cm_route;
        struct vibif_cm_event_resp    cm_event;
        uint8_t raw[VIBIF_REQUEST_SIZE - 16];
    } u;
};

VIBIF_STATIC_ASSERT(sizeof(struct vibif_request_header) == 16, "request header size");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_response_header) == 16, "response header size");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_request) == VIBIF_REQUEST_SIZE, "request size");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_response) == VIBIF_REQUEST_SIZE, "response size");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_request, u) == 16, "request body offset");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_reg_mr_req, pages) == 32, "reg_mr page list offset");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_create_qp_req) <= VIBIF_REQUEST_SIZE - 16, "create_qp fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_modify_qp_req) <= VIBIF_REQUEST_SIZE - 16, "modify_qp fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_query_qp_resp) <= VIBIF_REQUEST_SIZE - 16, "query_qp fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_connect_req) <= VIBIF_REQUEST_SIZE - 16, "cm_connect fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_reject_req) <= VIBIF_REQUEST_SIZE - 16, "cm_reject fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_event_resp) <= VIBIF_REQUEST_SIZE - 16, "cm_event fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_route_resp) <= VIBIF_REQUEST_SIZE - 16, "cm_route fits");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cm_qp_attr_resp) <= VIBIF_REQUEST_SIZE - 16, "cm_qp_attr fits");

/* The request ring: Xen's ring.h, (1 << ring-page-order) pages. */
DEFINE_RING_TYPES(vibif_ctrl, struct vibif_request, struct vibif_response);

/*
 * Liveness of the guest process. After SHARED_RING_INIT the front-end sets
 * the byte at VIBIF_RING_ALIVE_OFFSET of the first ring page to 1 and shares
 * that page with an unmap notification that clears the byte and notifies the
 * context's event channel (xengntshr_share_page_notify). When the process
 * dies the byte reads 0 on the back-end's next wake-up: the context is
 * closed. (A guest clearing it on purpose only closes its own context.)
 */
#define VIBIF_RING_ALIVE_OFFSET offsetof(struct vibif_ctrl_sring, pvt)
#define VIBIF_CTRL_RING_SIZE(order) \
    __CONST_RING_SIZE(vibif_ctrl, VIBIF_PAGE_SIZE << (order))

/* ring.h's macros compute in long arithmetic and use GNU statement
 * expressions; these wrappers keep callers built with -Wconversion,
 * -Wpedantic (and C++'s -Wold-style-cast) clean, with GCC and clang.
 * For init, bytes = VIBIF_PAGE_SIZE << ring-page-order. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wsign-conversion"
#ifdef __cplusplus
#pragma GCC diagnostic ignored "-Wold-style-cast"
#endif
#ifdef __clang__
#pragma clang diagnostic ignored "-Wgnu-statement-expression"
#endif
#pragma GCC diagnostic ignored "-Wpedantic"
#endif
static inline void vibif_ctrl_front_ring_init(struct vibif_ctrl_front_ring *r,
                                              struct vibif_ctrl_sring *s, size_t bytes) {
    FRONT_RING_INIT(r, s, bytes);
}
static inline void vibif_ctrl_back_ring_init(struct vibif_ctrl_back_ring *r,
                                             struct vibif_ctrl_sring *s, size_t bytes) {
    BACK_RING_INIT(r, s, bytes);
}
/* Publish queued requests/responses; nonzero when the other end must be notified. */
static inline int vibif_ctrl_front_push(struct vibif_ctrl_front_ring *r) {
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(r, notify);
    return notify;
}
static inline int vibif_ctrl_back_push(struct vibif_ctrl_back_ring *r) {
    int notify;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(r, notify);
    return notify;
}
/* Re-arm the event index and check once more; nonzero when more work arrived. */
static inline int vibif_ctrl_back_final_check(struct vibif_ctrl_back_ring *r) {
    int more;
    RING_FINAL_CHECK_FOR_REQUESTS(r, more);
    return more;
}
static inline int vibif_ctrl_front_final_check(struct vibif_ctrl_front_ring *r) {
    int more;
    RING_FINAL_CHECK_FOR_RESPONSES(r, more);
    return more;
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/******************************************************************************
 * FAST PATH: WORK QUEUES, COMPLETION QUEUES, DOORBELL PAGE
 *
 * Work and completion queues live in guest pages the guest granted when it
 * created the QP, SRQ or CQ, and so is the context's doorbell page.
 * Indices are free-running uint32 counters; an entry's slot is
 * index & (entries - 1).
 *
 * Posting (guest): write the WQE into slot (producer & mask), then a release
 * barrier, then store producer+1 into the queue's doorbell slot. If the
 * doorbell header's back-end-polling flag is 0 after that (read after a full
 * barrier), notify the context's event channel.
 * Consuming (back-end): load the producer (acquire), COPY the WQE out of
 * guest memory, validate the copy, execute it, then publish consumer+1.
 * The guest may post while producer - consumer < entries; more is queue
 * overflow, which the back-end treats as a broken queue: the QP goes to the
 * error state and flushes, as hardware would.
 *
 * Completions (back-end): write the CQE, release barrier, then store its
 * owner byte, vibif_cqe_owner(index, entries): 1 on the first lap, 0 on the
 * second, and so on, so the zeroed buffer the guest created holds no valid
 * entry. The guest polls the owner byte, reads the CQE after an acquire
 * barrier, and publishes its consumer index in the CQ's doorbell slot. The
 * back-end never overwrites an entry the guest has not consumed: while the
 * guest's CQ is full, completions wait in the HCA's CQ, and when that one
 * overflows the HCA reports IBV_EVENT_CQ_ERR, which reaches the guest.
 * RESIZE_CQ restarts the CQ's indices: the back-end moves the entries not
 * yet consumed to the start of the new buffer, sets the slot's producer to
 * their count and its consumer to 0; the guest continues from index 0.
 *
 * Queue geometry: a send WQE takes vibif_send_wqe_stride(max_send_sge,
 * max_inline_data) bytes, a receive WQE vibif_recv_wqe_stride(max_recv_sge);
 * the QP buffer holds max_send_wr send WQEs, then (unless the QP uses an
 * SRQ) max_recv_wr receive WQEs from the next page boundary. Both ends
 * compute the sizes with these functions; the back-end refuses a page list
 * of any other length.
 *
 * Inline data: the back-end copies it out of the WQE when it consumes the
 * WQE, so the guest may reuse its buffer as soon as ibv_post_send returns.
 * Arming (ibv_req_notify_cq): the guest increments arm_sequence (with the
 * solicited-only bit as it wants); the back-end, once it wrote a completion
 * that matches an armed sequence it has not answered yet, pushes a
 * VIBIF_EVENT_COMPLETION entry into the event queue and notifies.
 */

/* Send opcodes: IBV_WR_* values. */
#define VIBIF_WR_RDMA_WRITE           0
#define VIBIF_WR_RDMA_WRITE_WITH_IMM  1
#define VIBIF_WR_SEND                 2
#define VIBIF_WR_SEND_WITH_IMM        3
#define VIBIF_WR_RDMA_READ            4
#define VIBIF_WR_ATOMIC_CMP_AND_SWP   5
#define VIBIF_WR_ATOMIC_FETCH_AND_ADD 6

/* Send flags: IBV_SEND_* values. */
#define VIBIF_SEND_FENCE     1
#define VIBIF_SEND_SIGNALED  2
#define VIBIF_SEND_SOLICITED 4
#define VIBIF_SEND_INLINE    8

#define VIBIF_MAX_SGE        16
#define VIBIF_MAX_INLINE     512
#define VIBIF_MAX_QUEUE_WR   (1u << 15)
#define VIBIF_MAX_CQE        (1u << 17)

struct vibif_sge {
    uint64_t addr;          /* guest virtual address inside a registered MR */
    uint32_t length;
    uint32_t lkey;
};

/* Send WQE: this header, then num_sge vibif_sge, or inline_length bytes. */
struct vibif_send_wqe {
    uint64_t wr_id;
    uint8_t  opcode;        /* VIBIF_WR_* */
    uint8_t  num_sge;
    uint16_t reserved;
    uint32_t send_flags;    /* VIBIF_SEND_* */
    uint32_t imm_data;      /* network byte order, as in ibv_send_wr */
    uint32_t inline_length;
    uint64_t remote_addr;   /* RDMA / atomic */
    uint32_t rkey;
    uint32_t ud_remote_qpn; /* UD */
    uint64_t compare_add;   /* atomics */
    uint64_t swap;
    vibif_handle_t ud_ah;   /* UD: an AH of this context */
    uint32_t ud_remote_qkey;
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_send_wqe) == 64, "send WQE header size");

/* Receive WQE (RQ and SRQ): this header, then num_sge vibif_sge. */
struct vibif_recv_wqe {
    uint64_t wr_id;
    uint32_t num_sge;
    uint32_t reserved;
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_recv_wqe) == 16, "recv WQE header size");

/* Completion queue entry: ibv_wc's fields and an owner bit. */
struct vibif_cqe {
    uint64_t wr_id;
    uint32_t status;        /* IBV_WC_* status */
    uint32_t opcode;        /* IBV_WC_* opcode */
    uint32_t vendor_err;
    uint32_t byte_len;
    uint32_t imm_data;      /* network byte order */
    uint32_t qp_num;
    uint32_t src_qp;
    uint32_t wc_flags;      /* IBV_WC_* flags */
    uint16_t pkey_index, slid;
    uint8_t  sl, dlid_path_bits;
    uint8_t  wq;            /* VIBIF_WQ_*: the guest queue this completion frees slots of */
    uint8_t  reserved0;
    uint32_t wqe_counter;   /* VIBIF_WQ_SEND/RECV: index of the WQE completed, plus one */
    uint8_t  reserved[11];
    uint8_t  owner;         /* written last: phase of the lap it belongs to */
};
VIBIF_STATIC_ASSERT(sizeof(struct vibif_cqe) == 64, "CQE size");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_cqe, wq) == 46, "CQE wq offset");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_cqe, wqe_counter) == 48, "CQE wqe_counter offset");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_cqe, owner) == 63, "CQE owner offset");

/*
 * Queue accounting (with "feature-completion-retires"): a work queue slot is
 * the guest's again when the guest POLLS the completion that retires it, not
 * when the back-end consumed the WQE, so max_send_wr / max_recv_wr bound the
 * work outstanding as on an HCA. Every CQE names the queue it retires:
 *   VIBIF_WQ_SEND  send queue of QP qp_num: WQEs up to free-running index
 *                  wqe_counter - 1 are retired (an unsignaled WQE is retired
 *                  by the next completion of its queue, as on hardware);
 *   VIBIF_WQ_RECV  receive queue of QP qp_num: likewise;
 *   VIBIF_WQ_SRQ   one slot of the SRQ of QP qp_num (wqe_counter unused);
 *   VIBIF_WQ_NONE  nothing (a back-end without the feature writes 0).
 * Flushed and error completions retire like successful ones. A transition to
 * RESET discards the queues' WQEs: every slot is free again.
 */
#define VIBIF_WQ_NONE 0
#define VIBIF_WQ_SEND 1
#define VIBIF_WQ_RECV 2
#define VIBIF_WQ_SRQ  3

/* Sizes the geometry functions use (checked against the structs above). */
#define VIBIF_SEND_WQE_HEADER 64u
#define VIBIF_RECV_WQE_HEADER 16u
#define VIBIF_SGE_SIZE        16u
VIBIF_STATIC_ASSERT(sizeof(struct vibif_send_wqe) == VIBIF_SEND_WQE_HEADER, "send WQE header");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_recv_wqe) == VIBIF_RECV_WQE_HEADER, "recv WQE header");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_sge) == VIBIF_SGE_SIZE, "sge size");

static inline uint32_t vibif_pow2_at_least(uint32_t v) {
    uint32_t p = 1;
    while (p < v && p < (1u << 31)) p <<= 1;
    return p;
}
static inline uint32_t vibif_send_wqe_stride(uint32_t max_sge, uint32_t max_inline) {
    uint32_t body = max_sge * VIBIF_SGE_SIZE;
    if (max_inline > body) body = max_inline;
    return vibif_pow2_at_least(VIBIF_SEND_WQE_HEADER + body);
}
static inline uint32_t vibif_recv_wqe_stride(uint32_t max_sge) {
    return vibif_pow2_at_least(VIBIF_RECV_WQE_HEADER + max_sge * VIBIF_SGE_SIZE);
}
static inline uint64_t vibif_pages_for(uint64_t bytes) {
    return (bytes + VIBIF_PAGE_SIZE - 1) / VIBIF_PAGE_SIZE;
}
/* Offset of the receive queue in a QP buffer, and the buffer's page count. */
static inline uint64_t vibif_qp_recv_offset(uint32_t max_send_wr, uint32_t send_stride) {
    uint64_t send_bytes = max_send_wr;
    send_bytes *= send_stride;
    return vibif_pages_for(send_bytes) * VIBIF_PAGE_SIZE;
}
static inline uint64_t vibif_qp_buffer_pages(uint32_t max_send_wr, uint32_t send_stride,
                                             uint32_t max_recv_wr, uint32_t recv_stride) {
    uint64_t recv_bytes = max_recv_wr;
    recv_bytes *= recv_stride;
    return vibif_pages_for(vibif_qp_recv_offset(max_send_wr, send_stride) + recv_bytes);
}
/* The owner byte of the CQE at free-running index `index`. */
static inline uint8_t vibif_cqe_owner(uint32_t index, uint32_t entries) {
    const uint8_t first_lap_value = 1, second_lap_value = 0;
    return (index / entries) % 2u == 0u ? first_lap_value : second_lap_value;
}

/* The doorbell page (one per context, granted by the process, mapped
 * writable by the back-end). Every field has one writer, named in its comment. */
#define VIBIF_DB_SLOTS         124
#define VIBIF_EVENT_QUEUE_LEN  254

struct vibif_db_slot {
    uint32_t producer;      /* WQ: guest; CQ: back-end (CQEs written) */
    uint32_t consumer;      /* WQ: back-end; CQ: guest (CQEs polled) */
    uint32_t arm_sequence;  /* CQ: guest; bit 31 = solicited only */
    uint32_t armed_ack;     /* CQ: back-end, the last arm_sequence answered */
};

/* Event queue entry types. */
#define VIBIF_EVENT_COMPLETION 1   /* handle = CQ */
#define VIBIF_EVENT_ASYNC      2   /* handle = QP/CQ/SRQ, event = IBV_EVENT_* */
#define VIBIF_EVENT_CM         3   /* handle = CM id with a queued CM event (CM_GET_EVENT) */

struct vibif_event {
    uint16_t type;
    uint16_t event;
    vibif_handle_t handle;
};

struct vibif_doorbell_page {
    /* Header (64 bytes). */
    uint32_t backend_polling;   /* back-end: 1 while it busy-polls this context */
    uint32_t guest_kicks;       /* guest: bumped before each notify (statistics) */
    uint32_t reserved[14];
    struct vibif_db_slot slots[VIBIF_DB_SLOTS];
    /* Event queue (back-end produces, guest consumes). */
    uint32_t event_producer;    /* back-end */
    uint32_t event_consumer;    /* guest */
    uint32_t event_reserved[2];
    struct vibif_event events[VIBIF_EVENT_QUEUE_LEN];
};
VIBIF_STATIC_ASSERT(offsetof(struct vibif_doorbell_page, slots) == 64, "doorbell slots offset");
VIBIF_STATIC_ASSERT(offsetof(struct vibif_doorbell_page, event_producer) == 2048, "event queue offset");
VIBIF_STATIC_ASSERT(sizeof(struct vibif_doorbell_page) == VIBIF_PAGE_SIZE, "doorbell page size");

#endif /* __VIB_VIBIF_H__ */
