/* The C API compiles as C and is callable from C. */
#include "vib/libxl_ib.h"

int c_api_spec_check(const char *spec, char *err, unsigned long errlen);

int c_api_spec_check(const char *spec, char *err, unsigned long errlen) {
    return vib_spec_check(spec, err, (size_t)errlen);
}
