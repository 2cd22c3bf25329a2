# ctest's install_and_consume: installs the build tree into a scratch prefix, then configures, builds
# and runs tests/consumer against that prefix, as a user of the installed package would.
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DTORCH_DIR=... -DGENERATOR=... -P run.cmake
foreach(var BUILD_DIR SOURCE_DIR TORCH_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake: pass -D${var}=...")
  endif()
endforeach()

set(scratch ${BUILD_DIR}/consumer)
set(prefix ${scratch}/prefix)

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_and_consume: ${what} failed (${rc}): ${ARGN}")
  endif()
endfunction()

file(REMOVE_RECURSE ${prefix} ${scratch}/run)
run("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})

# TORCH_DIR is <torch>/share/cmake/Torch; its parent is the prefix torch.utils.cmake_prefix_path names.
# The environment's CMAKE_PREFIX_PATH (':'-separated) keeps the list out of CMake's own splitting.
set(ENV{CMAKE_PREFIX_PATH} "${prefix}:${TORCH_DIR}/..")
set(configure_args -S ${SOURCE_DIR} -B ${scratch}/build -G ${GENERATOR})
find_program(CCACHE ccache)
if(CCACHE)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE})
endif()
run("configure" ${CMAKE_COMMAND} ${configure_args})
run("build" ${CMAKE_COMMAND} --build ${scratch}/build)

file(MAKE_DIRECTORY ${scratch}/run)
run("the consumer" ${scratch}/build/consumer ${scratch}/run)
