// Low-bit weight x int8 activation matrix products for x86 CPUs with AVX-512 VNNI.
//
// Weights: per row, blocks of 32 input columns; w = u * d + m with u unsigned codes (4-bit: 0..15, packed two per
// byte; 8-bit: 0..255), d and m fp16 per block. Activations: per token, blocks of 32 quantized to int8 with a
// float scale dx (llama.cpp's Q8 activations), plus xs = dx * sum(xq) per block for the m term:
//   y[t, n] = sum_b d[n,b] dx[t,b] sum_j u[n,b,j] xq[t,b,j] + m[n,b] xs[t,b]
// Byte order inside a pair of blocks (b, b+1), for weights and activations alike:
//   [b: 0-15 | b+1: 0-15 | b: 16-31 | b+1: 16-31]
// so a 4-bit pair (32 packed bytes, byte j = u_j | u_{j+16} << 4) unpacks to one 64-byte vector with two ANDs
// and a shift, and one vpdpbusd multiplies it with the activations. Requires K % 64 == 0.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

static inline __m512i unpack4(const uint8_t* p) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(raw, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Per-pair lane pattern: lanes 0-3 and 8-11 take block 2p, lanes 4-7 and 12-15 block 2p+1.
static inline __m512i pair_index(int p) {
    const int a = 2 * p, b = 2 * p + 1;
    return _mm512_setr_epi32(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b);
}

template <int BITS, int TILE>
static void gemm_rows(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int n0, int n1, int K,
                      const int8_t* XQ, const float* DX, const float* XS, int t0, float* Y, int N) {
    const int nb = K / 32;
    const int row_bytes = K * BITS / 8;
    __m512i idx[8];
    for (int p = 0; p < 8; p++) idx[p] = pair_index(p);
    for (int n = n0; n < n1; n++) {
        const uint8_t* w = W + (size_t)n * row_bytes;
        const uint16_t* d = D + (size_t)n * nb;
        const uint16_t* mn = Mn + (size_t)n * nb;
        __m512 acc[TILE];
        __m512 macc[TILE];
        for (int t = 0; t < TILE; t++) { acc[t] = _mm512_setzero_ps(); macc[t] = _mm512_setzero_ps(); }
        for (int c = 0; c < nb; c += 16) {  // a chunk of up to 16 blocks (8 pairs)
            const int cb = nb - c < 16 ? nb - c : 16;
            const __mmask16 km = (__mmask16)((1u << cb) - 1);
            const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, d + c));
            const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, mn + c));
            __m512 ds[TILE];
            for (int t = 0; t < TILE; t++) {
                ds[t] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(km, DX + (size_t)(t0 + t) * nb + c));
                macc[t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(km, XS + (size_t)(t0 + t) * nb + c), macc[t]);
            }
            for (int p = 0; p < cb / 2; p++) {
                const int b = c + 2 * p;
                __m512i wv;
                if (BITS == 4) wv = unpack4(w + b * 16);
                else wv = _mm512_loadu_si512((const void*)(w + b * 32));
                for (int t = 0; t < TILE; t++) {
                    const __m512i xv = _mm512_loadu_si512((const void*)(XQ + (size_t)(t0 + t) * K + b * 32));
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                    const __m512 s = _mm512_permutexvar_ps(idx[p], ds[t]);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[t]);
                }
            }
        }
        for (int t = 0; t < TILE; t++)
            Y[(size_t)(t0 + t) * N + n] = _mm512_reduce_add_ps(acc[t]) + _mm512_reduce_add_ps(macc[t]);
    }
}

template <int BITS>
static void gemm(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, const int8_t* XQ,
                 const float* DX, const float* XS, int M, float* Y, int threads) {
    // rows split across threads; tokens in tiles of 4 reuse each unpacked weight vector
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int chunk = 0; chunk < (N + 15) / 16; chunk++) {
        const int n0 = chunk * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
        int t = 0;
        for (; t + 4 <= M; t += 4) gemm_rows<BITS, 4>(W, D, Mn, n0, n1, K, XQ, DX, XS, t, Y, N);
        for (; t < M; t++) gemm_rows<BITS, 1>(W, D, Mn, n0, n1, K, XQ, DX, XS, t, Y, N);
    }
}

extern "C" {

// x: fp32 [M, K] -> xq int8 [M, K] (pair order), dx and xs fp32 [M, K/32]
void quantize_act(const float* x, int M, int K, int8_t* xq, float* dx, float* xs, int threads) {
    const int nb = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int t = 0; t < M; t++) {
        for (int b = 0; b < nb; b++) {
            const float* v = x + (size_t)t * K + b * 32;
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = amax / 127.0f;
            const float id = d > 0 ? 1.0f / d : 0.0f;
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
            int8_t* out = xq + (size_t)t * K + (b & ~1) * 32 + (b & 1) * 16;
            _mm_storeu_si128((__m128i*)out, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i*)(out + 32), _mm512_cvtsepi32_epi8(q1));
            dx[(size_t)t * nb + b] = d;
            xs[(size_t)t * nb + b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    }
}

void gemm_q4(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, const int8_t* XQ,
             const float* DX, const float* XS, int M, float* Y, int threads) {
    gemm<4>(W, D, Mn, N, K, XQ, DX, XS, M, Y, threads);
}

void gemm_q8(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, const int8_t* XQ,
             const float* DX, const float* XS, int M, float* Y, int threads) {
    gemm<8>(W, D, Mn, N, K, XQ, DX, XS, M, Y, threads);
}

// One call per linear layer: quantize the activations (into per-thread scratch), then the product.
void linear(const float* x, int M, int K, const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int bits,
            float* Y, int threads) {
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, xs;
    const size_t nb = (size_t)M * (K / 32);
    if (xq.size() < (size_t)M * K) xq.resize((size_t)M * K);
    if (dx.size() < nb) { dx.resize(nb); xs.resize(nb); }
    quantize_act(x, M, K, xq.data(), dx.data(), xs.data(), threads);
    if (bits == 4) gemm<4>(W, D, Mn, N, K, xq.data(), dx.data(), xs.data(), M, Y, threads);
    else gemm<8>(W, D, Mn, N, K, xq.data(), dx.data(), xs.data(), M, Y, threads);
}

}
