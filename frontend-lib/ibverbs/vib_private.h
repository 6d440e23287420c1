/* vib's libibverbs.so.1 to vib's librdmacm.so.1: the context's control ring
 * and its connection-management events. Not an API for applications. */
#ifndef VIB_IBVERBS_PRIVATE_H
#define VIB_IBVERBS_PRIVATE_H

#include <infiniband/verbs.h>
#include <stdint.h>

#include "vib/vibif.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Sends `request` on the ring of `context` (a vib context) and waits for the
 * answer: 0 when the back-end answered VIBIF_OK, else the errno of its status
 * (or of the ring failing). Events queued meanwhile are dispatched. */
int vib_ibv_call(struct ibv_context* context, const struct vibif_request* request,
                 struct vibif_response* response);

/* `handler(arg, id)` runs for each VIBIF_EVENT_CM the back-end queues for
 * `context` (on the context's event thread, or after a verbs call); it must
 * not make verbs calls itself. NULL removes it. */
typedef void (*vib_cm_handler)(void* arg, uint32_t id);
void vib_ibv_set_cm_handler(struct ibv_context* context, vib_cm_handler handler, void* arg);

#ifdef __cplusplus
}
#endif

#endif
