// H += X^T X for bf16 X with AVX-512 BF16 dot products (VDPBF16PS: pairs of bf16 products summed into fp32
// lanes), for CPUs without AMX (AMD Zen 4/5): calibrate.HessianHook's other kernel, beside gram.cpp.
//
// Without it the Hessians were fp32 GEMMs of the upcast inputs, ~180 GFLOP/s on these 2 cores: a 1.5B layer's
// down_proj Hessian at 64 x 512 tokens (8960^2 x 32768 x 2 flops) alone took ~30 s. The only rounding here is
// fp32's sums, as in an fp32 GEMM (torch's bf16 GEMM rounds its output to bf16, which made Hessians indefinite).
//
// Layout (prepared by the caller, as for gram.cpp): XP [T/2, n, 2], pairs of consecutive tokens side by side, so
// the 32-bit word at (p, c) holds tokens 2p and 2p+1 of channel c. n a multiple of 32, T of 2. Blocks of 8 rows x
// 32 columns of H on or above the diagonal (at 32-column granularity) are computed; the caller mirrors them.

#include <immintrin.h>
#include <stdint.h>

namespace {

constexpr int RB = 8;      // rows of H per micro-tile: 8 x 2 accumulators
constexpr int PAIRS = 512;  // token pairs per pass: a 32-column panel of XP (64 KB) stays in L2

void micro(const uint16_t* XP, int n, int p0, int p1, int i, int j, float* H) {
    __m512 acc[RB][2];
    for (int r = 0; r < RB; r++) {
        acc[r][0] = _mm512_loadu_ps(H + (int64_t)(i + r) * n + j);
        acc[r][1] = _mm512_loadu_ps(H + (int64_t)(i + r) * n + j + 16);
    }
    const int32_t* W = (const int32_t*)XP;  // one 32-bit word per (pair, channel)
    for (int p = p0; p < p1; p++) {
        const int32_t* row = W + (int64_t)p * n;
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(row + j);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(row + j + 16);
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(row[i + r]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm512_storeu_ps(H + (int64_t)(i + r) * n + j, acc[r][0]);
        _mm512_storeu_ps(H + (int64_t)(i + r) * n + j + 16, acc[r][1]);
    }
}

}  // namespace

extern "C" void gram_bf16_avx(const uint16_t* XP, int n, int T, float* H, int threads) {
    const int pairs = T / 2, jblocks = n / 32;
    for (int p0 = 0; p0 < pairs; p0 += PAIRS) {
        const int p1 = p0 + PAIRS < pairs ? p0 + PAIRS : pairs;
        // a column panel per task: its rows 0 .. j+32 (the blocks on or above the diagonal), the panel's XP
        // words read from L2 by every row block
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int jb = jblocks - 1; jb >= 0; jb--) {  // the tallest panels first
            const int j = jb * 32;
            for (int i = 0; i < j + 32; i += RB) micro(XP, n, p0, p1, i, j, H);
        }
    }
}
