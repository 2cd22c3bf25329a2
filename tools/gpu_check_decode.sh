#!/usr/bin/env bash
# One GPU call for the decode path with carried programs (tools/carry_build.sh): the CUDA tests that
# cover it, a compute-sanitizer memcheck of the new and overlapped kernels, then tools/gpu_decode_ab.sh.
#   tools/gpu_check_decode.sh OUT_DIR [BATCHES] [ROUNDS]
set -uo pipefail
out=${1:?usage: tools/gpu_check_decode.sh OUT_DIR [BATCHES] [ROUNDS]}
bin=build-carry
export LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")'):$PWD/$bin
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cat $bin/COMMIT
run() { local name=$1; shift; timeout 240 "$@" >"$out/$name.log" 2>&1; echo "$name: exit $? $(grep -E '^\[  (PASSED|FAILED) ' "$out/$name.log" | tr '\n' ' ')"; grep -E '^\[  FAILED  \] [A-Z]' "$out/$name.log" | head -20; }
run ops $bin/test_cuda_ops --gtest_brief=1 --gtest_filter='CudaAddRmsNorm*:CudaSmallBatchLinear*:CudaDecode*' &
run mixer $bin/test_cuda_mixer_step --gtest_brief=1 &
run graph $bin/test_cuda_graph_decoder --gtest_brief=1 &
wait
STATEMAMBA_OVERLAP=0 run graph_no_overlap $bin/test_cuda_graph_decoder --gtest_brief=1
run modules $bin/test_modules --gtest_brief=1 --gtest_filter='Continuation.*:*Step*:*Decode*'
run memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $bin/test_cuda_ops --gtest_brief=1 \
  --gtest_filter='CudaAddRmsNormLinear*:CudaSmallBatchLinear.Large*'
run memcheck2 compute-sanitizer --tool memcheck --error-exitcode 9 $bin/test_cuda_mixer_step --gtest_brief=1 \
  --gtest_filter='MixerStepCudaOnly.*'
grep "ERROR SUMMARY" "$out"/memcheck*.log
tools/gpu_decode_ab.sh $bin "$out/ab" "${2:-1,2,4,64,256}" "${3:-2}"
