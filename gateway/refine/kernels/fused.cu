// The refine crate's own CUDA kernels (docs/gateway.md, "Kernels on the GPU"): the UNet's
// element-wise and normalisation work fused into one pass each, in place of candle 0.11.1's
// generic strided kernels (whose 64-bit index arithmetic per element made broadcasts, im2col
// and softmax 70% of an f16 UNet call's kernel time on an H100).
//
// Every kernel computes in f32 and rounds once to the output type. Built to PTX by build.rs
// with the toolkit's nvcc when the crate's `cuda` feature is on; loaded by src/cuda.rs.
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float *p, uint32_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half *p, uint32_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float *p, uint32_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half *p, uint32_t i, float v) { p[i] = __float2half_rn(v); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ float block_sum(float v, float *shared) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_max(float v, float *shared) {
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// y[i] = x[i] + v[(i / inner) % period]: a per-channel bias of NCHW (inner = h*w, period = c),
// of a linear layer's rows (inner = 1, period = c), or a per-(row, channel) term such as the
// time embedding (inner = h*w, period = n*c).
template <typename T>
__device__ void add_broadcast(const T *x, const T *v, T *y, uint32_t n, uint32_t inner,
                              uint32_t period) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        store(y, i, load(x, i) + load(v, (i / inner) % period));
    }
}

// GroupNorm over contiguous NCHW, one block per (row, group); the group's `len` elements are
// contiguous (`per_group` channels of `hw` each). Mean, then the variance around it (two passes
// in f32, as candle's composition), then the affine map, then optionally SiLU.
template <typename T>
__device__ void group_norm(const T *x, const T *weight, const T *bias, T *y, uint32_t len,
                           uint32_t hw, uint32_t per_group, uint32_t groups, float eps, int silu) {
    __shared__ float shared[32];
    const uint32_t block = blockIdx.x;
    const T *xs = x + (size_t)block * len;
    T *ys = y + (size_t)block * len;
    const uint32_t first_channel = (block % groups) * per_group;
    float sum = 0.0f;
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) sum += load(xs, i);
    const float mean = block_sum(sum, shared) / (float)len;
    float sq = 0.0f;
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = load(xs, i) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, shared) / (float)len + eps);
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
        const uint32_t c = first_channel + i / hw;
        float v = (load(xs, i) - mean) * rstd * load(weight, c) + load(bias, c);
        if (silu) v = v / (1.0f + expf(-v));
        store(ys, i, v);
    }
}

// GEGLU: x is [rows, 2 * inner] (the projection's two halves side by side), y is [rows, inner]:
// y = x[:, :inner] * gelu(x[:, inner:]) with the exact (erf) GELU.
template <typename T>
__device__ void geglu(const T *x, T *y, uint32_t n, uint32_t inner) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const uint32_t row = i / inner, j = i % inner;
        const float a = load(x, row * 2 * inner + j);
        const float g = load(x, row * 2 * inner + inner + j);
        store(y, i, a * 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)));
    }
}

// im2col for a stride-1, dilation-1 k x k convolution of contiguous NCHW input x [n, c, h, w]
// with `pad` zeros each side: cols [n, c * k * k, ho * wo], the row order of the weights as
// stored ([out, c, k, k]), so that weights x cols is the convolution, already NCHW.
template <typename T>
__device__ void im2col(const T *x, T *cols, uint32_t total, uint32_t c, uint32_t h, uint32_t w,
                       uint32_t k, uint32_t pad, uint32_t ho, uint32_t wo) {
    const uint32_t taps = k * k, positions = ho * wo;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        const uint32_t p = i % positions;
        const uint32_t row = i / positions;  // (b * c + ci) * taps + tap
        const uint32_t tap = row % taps;
        const uint32_t plane = row / taps;  // b * c + ci
        const int yy = (int)(p / wo) + (int)(tap / k) - (int)pad;
        const int xx = (int)(p % wo) + (int)(tap % k) - (int)pad;
        float v = 0.0f;
        if (yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)w) {
            v = load(x, (plane * h + (uint32_t)yy) * w + (uint32_t)xx);
        }
        store(cols, i, v);
    }
}

// Softmax over rows of `cols` elements, one block of SOFTMAX_THREADS per row, in f32. A row of
// up to SOFTMAX_THREADS * SOFTMAX_HELD elements is read once into registers; longer rows are
// read three times.
#define SOFTMAX_THREADS 256
#define SOFTMAX_HELD 16
template <typename T>
__device__ void softmax(const T *x, T *y, uint32_t cols) {
    __shared__ float shared[32];
    const T *xs = x + (size_t)blockIdx.x * cols;
    T *ys = y + (size_t)blockIdx.x * cols;
    if (cols <= SOFTMAX_THREADS * SOFTMAX_HELD) {
        float v[SOFTMAX_HELD];
        float m = -INFINITY;
#pragma unroll
        for (int k = 0; k < SOFTMAX_HELD; k++) {
            const uint32_t i = threadIdx.x + k * SOFTMAX_THREADS;
            v[k] = i < cols ? load(xs, i) : -INFINITY;
            m = fmaxf(m, v[k]);
        }
        m = block_max(m, shared);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < SOFTMAX_HELD; k++) {
            const uint32_t i = threadIdx.x + k * SOFTMAX_THREADS;
            v[k] = i < cols ? expf(v[k] - m) : 0.0f;
            s += v[k];
        }
        const float inv = 1.0f / block_sum(s, shared);
#pragma unroll
        for (int k = 0; k < SOFTMAX_HELD; k++) {
            const uint32_t i = threadIdx.x + k * SOFTMAX_THREADS;
            if (i < cols) store(ys, i, v[k] * inv);
        }
    } else {
        float m = -INFINITY;
        for (uint32_t i = threadIdx.x; i < cols; i += SOFTMAX_THREADS) m = fmaxf(m, load(xs, i));
        m = block_max(m, shared);
        float s = 0.0f;
        for (uint32_t i = threadIdx.x; i < cols; i += SOFTMAX_THREADS) s += expf(load(xs, i) - m);
        const float inv = 1.0f / block_sum(s, shared);
        for (uint32_t i = threadIdx.x; i < cols; i += SOFTMAX_THREADS) {
            store(ys, i, expf(load(xs, i) - m) * inv);
        }
    }
}

#define KERNELS(T, SUFFIX)                                                                      \
    extern "C" __global__ void add_broadcast_##SUFFIX(const T *x, const T *v, T *y, uint32_t n,  \
                                                      uint32_t inner, uint32_t period) {        \
        add_broadcast(x, v, y, n, inner, period);                                               \
    }                                                                                           \
    extern "C" __global__ void group_norm_##SUFFIX(const T *x, const T *weight, const T *bias,  \
                                                   T *y, uint32_t len, uint32_t hw,             \
                                                   uint32_t per_group, uint32_t groups,         \
                                                   float eps, int silu) {                       \
        group_norm(x, weight, bias, y, len, hw, per_group, groups, eps, silu);                  \
    }                                                                                           \
    extern "C" __global__ void geglu_##SUFFIX(const T *x, T *y, uint32_t n, uint32_t inner) {   \
        geglu(x, y, n, inner);                                                                  \
    }                                                                                           \
    extern "C" __global__ void im2col_##SUFFIX(const T *x, T *cols, uint32_t total, uint32_t c, \
                                               uint32_t h, uint32_t w, uint32_t k,              \
                                               uint32_t pad, uint32_t ho, uint32_t wo) {        \
        im2col(x, cols, total, c, h, w, k, pad, ho, wo);                                        \
    }                                                                                           \
    extern "C" __global__ void softmax_##SUFFIX(const T *x, T *y, uint32_t cols) {              \
        softmax(x, y, cols);                                                                    \
    }

KERNELS(float, f32)
KERNELS(__half, f16)
