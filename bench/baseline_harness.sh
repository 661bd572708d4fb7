#!/usr/bin/env bash
# Builds the TF-free CUDA harness of an earlier commit, for the A/B step of
# bench/gpu_session.sh (which times it interleaved with the current build):
#
#   bash bench/baseline_harness.sh 9ef6bd8 [90a]   # -> build/gpu/baseline-9ef6bd8.so
#
# then carry that file to the GPU machine and name it in
# $MASKED_OPS_CUDA_HARNESS_BASELINE. The second argument is the CUDA
# architecture (default 90a: Hopper, with the wgmma kernels where the commit
# has them; 80 for an A100). Builds on a machine with
# nvcc and no GPU; the harness is a plain C library, so it loads there.
set -euo pipefail
cd "$(dirname "$0")/.."
commit="${1:?usage: baseline_harness.sh COMMIT [ARCH]}"
arch="${2:-90a}"
tree="$(mktemp -d)/tree"
git worktree add --detach "$tree" "$commit" > /dev/null
trap 'git worktree remove --force "$tree"' EXIT
cmake -S "$tree" -B "$tree/build" -G Ninja -DMASKED_OPS_TF=OFF -DMASKED_OPS_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${arch}-real" > /dev/null
cmake --build "$tree/build" --target masked_ops_cuda_harness -j "$(nproc)" > /dev/null
mkdir -p build/gpu
cp "$tree/build/libmasked_ops_cuda_harness.so" "build/gpu/baseline-${commit}.so"
echo "build/gpu/baseline-${commit}.so"
