/* Proves vibif.h is valid C11 and gives the same layout to C code. */
#include "vib/vibif.h"

size_t vibif_c_request_size(void) { return sizeof(struct vibif_request); }
size_t vibif_c_doorbell_events_offset(void) { return offsetof(struct vibif_doorbell_page, events); }
unsigned vibif_c_ring_entries(unsigned order) {
  switch (order) {
    case 0: return VIBIF_CTRL_RING_SIZE(0);
    case 4: return VIBIF_CTRL_RING_SIZE(4);
    default: return 0;
  }
}
