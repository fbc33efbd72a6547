# ctest driver: configure, build and run the consumer project one way.
#   cmake -DMODE=<see CMakeLists.txt> -DSOURCE_DIR=... -DBUILD_DIR=... -DWORK_DIR=...
#         -DTORCH_DIR=<Torch_DIR of the build> -DTORCH_VERSION=<its version> -P run.cmake
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer (${MODE}): command failed (${rc}): ${ARGN}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(args -S ${SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/build -DCMAKE_BUILD_TYPE=Release
    -DTORCHFUNC_USE=${MODE} -DTORCHFUNC_EXPECT_TORCH_VERSION=${TORCH_VERSION})
find_program(CCACHE ccache)
if(CCACHE)
  list(APPEND args -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE})
endif()
if(MODE STREQUAL "find_package")
  # Only torchfunc's prefix: its config must find the libtorch it was built
  # with by itself (even with another libtorch installed on the system).
  run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
  list(APPEND args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  # What users pass: the folder above Torch's config (for the torch wheel,
  # torch.utils.cmake_prefix_path).
  get_filename_component(torch_prefix ${TORCH_DIR}/.. ABSOLUTE)
  list(APPEND args -DTORCHFUNC_SOURCE_DIR=${SOURCE_DIR} -DCMAKE_PREFIX_PATH=${torch_prefix})
endif()
run(${CMAKE_COMMAND} ${args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build -j2)
run(${WORK_DIR}/build/consumer)
