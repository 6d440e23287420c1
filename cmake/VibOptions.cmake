# Build options shared by every component.

option(VIB_WERROR "Treat compiler warnings as errors" ON)
option(VIB_SANITIZE "Build with AddressSanitizer and UndefinedBehaviorSanitizer" OFF)
option(VIB_FUZZ "Build libFuzzer targets (requires clang)" OFF)
option(VIB_TSAN "Build with ThreadSanitizer (not with VIB_SANITIZE)" OFF)

# vib_component_options(<target>): warnings and sanitizers for our own code.
function(vib_component_options target)
  target_compile_options(${target} PRIVATE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion
    -Wformat=2 -Wimplicit-fallthrough
    $<$<COMPILE_LANGUAGE:CXX>:-Wnon-virtual-dtor -Wold-style-cast -Woverloaded-virtual>)
  if(VIB_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

if(VIB_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer
                      -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()

if(VIB_TSAN)
  if(VIB_SANITIZE)
    message(FATAL_ERROR "VIB_TSAN and VIB_SANITIZE exclude each other")
  endif()
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
  # GCC warns that ThreadSanitizer does not model a standalone fence. The
  # fences left (vibif.h's ring barriers, Context::sleep_locked) order vibd's
  # accesses against another domain's, which TSan never sees; threads of one
  # process synchronize through atomics and locks only.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    add_compile_options(-Wno-tsan)
  endif()
endif()

# Fuzzing needs coverage instrumentation in every library the target reaches.
if(VIB_FUZZ)
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()
