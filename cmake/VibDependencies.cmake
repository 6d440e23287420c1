# Every external dependency is found here, with pkg-config, so the whole tree
# agrees on one set of imported targets (PkgConfig::<name>).
find_package(PkgConfig REQUIRED)

pkg_check_modules(xenstore REQUIRED IMPORTED_TARGET xenstore)
pkg_check_modules(xenevtchn REQUIRED IMPORTED_TARGET xenevtchn)
pkg_check_modules(xengnttab REQUIRED IMPORTED_TARGET xengnttab)
pkg_check_modules(xenforeignmemory REQUIRED IMPORTED_TARGET xenforeignmemory)
pkg_check_modules(xencontrol REQUIRED IMPORTED_TARGET xencontrol)
pkg_check_modules(xenlight REQUIRED IMPORTED_TARGET xenlight)
pkg_check_modules(xlutil REQUIRED IMPORTED_TARGET xlutil)
pkg_check_modules(libibverbs REQUIRED IMPORTED_TARGET libibverbs)
# Guests get vib's own librdmacm.so.1 (frontend-lib/rdmacm), built against
# this header; vibd links the host's, to reach peers outside vib.
pkg_check_modules(librdmacm REQUIRED IMPORTED_TARGET librdmacm)
# libibumad's header only: vib builds its own libibumad.so.3 (frontend-lib/umad).
pkg_check_modules(libibumad REQUIRED libibumad)
pkg_check_modules(yajl REQUIRED IMPORTED_TARGET yajl)
pkg_check_modules(libsystemd IMPORTED_TARGET libsystemd)

find_package(Threads REQUIRED)
if(BUILD_TESTING)
  find_package(GTest REQUIRED)
endif()
