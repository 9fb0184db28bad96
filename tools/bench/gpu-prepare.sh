#!/usr/bin/env bash
# Prepares what tools/bench/gpu.sh needs on a machine with an NVIDIA GPU but no Rust and no
# network, from a build machine with neither a GPU nor a CUDA toolkit (only PyPI):
#
#   tools/bench/gpu-prepare.sh TOOLKIT CARRY [PYTHON]
#
# 1. TOOLKIT: a CUDA 13.0 toolkit assembled from NVIDIA's pip wheels (nvcc, headers, cuBLAS,
#    cuRAND, NVRTC, the runtime) with a stub libcuda.so to link against (the real one comes with
#    the driver on the GPU machine), and TOOLKIT/env.sh to source for the build;
# 2. release builds of bench-gateway, the refine crate's conformance test and unit tests with
#    `--features cuda` for compute capability 9.0 (H100/H200; set CUDA_COMPUTE_CAP to change),
#    stripped and xz-compressed into CARRY;
# 3. CARRY/tokenizer (the CLIP tokenizer of a model made by onnx/make_fullsize_sd15.py, from
#    SD15_MODEL, default models/sd15-full), CARRY/wheels (diffusers, importlib_metadata) and
#    CARRY/built-at.
#
# PYTHON (default python3) needs pip. Then, on the GPU machine: tools/bench/gpu.sh CARRY OUT.
set -euo pipefail
toolkit=$(realpath -m "$1")
carry=$(realpath -m "$2")
python=${3:-python3}
repo=$(pwd)
mkdir -p "$toolkit/wheels" "$carry/wheels"

echo "== CUDA 13.0 from pip wheels into $toolkit"
"$python" -m pip download -q --no-deps -d "$toolkit/wheels" "nvidia-cuda-nvcc==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*" \
    "nvidia-cuda-nvrtc==13.0.*"
for w in "$toolkit"/wheels/*.whl; do unzip -q -o "$w" -d "$toolkit/site"; done
home="$toolkit/site/nvidia/cu13"
chmod +x "$home"/bin/* "$home"/nvvm/bin/*
(
    cd "$home/lib"
    for l in libcublas libcublasLt libcudart libnvrtc; do ln -sf "$l.so.13" "$l.so"; done
    ln -sf libcurand.so.10 libcurand.so
)
ln -sfn lib "$home/lib64"
# A stub driver library exporting every entry point cuda.h declares (after its version macros),
# so the linker resolves them; the binary loads the driver's own libcuda.so.1 at run time.
{
    gcc -E -P -I "$home/include" "$home/include/cuda.h" |
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*($//'
    grep -oE '^#define cu[A-Za-z0-9_]+ ' "$home/include/cuda.h" | awk '{print $2}'
} | sort -u | awk '{print "void " $1 "(void) {}"}' > "$toolkit/cuda_stub.c"
gcc -shared -fPIC -o "$home/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$toolkit/cuda_stub.c"
ln -sf libcuda.so "$home/lib/libcuda.so.1"
cat > "$toolkit/env.sh" <<EOF
export CUDA_HOME=$home
export PATH=$home/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export LD_LIBRARY_PATH=$home/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
# shellcheck source=/dev/null
. "$toolkit/env.sh"
nvcc --version | tail -1

echo "== release builds with --features cuda"
cargo build --release -p diffusionx-bench --features cuda --bin bench-gateway
# The test executables of the refine crate: the conformance test and the unit tests (the
# crate's CUDA kernels against candle on the GPU).
test_exe() {
    cargo test --release -p diffusionx-refine --features cuda "$@" --no-run \
        --message-format=json | grep -o '"executable":"[^"]*"' | tail -1 |
        sed 's/"executable":"\(.*\)"/\1/'
}
conformance=$(test_exe --test conformance)
kernels=$(test_exe --lib)
target=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' |
    sed 's/"target_directory":"\(.*\)"/\1/')
for pair in "$target/release/bench-gateway:bench-gateway" "$conformance:conformance" \
    "$kernels:refine-unit"; do
    # Stripped and xz-compressed: the device tool carries 64 MiB with the working tree.
    strip --strip-all -o "$toolkit/${pair##*:}" "${pair%%:*}"
    xz -9 -T0 -c "$toolkit/${pair##*:}" > "$carry/${pair##*:}.xz"
done

echo "== tokenizer, wheels"
rm -rf "$carry/tokenizer"
cp -r "${SD15_MODEL:-models/sd15-full}/tokenizer" "$carry/tokenizer"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$carry/wheels" \
    diffusers==0.42.1 importlib_metadata
echo "$repo" > "$carry/built-at"
du -sh "$carry"
