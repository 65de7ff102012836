// CUDA kernels of the model, compiled to PTX by build.rs under the `cuda` feature.
//
// nf4_dequant_*: NF4 weights (bitsandbytes layout: blocks of 64, two codes per byte, first value
// in the high nibble) to f32 or bf16, with plain or double-quantised absmax. The arithmetic is
// the CPU path's, operation for operation (no fused multiply-add), so both produce the same bits.
//
// dropout_mask_*: LoRA dropout masks drawn on the GPU from a counter-based hash of (seed, index),
// so a mask needs no host round trip and replays exactly from its seed.

#include <cuda_bf16.h>
#include <stdint.h>

#define NF4_BLOCK 64
#define ABSMAX_BLOCK 256

// codes: the 16 NF4 values, then the 256 values of the dynamic 8-bit code (double quant only).
__device__ __forceinline__ float nf4_block_scale(uint32_t block, const float *absmax,
                                                 const uint8_t *absmax_q, const float *absmax2,
                                                 const float *codes, float offset) {
    if (absmax_q == nullptr) {
        return absmax[block];
    }
    float c = codes[16 + absmax_q[block]];
    return __fadd_rn(__fmul_rn(c, absmax2[block / ABSMAX_BLOCK]), offset);
}

// One thread per packed byte; n is the number of values (the last byte may hold only one).
extern "C" __global__ void nf4_dequant_f32(const uint8_t *__restrict__ packed,
                                           const float *__restrict__ absmax,
                                           const uint8_t *__restrict__ absmax_q,
                                           const float *__restrict__ absmax2,
                                           const float *__restrict__ codes, float offset,
                                           float *__restrict__ out, uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t first = 2 * i;
    if (first >= n) {
        return;
    }
    uint8_t byte = packed[i];
    float m = nf4_block_scale((uint32_t)(first / NF4_BLOCK), absmax, absmax_q, absmax2, codes,
                              offset);
    float hi = __fmul_rn(codes[byte >> 4], m);
    float lo = __fmul_rn(codes[byte & 0x0f], m);
    if (first + 1 < n) {
        reinterpret_cast<float2 *>(out)[i] = make_float2(hi, lo);
    } else {
        out[first] = hi;
    }
}

extern "C" __global__ void nf4_dequant_bf16(const uint8_t *__restrict__ packed,
                                            const float *__restrict__ absmax,
                                            const uint8_t *__restrict__ absmax_q,
                                            const float *__restrict__ absmax2,
                                            const float *__restrict__ codes, float offset,
                                            __nv_bfloat16 *__restrict__ out, uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t first = 2 * i;
    if (first >= n) {
        return;
    }
    uint8_t byte = packed[i];
    float m = nf4_block_scale((uint32_t)(first / NF4_BLOCK), absmax, absmax_q, absmax2, codes,
                              offset);
    __nv_bfloat16 hi = __float2bfloat16_rn(__fmul_rn(codes[byte >> 4], m));
    __nv_bfloat16 lo = __float2bfloat16_rn(__fmul_rn(codes[byte & 0x0f], m));
    if (first + 1 < n) {
        __nv_bfloat162 pair;
        pair.x = hi;
        pair.y = lo;
        reinterpret_cast<__nv_bfloat162 *>(out)[i] = pair;
    } else {
        out[first] = hi;
    }
}

// splitmix64's finaliser: a well-mixed 64-bit value per (seed, index).
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Keep with probability keep_prob: the top 24 bits as a uniform in [0, 1).
__device__ __forceinline__ bool keep_at(uint64_t seed, uint64_t i, float keep_prob) {
    uint64_t h = mix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull);
    return (float)(h >> 40) * (1.0f / 16777216.0f) < keep_prob;
}

extern "C" __global__ void dropout_mask_f32(uint64_t seed, float keep_prob, float scale,
                                            float *__restrict__ out, uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = keep_at(seed, i, keep_prob) ? scale : 0.0f;
    }
}

extern "C" __global__ void dropout_mask_bf16(uint64_t seed, float keep_prob, float scale,
                                             __nv_bfloat16 *__restrict__ out, uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = __float2bfloat16_rn(keep_at(seed, i, keep_prob) ? scale : 0.0f);
    }
}
