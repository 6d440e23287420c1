/* libxenctrl's headers need GNU C, so the one call vib makes into it lives
 * here, in C, behind a plain function. */
#include <xenctrl.h>

#include "evtchn_status.h"

int vib_evtchn_peer_closed(unsigned int port) {
  xc_interface* xc = xc_interface_open(NULL, NULL, 0);
  if (!xc) return -1;
  xc_evtchn_status_t status = {0};
  status.dom = DOMID_SELF;
  status.port = port;
  int rc = xc_evtchn_status(xc, &status);
  xc_interface_close(xc);
  if (rc != 0) return -1;
  /* When the other end closes, Xen turns our interdomain port back into an
   * unbound one. */
  return status.status == EVTCHNSTAT_interdomain ? 0 : 1;
}
