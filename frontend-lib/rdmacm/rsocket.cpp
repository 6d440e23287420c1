// rsockets (RDMACM_1.0 exports them) are not offered on vib: each name is
// defined so that the loader accepts this library and a call fails cleanly
// with ENOSYS. No parameter list of their own (the x86-64 calling convention
// makes that safe with any arguments) and a `long` result: -1 reads as -1
// for callers expecting int, ssize_t or off_t alike.
#include <cerrno>

#define VIB_NO_RSOCKETS(name) \
  long name() {               \
    errno = ENOSYS;           \
    return -1;                \
  }

extern "C" {
VIB_NO_RSOCKETS(rsocket)
VIB_NO_RSOCKETS(rbind)
VIB_NO_RSOCKETS(rlisten)
VIB_NO_RSOCKETS(raccept)
VIB_NO_RSOCKETS(rconnect)
VIB_NO_RSOCKETS(rshutdown)
VIB_NO_RSOCKETS(rclose)
VIB_NO_RSOCKETS(rrecv)
VIB_NO_RSOCKETS(rrecvfrom)
VIB_NO_RSOCKETS(rrecvmsg)
VIB_NO_RSOCKETS(rsend)
VIB_NO_RSOCKETS(rsendto)
VIB_NO_RSOCKETS(rsendmsg)
VIB_NO_RSOCKETS(rread)
VIB_NO_RSOCKETS(rreadv)
VIB_NO_RSOCKETS(rwrite)
VIB_NO_RSOCKETS(rwritev)
VIB_NO_RSOCKETS(rpoll)
VIB_NO_RSOCKETS(rselect)
VIB_NO_RSOCKETS(rgetpeername)
VIB_NO_RSOCKETS(rgetsockname)
VIB_NO_RSOCKETS(rsetsockopt)
VIB_NO_RSOCKETS(rgetsockopt)
VIB_NO_RSOCKETS(rfcntl)
VIB_NO_RSOCKETS(riomap)
VIB_NO_RSOCKETS(riounmap)
VIB_NO_RSOCKETS(riowrite)
}
