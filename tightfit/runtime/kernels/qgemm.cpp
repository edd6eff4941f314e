// Low-bit weight x int8 activation matrix products for x86 CPUs with AVX-512 VNNI.
//
// Weights: per row, blocks of 32 input columns; w = u * d + m with u unsigned codes (4-bit: 0..15, packed two per
// byte; 8-bit: 0..255), d and m fp16 per block. Activations: per token, blocks of 32 quantized to int8 with a
// float scale dx (llama.cpp's Q8 activations), plus xs = dx * sum(xq) per block for the m term:
//   y[t, n] = sum_b d[n,b] dx[t,b] sum_j u[n,b,j] xq[t,b,j] + m[n,b] xs[t,b]
// Byte order: blocks go in quads of 4, each [first halves (elements 0-15) of the 4 | second halves (16-31)]
// for activations and 8-bit weights; 4-bit weights are plain blocks (byte j = u_j | u_{j+16} << 4), which is
// the same order once split into low and high nibbles. When K/32 is not a multiple of 4, the last two blocks
// form a pair [b: 0-15 | b+1: 0-15 | b: 16-31 | b+1: 16-31]. Requires K % 64 == 0.
// Super-block scales (SB, the "k" formats: llama.cpp's K-quants and IQ4_XS): D holds fp16 [2, N, K/256] (d, then
// dmin when SB == 1) and Mn the bytes [2, N, K/32]: int8 scale codes sc, then (SB == 1) unsigned min codes mc;
// block b's scale is d sc_b and its m is dmin mc_b + low * scale (low: the code offset, -8 for sym4, -128 on
// the table grid; SB == 2 has no mins). Both are exact in fp32, and resident in 0.3-0.6 bits per weight less.
// 6-bit codes (5-bit ones too, which fit): a row holds its K/2 bytes of low nibbles, laid out as 4-bit codes, then
// K/4 bytes of the high 2 bits, 8 per block: byte i = h_i | h_{i+8} << 2 | h_{i+16} << 4 | h_{i+24} << 6, so
// llama.cpp's Q6_K runs in 6.5 bits per weight and Q5 types in 6-6.5 where 8-bit codes took 8.5-9.
// SB == 3 (Q6_K: int8 scale codes per 16 weights under one fp16 d per 256): Mn holds the codes [N, K/16] (block
// b's halves at 2b, 2b+1), and each half-block keeps its own dot product and scale; its m is low * scale,
// applied through XSL, the activation sums over each block's first half. Needs K % 256 == 0.
// Non-uniform 4-bit grids (IQ4_NL's table): a 16-byte table lut maps each nibble to u = level + 128 (one
// vpshufb per 64 codes), the block's m is -128 d, and the product is the same as for plain 4-bit codes.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <vector>

#ifndef PREFETCH
#define PREFETCH 8192
#endif

static inline __m512i unpack4(const uint8_t* p) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(raw, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// 6-bit codes: the high 2 bits of each byte's code, moved to bits 4-5 (v: the high-bit bytes, qword-shuffled)
static inline __m512i high2(__m512i v, __m512i shifts) {
    return _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(v, shifts), _mm512_set1_epi8(3)), 4);
}

// a quad (blocks b..b+3) of 6-bit codes as its first halves (lo) and second halves (hi), 64 bytes each, in the
// activations' order: 128-bit lane j holds block b+j, whose 8 high-bit bytes go to both of its qwords
static inline void six_quad(const uint8_t* w, int K, int b, __m512i* lo, __m512i* hi) {
    const __m512i raw = _mm512_loadu_si512((const void*)(w + b * 16));
    const __m512i mask = _mm512_set1_epi8(0x0F);
    const __m512i v = _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3),
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w + K / 2 + b * 8))));
    *lo = _mm512_or_si512(_mm512_and_si512(raw, mask), high2(v, _mm512_setr_epi64(0, 2, 0, 2, 0, 2, 0, 2)));
    *hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), mask),
                          high2(v, _mm512_setr_epi64(4, 6, 4, 6, 4, 6, 4, 6)));
}

// a tail pair (blocks b, b+1) of 6-bit codes in the activations' pair order [b lo | b+1 lo | b hi | b+1 hi]
static inline __m512i six_pair(const uint8_t* w, int K, int b) {
    const __m512i v = _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 0, 1, 1, 0, 0, 1, 1),
        _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(w + K / 2 + b * 8))));
    return _mm512_or_si512(unpack4(w + b * 16), high2(v, _mm512_setr_epi64(0, 2, 0, 2, 4, 6, 4, 6)));
}

// Lane patterns of a unit's 16 int32 dot products. A quad (4 blocks): lanes 4j..4j+3 hold block j. The tail
// pair (2 blocks): lanes 0-3 and 8-11 hold its first block, lanes 4-7 and 12-15 its second.
static inline __m512i quad_index(int j0) {
    return _mm512_setr_epi32(j0, j0, j0, j0, j0 + 1, j0 + 1, j0 + 1, j0 + 1, j0 + 2, j0 + 2, j0 + 2, j0 + 2,
                             j0 + 3, j0 + 3, j0 + 3, j0 + 3);
}

static inline __m512i pair_index(int j0) {
    const int a = j0, b = j0 + 1;
    return _mm512_setr_epi32(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b);
}

// Integer dot products of one unit starting at block b of a weight row w and an activation row x.
// Quad layout (activations; 8-bit weights too): [4 first halves | 4 second halves], 128 bytes; a 4-bit quad
// is its 4 blocks as stored (byte j of a block: element j low nibble, element j+16 high nibble), so one
// 64-byte load gives all first halves (& 0x0F) and all second halves (>> 4): 2 vpdpbusd per 128 weights.
static inline __m512i load_lut(const uint8_t* lut) {
    return lut ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)lut)) : _mm512_setzero_si512();
}

// the scales and ms of blocks c..c+15 of row n (km: the blocks present); SB: see the top of this file
template <int SB>
static inline void block_scales(const uint16_t* D, const uint16_t* Mn, int N, int nb, int n, int c, __mmask16 km,
                                float low, __m512* dw, __m512* mw) {
    if (SB == 0) {
        *dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, D + (size_t)n * nb + c));
        *mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, Mn + (size_t)n * nb + c));
        return;
    }
    const int ns = nb / 8;  // super-blocks of 8 blocks; a chunk holds 2 (or the row's last 1)
    const __mmask16 k2 = (km >> 8) ? 3 : 1;
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const size_t so = (size_t)n * ns + c / 8;
    const __m512 d = _mm512_permutexvar_ps(sel, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k2, D + so)));
    const uint8_t* codes = (const uint8_t*)Mn;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(km, codes + (size_t)n * nb + c)));
    *dw = _mm512_mul_ps(d, sc);
    const __m512 lowd = _mm512_mul_ps(_mm512_set1_ps(low), *dw);
    if (SB == 1) {
        const __m512 dm = _mm512_permutexvar_ps(sel, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k2, D + (size_t)N * ns + so)));
        const __m512 mc = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(km, codes + (size_t)N * nb + (size_t)n * nb + c)));
        *mw = _mm512_fmadd_ps(dm, mc, lowd);
    } else {
        *mw = lowd;
    }
}

// SB 3: the scales of the two halves of blocks c..c+15 of row n
static inline void half_scales(const uint16_t* D, const uint16_t* Mn, int nb, int n, int c, __mmask16 km,
                               __m512* dlo, __m512* dhi) {
    const int ns = nb / 8;
    const __mmask16 k2 = (km >> 8) ? 3 : 1;
    const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512 d = _mm512_permutexvar_ps(sel, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k2, D + (size_t)n * ns + c / 8)));
    // 16 int16 words, each a block's two int8 codes (first half low)
    const __m256i pairs = _mm256_maskz_loadu_epi16(km, (const uint8_t*)Mn + ((size_t)n * nb + c) * 2);
    const __m512i lo = _mm512_cvtepi16_epi32(_mm256_srai_epi16(_mm256_slli_epi16(pairs, 8), 8));
    const __m512i hi = _mm512_cvtepi16_epi32(_mm256_srai_epi16(pairs, 8));
    *dlo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
    *dhi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
}

template <int BITS, bool NL>
static inline __m512i unit_dot(const uint8_t* w, const int8_t* x, int b, bool quad, __m512i lut, int K) {
    if (quad) {
        const __m512i xlo = _mm512_loadu_si512((const void*)(x + b * 32));
        const __m512i xhi = _mm512_loadu_si512((const void*)(x + b * 32 + 64));
        __m512i lo, hi;
        if (BITS == 4) {
            const __m512i raw = _mm512_loadu_si512((const void*)(w + b * 16));
            const __m512i mask = _mm512_set1_epi8(0x0F);
            lo = _mm512_and_si512(raw, mask);
            hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
            if (NL) {
                lo = _mm512_shuffle_epi8(lut, lo);
                hi = _mm512_shuffle_epi8(lut, hi);
            }
        } else if (BITS == 6) {
            six_quad(w, K, b, &lo, &hi);
        } else {
            lo = _mm512_loadu_si512((const void*)(w + b * 32));
            hi = _mm512_loadu_si512((const void*)(w + b * 32 + 64));
        }
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
    }
    __m512i wv = BITS == 4 ? unpack4(w + b * 16) : BITS == 6 ? six_pair(w, K, b)
                                                 : _mm512_loadu_si512((const void*)(w + b * 32));
    if (NL) wv = _mm512_shuffle_epi8(lut, wv);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512((const void*)(x + b * 32)));
}

// SB 3: a quad's first-half and second-half dot products apart (6-bit codes)
static inline void half_dots(const uint8_t* w, const int8_t* x, int b, int K, __m512i* dlo, __m512i* dhi) {
    __m512i lo, hi;
    six_quad(w, K, b, &lo, &hi);
    *dlo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void*)(x + b * 32)));
    *dhi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, _mm512_loadu_si512((const void*)(x + b * 32 + 64)));
}

template <int BITS, int TILE, bool NL, int SB>
static void gemm_rows(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int n0, int n1, int K,
                      const int8_t* XQ, const float* DX, const float* XS, const float* XSL, int t0, float* Y, int N,
                      __m512i lut, float low) {
    const int nb = K / 32;
    const size_t row_bytes = (size_t)K * BITS / 8;
    for (int n = n0; n < n1; n++) {
        const uint8_t* w = W + (size_t)n * row_bytes;
        __m512 acc[TILE];
        for (int t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();
        for (int c = 0; c < nb; c += 16) {  // a chunk of up to 16 blocks
            const int cb = nb - c < 16 ? nb - c : 16;
            const __mmask16 km = (__mmask16)((1u << cb) - 1);
            __m512 ds[TILE], dh[TILE];
            if constexpr (SB == 3) {
                __m512 dlo, dhi;
                half_scales(D, Mn, nb, n, c, km, &dlo, &dhi);
                const __m512 mh = _mm512_mul_ps(_mm512_set1_ps(low), dhi);
                const __m512 ml = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(low), dlo), mh);
                for (int t = 0; t < TILE; t++) {
                    const size_t o = (size_t)(t0 + t) * nb + c;
                    const __m512 dx = _mm512_maskz_loadu_ps(km, DX + o);
                    ds[t] = _mm512_mul_ps(dlo, dx);
                    dh[t] = _mm512_mul_ps(dhi, dx);
                    acc[t] = _mm512_fmadd_ps(mh, _mm512_maskz_loadu_ps(km, XS + o), acc[t]);
                    acc[t] = _mm512_fmadd_ps(ml, _mm512_maskz_loadu_ps(km, XSL + o), acc[t]);
                }
                for (int j = 0; j < cb; j += 4) {
                    const __m512i ix = quad_index(j);
                    for (int t = 0; t < TILE; t++) {
                        __m512i dl, du;
                        half_dots(w, XQ + (size_t)(t0 + t) * K, c + j, K, &dl, &du);
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_permutexvar_ps(ix, ds[t]), acc[t]);
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(du), _mm512_permutexvar_ps(ix, dh[t]), acc[t]);
                    }
                }
                continue;
            }
            __m512 dw, mw;
            block_scales<SB>(D, Mn, N, nb, n, c, km, low, &dw, &mw);
            for (int t = 0; t < TILE; t++) {
                ds[t] = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(km, DX + (size_t)(t0 + t) * nb + c));
                acc[t] = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(km, XS + (size_t)(t0 + t) * nb + c), acc[t]);
            }
            for (int j = 0; j < cb; j += 4) {
                const bool quad = j + 4 <= cb;
                const __m512i ix = quad ? quad_index(j) : pair_index(j);
                for (int t = 0; t < TILE; t++) {
                    const __m512i dot = unit_dot<BITS, NL>(w, XQ + (size_t)(t0 + t) * K, c + j, quad, lut, K);
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(ix, ds[t]), acc[t]);
                }
            }
        }
        for (int t = 0; t < TILE; t++) Y[(size_t)(t0 + t) * N + n] = _mm512_reduce_add_ps(acc[t]);
    }
}

// One token, four rows at a time: independent accumulators keep the FMA and load units busy while the
// weights stream from memory, and each activation vector is loaded once for four rows.
template <int BITS, bool NL, int SB>
static void gemv_rows4(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int n, int K, const int8_t* XQ,
                       const float* DX, const float* XS, const float* XSL, float* Y, __m512i lut, int N, float low) {
    const int nb = K / 32;
    const size_t row_bytes = (size_t)K * BITS / 8;
    const uint8_t* group = W + (size_t)n * row_bytes;
    const int units = (nb + 3) / 4;
    const int lpu = (int)((4 * row_bytes / 64 + units - 1) / units);  // cache lines to prefetch per unit
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < nb; c += 16) {
        const int cb = nb - c < 16 ? nb - c : 16;
        const __mmask16 km = (__mmask16)((1u << cb) - 1);
        const __m512 dx = _mm512_maskz_loadu_ps(km, DX + c);
        const __m512 xs = _mm512_maskz_loadu_ps(km, XS + c);
        __m512 ds[4], dh[4];
        if constexpr (SB == 3) {
            const __m512 xl = _mm512_maskz_loadu_ps(km, XSL + c);
            for (int r = 0; r < 4; r++) {
                __m512 dlo, dhi;
                half_scales(D, Mn, nb, n + r, c, km, &dlo, &dhi);
                const __m512 mh = _mm512_mul_ps(_mm512_set1_ps(low), dhi);
                const __m512 ml = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(low), dlo), mh);
                ds[r] = _mm512_mul_ps(dlo, dx);
                dh[r] = _mm512_mul_ps(dhi, dx);
                acc[r] = _mm512_fmadd_ps(ml, xl, _mm512_fmadd_ps(mh, xs, acc[r]));
            }
        } else {
            for (int r = 0; r < 4; r++) {
                __m512 dw, mw;
                block_scales<SB>(D, Mn, N, nb, n + r, c, km, low, &dw, &mw);
                ds[r] = _mm512_mul_ps(dw, dx);
                acc[r] = _mm512_fmadd_ps(mw, xs, acc[r]);
            }
        }
        for (int j = 0; j < cb; j += 4) {
            const int u = (c + j) / 4;
            // prefetch PREFETCH bytes ahead: one thread alone keeps too few loads in flight otherwise
            for (int l = 0; l < lpu; l++)
                _mm_prefetch((const char*)(group + PREFETCH + (size_t)(u * lpu + l) * 64), _MM_HINT_T0);
            const bool quad = j + 4 <= cb;
            const __m512i ix = quad ? quad_index(j) : pair_index(j);
            for (int r = 0; r < 4; r++) {
                const uint8_t* w = W + (size_t)(n + r) * row_bytes;
                if constexpr (SB == 3) {
                    __m512i dl, du;
                    half_dots(w, XQ, c + j, K, &dl, &du);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_permutexvar_ps(ix, ds[r]), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(du), _mm512_permutexvar_ps(ix, dh[r]), acc[r]);
                } else {
                    const __m512i dot = unit_dot<BITS, NL>(w, XQ, c + j, quad, lut, K);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(ix, ds[r]), acc[r]);
                }
            }
        }
    }
    for (int r = 0; r < 4; r++) Y[n + r] = _mm512_reduce_add_ps(acc[r]);
}

template <int BITS, bool NL, int SB>
static void gemm(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, const int8_t* XQ,
                 const float* DX, const float* XS, const float* XSL, int M, float* Y, int threads,
                 const uint8_t* lut16, float low) {
    const __m512i lut = load_lut(lut16);
    // rows split across threads; tokens in tiles of 4 reuse each unpacked weight vector
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int chunk = 0; chunk < (N + 15) / 16; chunk++) {
        const int n0 = chunk * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
        if (M == 1) {
            int n = n0;
            for (; n + 4 <= n1; n += 4) gemv_rows4<BITS, NL, SB>(W, D, Mn, n, K, XQ, DX, XS, XSL, Y, lut, N, low);
            if (n < n1) gemm_rows<BITS, 1, NL, SB>(W, D, Mn, n, n1, K, XQ, DX, XS, XSL, 0, Y, N, lut, low);
            continue;
        }
        int t = 0;
        for (; t + 4 <= M; t += 4)
            gemm_rows<BITS, 4, NL, SB>(W, D, Mn, n0, n1, K, XQ, DX, XS, XSL, t, Y, N, lut, low);
        for (; t < M; t++) gemm_rows<BITS, 1, NL, SB>(W, D, Mn, n0, n1, K, XQ, DX, XS, XSL, t, Y, N, lut, low);
    }
}

extern "C" {

// x: fp32 [M, K] -> xq int8 [M, K] (pair order), dx, xs and xsl (xs over each block's first 16) fp32 [M, K/32]
void quantize_act(const float* x, int M, int K, int8_t* xq, float* dx, float* xs, float* xsl, int threads) {
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
            // quads: [4 first halves | 4 second halves]; the tail pair: [b0 | b1 | b0' | b1']
            const int tail0 = nb / 4 * 4;
            int8_t* row = xq + (size_t)t * K;
            int8_t *lo, *hi;
            if (b < tail0) { lo = row + (b / 4) * 128 + (b % 4) * 16; hi = lo + 64; }
            else { lo = row + tail0 * 32 + (b - tail0) * 16; hi = lo + 32; }
            _mm_storeu_si128((__m128i*)lo, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128((__m128i*)hi, _mm512_cvtsepi32_epi8(q1));
            dx[(size_t)t * nb + b] = d;
            const int s0 = _mm512_reduce_add_epi32(q0);
            xs[(size_t)t * nb + b] = d * (float)(s0 + _mm512_reduce_add_epi32(q1));
            xsl[(size_t)t * nb + b] = d * (float)s0;
        }
    }
}

// 4- and 6-bit weights back to bf16 (round to nearest even), for prefill's large-M products, which run faster as
// a bf16 GEMM on AMX tiles (oneDNN, through torch) than as int8 dot products: out[n, k] = u[n, k] * d + m (u
// through lut where it is given).
void dequant_bf16(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int bits, const uint8_t* lut,
                  int sb, int low, uint16_t* out, int threads) {
    const int nb = K / 32, ns = nb / 8;
    const uint8_t* codes = (const uint8_t*)Mn;
    const size_t row_bytes = (size_t)K * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t* w = W + (size_t)n * row_bytes;
        uint16_t* o = out + (size_t)n * K;
        for (int b = 0; b < nb; b++) {
            float d[2], m[2];
            if (sb == 0) {
                d[0] = _cvtsh_ss(D[(size_t)n * nb + b]);
                m[0] = _cvtsh_ss(Mn[(size_t)n * nb + b]);
            } else if (sb == 3) {
                const float s = _cvtsh_ss(D[(size_t)n * ns + b / 8]);
                for (int h = 0; h < 2; h++) d[h] = s * (float)(int8_t)codes[((size_t)n * nb + b) * 2 + h];
            } else {
                d[0] = _cvtsh_ss(D[(size_t)n * ns + b / 8]) * (float)(int8_t)codes[(size_t)n * nb + b];
                m[0] = (float)low * d[0];
                if (sb == 1)
                    m[0] += _cvtsh_ss(D[(size_t)N * ns + (size_t)n * ns + b / 8]) *
                            (float)codes[(size_t)N * nb + (size_t)n * nb + b];
            }
            if (sb == 3) { m[0] = (float)low * d[0]; m[1] = (float)low * d[1]; }
            else { d[1] = d[0]; m[1] = m[0]; }
            const uint8_t* p = w + b * 16;
            const uint8_t* hb = w + K / 2 + b * 8;  // 6-bit: the high 2 bits
            uint16_t* q = o + b * 32;
            for (int j = 0; j < 32; j++) {
                int u = j < 16 ? p[j] & 15 : p[j - 16] >> 4;
                if (bits == 6) u |= ((hb[j & 7] >> (2 * (j >> 3))) & 3) << 4;
                const float v = (float)(lut ? lut[u] : u) * d[j >> 4] + m[j >> 4];
                uint32_t a;
                memcpy(&a, &v, 4);
                q[j] = (uint16_t)((a + 0x7FFFu + ((a >> 16) & 1u)) >> 16);
            }
        }
    }
}

// One call per linear layer: quantize the activations (into per-thread scratch), then the product.
void linear(const float* x, int M, int K, const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int bits,
            const uint8_t* lut, int sb, int low, float* Y, int threads) {
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, xs, xsl;
    const size_t nb = (size_t)M * (K / 32);
    if (xq.size() < (size_t)M * K) xq.resize((size_t)M * K);
    if (dx.size() < nb) { dx.resize(nb); xs.resize(nb); xsl.resize(nb); }
    quantize_act(x, M, K, xq.data(), dx.data(), xs.data(), xsl.data(), threads);
    const int8_t* q = xq.data();
    const float *a = dx.data(), *c = xs.data(), *cl = xsl.data(), lw = (float)low;
#define TF_GEMM(B, NL, SB) gemm<B, NL, SB>(W, D, Mn, N, K, q, a, c, cl, M, Y, threads, NL ? lut : nullptr, lw)
    if (bits == 4 && lut) {
        if (sb == 2) TF_GEMM(4, true, 2);
        else TF_GEMM(4, true, 0);
    } else if (bits == 4) {
        if (sb == 1) TF_GEMM(4, false, 1);
        else if (sb == 2) TF_GEMM(4, false, 2);
        else TF_GEMM(4, false, 0);
    } else if (bits == 6) {
        if (sb == 1) TF_GEMM(6, false, 1);
        else if (sb == 2) TF_GEMM(6, false, 2);
        else if (sb == 3) TF_GEMM(6, false, 3);
        else TF_GEMM(6, false, 0);
    } else {
        if (sb == 1) TF_GEMM(8, false, 1);
        else if (sb == 2) TF_GEMM(8, false, 2);
        else TF_GEMM(8, false, 0);
    }
#undef TF_GEMM
}

}  // extern "C"

// ---- one whole decoder layer for one token (batch 1): the decode step without Python between ops ----

struct QLin {
    const uint8_t* w;
    const uint16_t* sz;  // fp16 [2, n, k/32]: scales then mins (super-blocks: [2, n, k/256] d, dmin)
    const float* bias;   // or null
    const uint8_t* lut;  // a non-uniform 4-bit grid's table (u = level + 128), or null
    int n, k, bits;
    const uint8_t* codes;  // super-blocks: the scale (and min) codes [2, n, k/32], or null
    int sb, low;
};

// the variants of a decoder layer: a null norm is one the family lacks (q/k norms: Qwen3, Gemma 3; the norms on
// the attention and MLP outputs: Gemma's sandwich); window 0 is full attention
struct LayerArgs {
    const float* attn_norm;
    const float* mlp_norm;
    QLin qkv, o, gate_up, down;
    const float* q_norm;
    const float* k_norm;
    const float* post_attn_norm;
    const float* post_mlp_norm;
    int window;
};

struct Dims {
    int dim, n_heads, n_kv, head_dim, ffn;
    float eps, scale;
    int rot;  // rotary dimensions (the first rot of each head; head_dim unless partial)
    int act;  // 0: SiLU gate, 1: GELU (tanh approximation) gate
};

// an MoE block in place of the MLP: an fp32 router [experts, dim], each expert's fused gate/up and down, the top_k
// experts' outputs weighted by their softmax gates (renormalized over the top_k if normalize), plus an optional
// shared expert scaled by sigmoid(shared_gate . x)
struct MoEArgs {
    const float* router;
    const QLin* gate_up;
    const QLin* down;
    int n_experts, top_k, normalize, ffn;
    const QLin* shared_gate_up;
    const QLin* shared_down;
    const float* shared_gate;
    int shared_ffn;
};

static inline float bf16_to_f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float ld(const float* p) { return *p; }
static inline float ld(const uint16_t* p) { return bf16_to_f(*p); }
static inline void st(float* p, float v) { *p = v; }
static inline void st(uint16_t* p, float v) { *p = f_to_bf16(v); }

static void rmsnorm(const float* h, const float* w, int n, float eps, float* out) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += h[i] * h[i];
    const float r = 1.0f / sqrtf(ss / n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = h[i] * r * w[i];
}

static void run_linear(const QLin& L, const float* x, float* y, int threads) {
    linear(x, 1, L.k, L.w, L.sz, L.sb ? (const uint16_t*)L.codes : L.sz + (size_t)L.n * (L.k / 32), L.n, L.bits,
           L.lut, L.sb, L.low, y, threads);
    if (L.bias)
        for (int i = 0; i < L.n; i++) y[i] += L.bias[i];
}

// the new key and value of one token into a cache laid out as keys [kv, hd, cap] (transposed), values [kv, cap, hd]
template <typename KT>
static void store_kv(const float* k, const float* vv, KT* kc, KT* vc, int pos, int cap, int KV, int hd) {
    for (int g = 0; g < KV; g++)
        for (int d = 0; d < hd; d++) {
            st(kc + ((size_t)g * hd + d) * cap + pos, k[g * hd + d]);
            st(vc + ((size_t)g * cap + pos) * hd + d, vv[g * hd + d]);
        }
}

// one query head over S cached positions of its kv group (kc: [hd, cap], vc: [cap, hd]); fp32 softmax
template <typename KT>
static void attend_head(const float* q, const KT* kc, const KT* vc, int S, int cap, int hd, float scale, float* out) {
    std::vector<float> sc(S, 0.0f);
    for (int d = 0; d < hd; d++) {
        const KT* kr = kc + (size_t)d * cap;
        const float qd = q[d] * scale;
#pragma omp simd
        for (int s = 0; s < S; s++) sc[s] += qd * ld(kr + s);
    }
    float mx = sc[0];
    for (int s = 1; s < S; s++) mx = sc[s] > mx ? sc[s] : mx;
    float sum = 0;
    for (int s = 0; s < S; s++) { sc[s] = expf(sc[s] - mx); sum += sc[s]; }
    for (int d = 0; d < hd; d++) out[d] = 0;
    for (int s = 0; s < S; s++) {
        const KT* vr = vc + (size_t)s * hd;
        const float p = sc[s] / sum;
#pragma omp simd
        for (int d = 0; d < hd; d++) out[d] += p * ld(vr + d);
    }
}

// attention of B sequences, each at its own position in its own cache (the server's batched decode step):
// qkv fp32 [B, H + 2 KV, hd] after RoPE; each row's k and v are stored, then every (row, head) attends
template <typename KT>
static void attend_rows_t(int B, int H, int KV, int hd, float scale, const float* qkv, KT* const* kcs, KT* const* vcs,
                          const int* pos, int cap, int window, float* att, int threads) {
    const size_t row = (size_t)(H + 2 * KV) * hd;
    for (int b = 0; b < B; b++)
        store_kv(qkv + b * row + (size_t)H * hd, qkv + b * row + (size_t)(H + KV) * hd, kcs[b], vcs[b], pos[b], cap,
                 KV, hd);
    const int group = H / KV;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int t = 0; t < B * H; t++) {
        const int b = t / H, head = t % H, g = head / group, S = pos[b] + 1;
        const int start = window > 0 && S > window ? S - window : 0;
        attend_head(qkv + b * row + (size_t)head * hd, kcs[b] + (size_t)g * hd * cap + start,
                    vcs[b] + ((size_t)g * cap + start) * hd, S - start, cap, hd, scale, att + (size_t)t * hd);
    }
}

static void gated(int act_kind, const float* gu, int F, float* out) {
    if (act_kind == 1) {
#pragma omp simd
        for (int i = 0; i < F; i++) {
            const float g = gu[i];
            out[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * gu[F + i];
        }
    } else {
#pragma omp simd
        for (int i = 0; i < F; i++) {
            const float g = gu[i];
            out[i] = g / (1.0f + expf(-g)) * gu[F + i];
        }
    }
}

// h += the MoE block of x (the normed input)
static void moe_block(const Dims* m, const MoEArgs* e, const float* x, float* h, std::vector<float>& gu,
                      std::vector<float>& act, std::vector<float>& y, int threads) {
    const int D = m->dim, E = e->n_experts;
    thread_local std::vector<float> p;
    p.resize(E);
    for (int j = 0; j < E; j++) {
        const float* r = e->router + (size_t)j * D;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < D; i++) s += r[i] * x[i];
        p[j] = s;
    }
    float mx = p[0];  // (no -INFINITY: compiled with -ffast-math)
    for (int j = 1; j < E; j++) mx = p[j] > mx ? p[j] : mx;
    float sum = 0;
    for (int j = 0; j < E; j++) { p[j] = expf(p[j] - mx); sum += p[j]; }
    for (int j = 0; j < E; j++) p[j] /= sum;
    int chosen[64];
    float w[64], wsum = 0;
    const int K = e->top_k < 64 ? e->top_k : 64;
    for (int k = 0; k < K; k++) {  // top_k by selection: the largest not yet chosen, lowest index on ties
        int best = -1;
        for (int j = 0; j < E; j++) {
            bool taken = false;
            for (int c = 0; c < k; c++) taken |= chosen[c] == j;
            if (!taken && (best < 0 || p[j] > p[best])) best = j;
        }
        chosen[k] = best;
        w[k] = p[best];
        wsum += w[k];
    }
    if (e->shared_gate_up) {
        run_linear(*e->shared_gate_up, x, gu.data(), threads);
        gated(m->act, gu.data(), e->shared_ffn, act.data());
        run_linear(*e->shared_down, act.data(), y.data(), threads);
        float g = 0;
        for (int i = 0; i < D; i++) g += e->shared_gate[i] * x[i];
        g = 1.0f / (1.0f + expf(-g));
        for (int i = 0; i < D; i++) h[i] += g * y[i];
    }
    for (int k = 0; k < K; k++) {
        const int j = chosen[k];
        const float wk = e->normalize ? w[k] / wsum : w[k];
        run_linear(e->gate_up[j], x, gu.data(), threads);
        gated(m->act, gu.data(), e->ffn, act.data());
        run_linear(e->down[j], act.data(), y.data(), threads);
        for (int i = 0; i < D; i++) h[i] += wk * y[i];
    }
}

template <typename KT>
static void decode_layer_t(const Dims* m, const LayerArgs* L, const MoEArgs* moe, float* h, int pos, const float* cos,
                           const float* sin, KT* kc, KT* vc, int cap, int threads) {
    const int D = m->dim, H = m->n_heads, KV = m->n_kv, hd = m->head_dim, S = pos + 1;
    const int start = L->window > 0 && S > L->window ? S - L->window : 0;
    thread_local std::vector<float> x, qkv, att, gu, act, y;
    int F_max = m->ffn;
    if (moe) F_max = moe->ffn > moe->shared_ffn ? moe->ffn : moe->shared_ffn;
    x.resize(D > F_max ? D : F_max);
    qkv.resize((size_t)(H + 2 * KV) * hd);
    att.resize((size_t)H * hd);
    gu.resize(2 * (size_t)F_max);
    act.resize(F_max);
    y.resize(D);

    rmsnorm(h, L->attn_norm, D, m->eps, x.data());
    run_linear(L->qkv, x.data(), qkv.data(), threads);
    const int rh = m->rot / 2;
    for (int head = 0; head < H + KV; head++) {  // q/k norms, then rotate-half RoPE on the q and k heads
        float* v = qkv.data() + (size_t)head * hd;
        const float* qkn = head < H ? L->q_norm : L->k_norm;
        if (qkn) rmsnorm(v, qkn, hd, m->eps, v);
        for (int i = 0; i < rh; i++) {
            const float a = v[i], b = v[i + rh];
            v[i] = a * cos[i] - b * sin[i];
            v[i + rh] = b * cos[i + rh] + a * sin[i + rh];
        }
    }
    store_kv(qkv.data() + (size_t)H * hd, qkv.data() + (size_t)(H + KV) * hd, kc, vc, pos, cap, KV, hd);
    const int group = H / KV;
    // plain pointers: inside the parallel region a thread_local name would be each worker's own (empty) copy
    const float* qkv_p = qkv.data();
    float* att_p = att.data();
#pragma omp parallel for num_threads(threads) schedule(static) if (S > 256)
    for (int head = 0; head < H; head++) {
        const int g = head / group;
        attend_head(qkv_p + (size_t)head * hd, kc + (size_t)g * hd * cap + start, vc + ((size_t)g * cap + start) * hd,
                    S - start, cap, hd, m->scale, att_p + (size_t)head * hd);
    }
    run_linear(L->o, att.data(), x.data(), threads);
    if (L->post_attn_norm) rmsnorm(x.data(), L->post_attn_norm, D, m->eps, x.data());
    for (int i = 0; i < D; i++) h[i] += x[i];

    rmsnorm(h, L->mlp_norm, D, m->eps, x.data());
    if (moe) {
        moe_block(m, moe, x.data(), h, gu, act, y, threads);
        return;
    }
    run_linear(L->gate_up, x.data(), gu.data(), threads);
    gated(m->act, gu.data(), m->ffn, act.data());
    run_linear(L->down, act.data(), x.data(), threads);
    if (L->post_mlp_norm) rmsnorm(x.data(), L->post_mlp_norm, D, m->eps, x.data());
    for (int i = 0; i < D; i++) h[i] += x[i];
}

// y [M, n] = x [M, k] W^T (+ bias) for M rows at once: the weights are read once for all of them
static void run_linear_rows(const QLin& L, const float* x, int M, float* y, int threads) {
    linear(x, M, L.k, L.w, L.sz, L.sb ? (const uint16_t*)L.codes : L.sz + (size_t)L.n * (L.k / 32), L.n, L.bits,
           L.lut, L.sb, L.low, y, threads);
    if (L.bias)
        for (int r = 0; r < M; r++)
            for (int i = 0; i < L.n; i++) y[(size_t)r * L.n + i] += L.bias[i];
}

// one decoder layer for B sequences, one new token each, each at its own position in its own cache (the server's
// batched decode step): the same operations as decode_layer_t, the linears over all B rows at once.
// h [B, dim]; cos[b], sin[b]: row b's RoPE tables at its position; kcs[b], vcs[b]: its cache of this layer
template <typename KT>
static void decode_rows_t(const Dims* m, const LayerArgs* L, const MoEArgs* moe, float* h, int B, const int* pos,
                          const float* const* cos, const float* const* sin, KT* const* kcs, KT* const* vcs, int cap,
                          int threads) {
    const int D = m->dim, H = m->n_heads, KV = m->n_kv, hd = m->head_dim;
    thread_local std::vector<float> x, qkv, att, gu, act, y;
    int F = m->ffn;
    if (moe) F = moe->ffn > moe->shared_ffn ? moe->ffn : moe->shared_ffn;
    const size_t row = (size_t)(H + 2 * KV) * hd;
    x.resize((size_t)B * D);
    qkv.resize((size_t)B * row);
    att.resize((size_t)B * H * hd);
    gu.resize((size_t)B * 2 * F);
    act.resize((size_t)B * F);
    y.resize(D);

    for (int b = 0; b < B; b++) rmsnorm(h + (size_t)b * D, L->attn_norm, D, m->eps, x.data() + (size_t)b * D);
    run_linear_rows(L->qkv, x.data(), B, qkv.data(), threads);
    const int rh = m->rot / 2;
    for (int b = 0; b < B; b++) {
        const float* c = cos[b];
        const float* sn = sin[b];
        for (int head = 0; head < H + KV; head++) {
            float* v = qkv.data() + b * row + (size_t)head * hd;
            const float* qkn = head < H ? L->q_norm : L->k_norm;
            if (qkn) rmsnorm(v, qkn, hd, m->eps, v);
            for (int i = 0; i < rh; i++) {
                const float a = v[i], bb = v[i + rh];
                v[i] = a * c[i] - bb * sn[i];
                v[i + rh] = bb * c[i + rh] + a * sn[i + rh];
            }
        }
    }
    attend_rows_t<KT>(B, H, KV, hd, m->scale, qkv.data(), kcs, vcs, pos, cap, L->window, att.data(), threads);
    run_linear_rows(L->o, att.data(), B, x.data(), threads);
    for (int b = 0; b < B; b++) {
        float* xb = x.data() + (size_t)b * D;
        float* hb = h + (size_t)b * D;
        if (L->post_attn_norm) rmsnorm(xb, L->post_attn_norm, D, m->eps, xb);
        for (int i = 0; i < D; i++) hb[i] += xb[i];
        rmsnorm(hb, L->mlp_norm, D, m->eps, xb);
    }
    if (moe) {  // each row's own experts
        for (int b = 0; b < B; b++) moe_block(m, moe, x.data() + (size_t)b * D, h + (size_t)b * D, gu, act, y, threads);
        return;
    }
    run_linear_rows(L->gate_up, x.data(), B, gu.data(), threads);
    for (int b = 0; b < B; b++) gated(m->act, gu.data() + (size_t)b * 2 * F, F, act.data() + (size_t)b * F);
    run_linear_rows(L->down, act.data(), B, x.data(), threads);
    for (int b = 0; b < B; b++) {
        float* xb = x.data() + (size_t)b * D;
        float* hb = h + (size_t)b * D;
        if (L->post_mlp_norm) rmsnorm(xb, L->post_mlp_norm, D, m->eps, xb);
        for (int i = 0; i < D; i++) hb[i] += xb[i];
    }
}

extern "C" {

// kv_bf16: 1 if the cache holds bf16 (uint16) values, 0 for fp32
// moe: null for a dense layer
void decode_layer(const Dims* m, const LayerArgs* L, const MoEArgs* moe, float* h, int pos, const float* cos,
                  const float* sin, void* kc, void* vc, int cap, int kv_bf16, int threads) {
    if (kv_bf16)
        decode_layer_t<uint16_t>(m, L, moe, h, pos, cos, sin, (uint16_t*)kc, (uint16_t*)vc, cap, threads);
    else
        decode_layer_t<float>(m, L, moe, h, pos, cos, sin, (float*)kc, (float*)vc, cap, threads);
}


void decode_rows(const Dims* m, const LayerArgs* L, const MoEArgs* moe, float* h, int B, const int* pos,
                 const float* const* cos, const float* const* sin, void* const* kcs, void* const* vcs, int cap,
                 int kv_bf16, int threads) {
    if (kv_bf16)
        decode_rows_t<uint16_t>(m, L, moe, h, B, pos, cos, sin, (uint16_t* const*)kcs, (uint16_t* const*)vcs, cap,
                                threads);
    else
        decode_rows_t<float>(m, L, moe, h, B, pos, cos, sin, (float* const*)kcs, (float* const*)vcs, cap, threads);
}


void attend_rows(int B, int H, int KV, int hd, float scale, const float* qkv, void* const* kcs, void* const* vcs,
                 const int* pos, int cap, int window, int kv_bf16, float* att, int threads) {
    if (kv_bf16)
        attend_rows_t<uint16_t>(B, H, KV, hd, scale, qkv, (uint16_t* const*)kcs, (uint16_t* const*)vcs, pos, cap,
                                window, att, threads);
    else
        attend_rows_t<float>(B, H, KV, hd, scale, qkv, (float* const*)kcs, (float* const*)vcs, pos, cap, window, att,
                             threads);
}

}
