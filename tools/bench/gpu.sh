#!/usr/bin/env bash
# The gateway's GPU checks in one run, for a machine with an NVIDIA GPU, PyTorch and no network
# (tools/bench/gpu-prepare.sh makes CARRY; docs/benchmarks.md, "Gateway on a GPU"):
#
#   tools/bench/gpu.sh CARRY OUT
#
# CARRY holds what was built elsewhere: `bench-gateway.xz`, `conformance.xz` and
# `refine-unit.xz` (release builds with `--features cuda`; optionally `bench-gateway-base.xz`, an
# earlier build to compare against in the same run), `tokenizer/` (the CLIP tokenizer folder of a model made by
# onnx/make_fullsize_sd15.py), `wheels/` (diffusers and importlib_metadata, which the
# machine's Python lacks) and `built-at` (the repository root the binaries were built in). OUT receives the logs and the benchmark rows.
#
# 0. the refine crate's CUDA kernels against candle's composition on the GPU, one test per
#    kernel; only those that pass are used for the rest (DIFFUSIONX_CUDA_KERNELS, kernels.txt);
# 1. the conformance test on the GPU: candle in f16 against diffusers' f32 references on the tiny
#    committed fixtures;
# 2. full-size random-weight SD v1.5 made there (onnx/make_fullsize_sd15.py);
# 3. bench-gateway --device cuda, with diffusers on the same GPU in the same run (and the UNet
#    calls of bench-gateway-base, when CARRY has it, into benchmarks-base.md);
# 4. with PROFILE=1, Nsight Compute's time of every kernel of one batched UNet call (8 jobs, 16
#    rows), summed by kernel name (ncu-kernels.txt).
set -uo pipefail
carry=$(realpath "$1")
out=$(realpath "$2")
repo=$(pwd)
mkdir -p "$out" /tmp/dx
step() { echo "== $(date +%T) $*"; }

step GPU
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"

step "Python packages"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$carry"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site

step "CUDA runtime libraries"
libs=""
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    found=$(find /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
    echo "$lib: ${found:-NOT FOUND}"
    [ -n "$found" ] && libs="$libs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for b in bench-gateway conformance refine-unit bench-gateway-base; do
    [ -e "$carry/$b.xz" ] || continue
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$carry/$b.xz" "/tmp/dx/$b" && chmod +x "/tmp/dx/$b"
done
ldd /tmp/dx/bench-gateway | grep -E "not found|cuda|cublas|curand|nvrtc"

# The binaries find the fixtures and diffusers_bench.py through the path they were built at.
built_at=$(cat "$carry/built-at")
if [ -n "$built_at" ] && [ ! -e "$built_at" ]; then
    mkdir -p "$(dirname "$built_at")" && ln -s "$repo" "$built_at"
fi
echo "built at: $built_at"

step "the crate's CUDA kernels against candle"
kept=""
for pair in add:add_matches_candle group_norm:group_norm_matches_candle \
    geglu:geglu_matches_candle softmax:softmax_matches_candle \
    im2col:im2col_convolution_matches_candle; do
    if /tmp/dx/refine-unit --exact "fused::tests::on_cuda::${pair#*:}" --nocapture \
        >> "$out/kernels.log" 2>&1; then
        kept="$kept,${pair%%:*}"
    fi
done
export DIFFUSIONX_CUDA_KERNELS=${kept#,}
[ -n "$DIFFUSIONX_CUDA_KERNELS" ] || export DIFFUSIONX_CUDA_KERNELS=none
echo "kernels that match candle, used below: $DIFFUSIONX_CUDA_KERNELS" | tee "$out/kernels.txt"
grep -E "max diff|panicked|test result" "$out/kernels.log"

step "conformance on the GPU (f16 against f32 diffusers)"
# Only the CUDA test: the f32 and CPU f16 ones run in CI.
/tmp/dx/conformance --exact every_reference_case_matches_diffusers_on_cuda_in_f16 --nocapture \
    2>&1 | tee "$out/conformance.log"

step "full-size random-weight SD v1.5"
python3 onnx/make_fullsize_sd15.py --out /tmp/sd15-full --tokenizer "$carry/tokenizer" \
    --threads "$(nproc)" 2>&1 | tail -6 | tee "$out/model.log"

step "bench-gateway --device cuda"
cp docs/benchmarks.md "$out/benchmarks.md"
/tmp/dx/bench-gateway --model /tmp/sd15-full --name "SD v1.5 layout, full size, random weights" \
    --device cuda --latent 64 --repeat 3 --python python3 --out "$out/benchmarks.md" \
    2>&1 | tee "$out/bench.log"
if [ -x /tmp/dx/bench-gateway-base ]; then
    step "the baseline build's UNet calls, same GPU"
    cp docs/benchmarks.md "$out/benchmarks-base.md"
    DIFFUSIONX_CUDA_KERNELS=none /tmp/dx/bench-gateway-base --model /tmp/sd15-full \
        --name "baseline build" --device cuda --latent 64 --sections unet --repeat 3 \
        --python "" --out "$out/benchmarks-base.md" 2>&1 | tee "$out/bench-base.log"
fi
if [ "${PROFILE:-0}" = 1 ]; then
    step "kernel times of one 8-job UNet call (ncu)"
    ncu=$(command -v ncu || find /opt/nvidia /usr/local -name ncu -type f 2>/dev/null | head -1)
    # The bench's unet section runs a warm-up call and one timed call; the 2nd call is profiled.
    "$ncu" --metrics gpu__time_duration.sum --csv --log-file "$out/ncu.csv" \
        /tmp/dx/bench-gateway --model /tmp/sd15-full --name profile --device cuda --latent 64 \
        --sections unet --concurrency 8 --repeat 1 --python "" --out /tmp/profile.md \
        > "$out/ncu-run.log" 2>&1
    tail -3 "$out/ncu-run.log"
    python3 tools/bench/ncu_summary.py "$out/ncu.csv" | tee "$out/ncu-kernels.txt"
fi
step done
tail -n 40 "$out/benchmarks.md"
