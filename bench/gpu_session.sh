#!/usr/bin/env bash
# One call on a lent GPU machine (no TensorFlow there; PyTorch, CMake, ninja,
# nvcc and compute-sanitizer are): builds the TF-free harness for the GPU at
# hand, runs tests/gpu, compute-sanitizer on a subset that covers every
# kernel family (the pipelined ones included), and bench/gpu.py, writing
# every log and the bench JSON under $OUT (default: /tmp/masked_ops_gpu_session).
#
#   bash bench/gpu_session.sh            # all of it (about 2 minutes on an H100)
#   bash bench/gpu_session.sh tests      # build + tests/gpu + compute-sanitizer
#   bash bench/gpu_session.sh bench      # build + bench/gpu.py (a small batch, dx and dW apart, the conv's too,
#                                        # tall tiles)
#   bash bench/gpu_session.sh profile    # build + ncu on the bf16 block-32 forward, d=1, 0.5 and 0.1, both tiles
#   bash bench/gpu_session.sh ab         # build + the current harness against each baseline
#
# ab (also part of "all" when a baseline is given) times each harness named in
# $MASKED_OPS_CUDA_HARNESS_BASELINE (colon-separated; each built here by
# bench/baseline_harness.sh from an earlier commit, and carried) interleaved
# with the current one in the same process, since cuBLAS itself was seen to
# run 25 % slower in one process than in the next on the same card.
#
# A harness built elsewhere for this GPU (it is a plain C library, so one built
# with nvcc 13 on a CPU-only machine loads there) is used when
# $MASKED_OPS_CUDA_HARNESS names it and it loads; otherwise it is built here.
# Every step has its own time limit, so that a hung kernel costs one step, not
# the lease. The last lines printed are a summary, since the device tool
# returns the end of the output. Notes on what each run showed:
# bench/GPU_NOTES.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/masked_ops_gpu_session}"
mkdir -p "$out"
what="${1:-all}"
export PYTHONUNBUFFERED=1
summary=()
# Each summary line is also appended to $out/summary.txt as it happens, so
# that a call cut off by its time limit still brings back how far it got.
note() { summary+=("$1"); echo "$1" >> "$out/summary.txt"; }

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
# Hopper's code as sm_90a, which the warpgroup (wgmma) kernels need.
[[ "$arch" == 90 ]] && arch=90a
{ nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv; uname -r; } > "$out/build.log"
if [[ -n "${MASKED_OPS_CUDA_HARNESS:-}" ]] &&
   python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$MASKED_OPS_CUDA_HARNESS" >> "$out/build.log" 2>&1; then
  note "harness: prebuilt $MASKED_OPS_CUDA_HARNESS"
else
  unset MASKED_OPS_CUDA_HARNESS
  cmake -S . -B build/gpu -G Ninja -DMASKED_OPS_TF=OFF -DMASKED_OPS_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${arch}-real" >> "$out/build.log" 2>&1 &&
    cmake --build build/gpu --target masked_ops_cuda_harness -j "$(nproc)" >> "$out/build.log" 2>&1
  note "build (sm_${arch}): rc $?"
fi

if [[ "$what" == all || "$what" == tests ]]; then
  # Single tensor copies first, then the warpgroup products, each in a
  # process of their own: a kernel that faults would otherwise fail every
  # test after it in the same CUDA context, and one that hangs costs a
  # shorter limit. A probe failure says whether the products' failures are
  # the tensor copies'.
  echo "== tests/gpu/test_warpgroup_tensor_copies.py" > "$out/gpu-test.log"
  timeout -s KILL 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_warpgroup_tensor_copies.py \
    >> "$out/gpu-test.log" 2>&1
  note "tensor-copy probe: rc $?, $(tail -1 "$out/gpu-test.log")"
  echo "== tests/gpu -k 'warpgroup and not tensor_copies'" >> "$out/gpu-test.log"
  timeout -s KILL 90 python3 -m pytest -q -p no:cacheprovider tests/gpu -k "warpgroup and not tensor_copies" \
    >> "$out/gpu-test.log" 2>&1
  warpgroup_tests_rc=$?
  note "tests/gpu -k 'warpgroup and not tensor_copies': rc $warpgroup_tests_rc, $(tail -1 "$out/gpu-test.log")"
  echo "== tests/gpu -k 'not warpgroup'" >> "$out/gpu-test.log"
  timeout -s KILL 150 python3 -m pytest -q -p no:cacheprovider tests/gpu -k "not warpgroup" >> "$out/gpu-test.log" 2>&1
  note "tests/gpu -k 'not warpgroup': $(tail -1 "$out/gpu-test.log")"
  # One pipelined matmul (all three products) and conv case per kind of
  # mask, a WMMA and a CUDA-core case, the warpgroup products (whole list
  # and split) and conv forward, and the elementwise kernels; memcheck also
  # runs a conv whose forward lists split (a 256-channel input: too slow for
  # racecheck's time here).
  split_conv='or (test_conv_products_match_reference and 2x16x16x256 and bfloat16 and tensor-cores and b32x48
    and block and output-mask)'
  subset='(test_products_match_reference and 300x200x136 and 0.3 and block and bfloat16 and tensor-cores)
    or (test_products_match_reference and 257x96x160 and 0.3 and element and float32)
    or (test_conv_products_match_reference and 2x14x13x32 and bfloat16 and tensor-cores and b16x16)
    or (test_conv_products_match_reference and 1x15x14x24 and float16 and tensor-cores and b32x48 and block)
    or (test_nan_in_inputs and bfloat16 and tensor-cores and b32x32)
    or (test_warpgroup_products_match_reference and 300x200x136 and 0.3 and bfloat16)
    or (test_warpgroup_products_match_reference and 8x4160x16 and 0.3 and torch.float16)
    or (test_warpgroup_conv_forward_matches_reference and b16x64 and output-mask and bfloat16)
    or (test_warpgroup_tall_tiles_match_reference and 300x256x512 and 0.1)
    or test_types_match_the_product_and_sum or test_adam_step'
  for tool in memcheck racecheck synccheck; do
    selected="$subset"
    [[ "$tool" == memcheck ]] && selected="$subset $split_conv"
    {
      echo "== $tool"
      timeout -s KILL 60 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        python3 -m pytest -q -p no:cacheprovider tests/gpu -k "$(echo $selected)" 2>&1 | tail -60
      echo "$tool rc ${PIPESTATUS[0]}"
    } >> "$out/compute-sanitizer.log"
    note "$(grep "$tool rc" "$out/compute-sanitizer.log" | tail -1)"
  done
fi

# The warpgroup tile is timed and profiled only where its tests passed or
# were all skipped (pytest's 5: no sm_90a) in this session, or did not run
# (a faulting or hanging kernel would take the rest of a step with it).
skip_warpgroup=()
if [[ "${warpgroup_tests_rc:-0}" != 0 && "${warpgroup_tests_rc:-0}" != 5 ]]; then
  skip_warpgroup=(--no-warpgroup)
fi

if [[ "$what" == all || "$what" == bench ]]; then
  timeout -s KILL 240 python3 bench/gpu.py --conv ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} --json "$out/gpu.json" > "$out/bench.log" 2>&1
  note "bench/gpu.py: rc $?"
  # Inference: a small batch, where the forward product splits its lists.
  echo "== small batch" >> "$out/bench.log"
  timeout -s KILL 45 python3 bench/gpu.py --shape 32x4096x4096 --precisions bf16 --modes forward --blocks 32,64 \
    ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} >> "$out/bench.log" 2>&1
  note "bench/gpu.py small batch: rc $?"
  # dx and dW apart, each on both tiles: which of them the warpgroup tile
  # loses below density 1 (bench/GPU_NOTES.md, session 9).
  echo "== dx and dW apart" >> "$out/bench.log"
  timeout -s KILL 60 python3 bench/gpu.py --precisions bf16 --densities 1,0.5,0.1 --modes grad_input,grad_weight \
    ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} >> "$out/bench.log" 2>&1
  note "bench/gpu.py dx and dW apart: rc $?"
  # The conv's dx and dW apart (bf16, both layers, every density and active
  # fraction), against cuDNN's own dx and dW calls: session 13's tile-order
  # backward under output masks (bench/GPU_NOTES.md).
  echo "== conv dx and dW apart" >> "$out/bench.log"
  timeout -s KILL 90 python3 bench/gpu.py --conv-only --precisions bf16 --modes grad_input,grad_weight \
    ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} >> "$out/bench.log" 2>&1
  note "bench/gpu.py conv dx and dW apart: rc $?"
  # The forward product and dx in tall tiles (256 x 128) beside the
  # warpgroup tile's 128 x 128 (bench/GPU_NOTES.md, session 11).
  echo "== tall tiles" >> "$out/bench.log"
  timeout -s KILL 60 python3 bench/gpu.py --precisions bf16 --blocks 32,64 --densities 1,0.5,0.1 \
    --modes forward,grad_input --tall ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} >> "$out/bench.log" 2>&1
  note "bench/gpu.py tall tiles: rc $?"
  python3 bench/gpu.py --summary "$out/gpu.json" 2>&1 | tail -40
fi

if [[ ( "$what" == all || "$what" == ab ) && -n "${MASKED_OPS_CUDA_HARNESS_BASELINE:-}" ]]; then
  IFS=: read -r -a baselines <<< "$MASKED_OPS_CUDA_HARNESS_BASELINE"
  for baseline in "${baselines[@]}"; do
    echo "== against $baseline" >> "$out/ab.log"
    timeout -s KILL 120 python3 bench/gpu.py --precisions bf16 --blocks 32,64 --densities 1,0.5,0.1 \
      --modes forward,train --conv --baseline-harness "$baseline" ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} \
      >> "$out/ab.log" 2>&1
    ab_rc=$?  # before the note's own command substitution resets $?
    note "bench/gpu.py against $(basename "$baseline"): rc $ab_rc"
  done
fi

if [[ "$what" == all || "$what" == profile ]]; then
  # The pipelined and warpgroup forward, dense, at half density (where the
  # warpgroup tile took as long as dense in session 9) and where the sparse
  # targets meet the L2 floor (bench/GPU_NOTES.md): L2 reads, tensor-pipe
  # use, issue, occupancy and where the warps stall. Two launches of each
  # kernel and density (warm-up and timed): per density 2 pipelined launches
  # and 2 x 2 warpgroup ones (its whole-tile and partly-live launches).
  timeout -s KILL 180 ncu --clock-control none --kernel-name 'regex:PipelinedProduct|WarpgroupProduct' -c 18 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis \
    --metrics lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum,gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
    python3 bench/gpu.py --densities 1,0.5,0.1 --blocks 32 --precisions bf16 --modes forward --reps 1 --warmup 1 \
    ${skip_warpgroup[@]+"${skip_warpgroup[@]}"} > "$out/ncu.txt" 2>&1
  note "ncu: rc $?"
fi

printf '%s\n' "${summary[@]}"
