/* Internal: peer status of an event channel port (privileged domains only). */
#ifndef VIB_PLATFORM_XEN_EVTCHN_STATUS_H
#define VIB_PLATFORM_XEN_EVTCHN_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

/* 1: the peer has closed, 0: still connected, -1: cannot tell (not
 * privileged, or no such port). */
int vib_evtchn_peer_closed(unsigned int port);

#ifdef __cplusplus
}
#endif

#endif
