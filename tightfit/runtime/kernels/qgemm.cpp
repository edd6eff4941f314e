// Low-bit weight x int8 activation matrix products for x86 CPUs with AVX-512 VNNI.
//
// Weights: per row, blocks of 32 input columns; w = u * d + m with u unsigned codes (4-bit: 0..15, packed two per
// byte; 8-bit: 0..255), d and m fp16 per block. Activations: per token, blocks of 32 quantized to int8 with a
// float scale dx (llama.cpp's Q8 activations), plus xs = dx * sum(xq) per block for the m term:
//   y[t, n] = sum_b d[n,b] dx[t,b] sum_j u[n,b,j] xq[t,b,j] + m[n,b] xs[t,b]
// Byte order: a row is cut into chunks of 16 blocks (the last one: the cb blocks left; K % 64 == 0 keeps cb even).
// Within a chunk, slice i (0..7) is a vector of cb lanes of 4 bytes, lane b holding elements 4i..4i+3 of block b,
// so one vpdpbusd of a weight slice and an activation slice adds 4 products into each block's own lane, and the
// 8 slices leave the chunk's 16 block dots in 16 lanes, scaled by the 16 block scales with no shuffle (the row
// interleaving that llama.cpp's repacked Q4_0 GEMM and ik_llama.cpp do, here inside each row). Activations and
// 8-bit weights: the 8 slices in order, cb * 32 bytes a chunk. 4-bit weights: 4 vectors, byte t of lane b of
// vector j = u[4j+t] | u[16+4j+t] << 4 (slices j and 4+j), cb * 16 bytes a chunk.
// Super-block scales (SB, the "k" formats: llama.cpp's K-quants and IQ4_XS): D holds fp16 [2, N, K/256] (d, then
// dmin when SB == 1) and Mn the bytes [2, N, K/32]: int8 scale codes sc, then (SB == 1) unsigned min codes mc;
// block b's scale is d sc_b and its m is dmin mc_b + low * scale (low: the code offset, -8 for sym4, -128 on
// the table grid; SB == 2 has no mins). Both are exact in fp32, and resident in 0.3-0.6 bits per weight less.
// 6-bit codes (5-bit ones too, which fit): a row holds its K/2 bytes of low nibbles, laid out as 4-bit codes, then
// K/4 bytes of the high 2 bits, per chunk 2 vectors: byte t of lane b of vector h holds the high bits of
// u[16h+4j+t] at bits 2j (j = 0..3), so llama.cpp's Q6_K runs in 6.56 bits per weight and the 5-bit types in
// 6.6-7 where 8-bit codes took 8.5-9.
// SB == 3 (Q6_K: int8 scale codes per 16 weights under one fp16 d per 256): Mn holds the codes [N, K/16] (block
// b's halves at 2b, 2b+1), and each half-block (slices 0-3, 4-7) keeps its own dot and scale; its m is
// low * scale, applied through XSL, the activation sums over each block's first half. Needs K % 256 == 0.
// Non-uniform 4-bit grids (IQ4_NL's table): a 16-byte table lut maps each nibble to u = level + 128 (one
// vpshufb per 64 codes), the block's m is -128 d, and the product is the same as for plain 4-bit codes.
// Decode (one token, or a few) streams the weights once from memory in tiles of 4 rows (tile()). Prefill (M > 16)
// holds a panel of rows in L2 and passes every 4-token tile of activations, in L1, over it (ptile()), with the
// panel's scales decoded once into fp32 (row_scales()); there the float multiplies that apply each block's scales
// share the two vector pipes that run vpdpbusd on this CPU (Zen 5; adds, logic and conversions run beside them), so
// the formats without mins (SB 2, 3) fold their low * sum(x) term into the integer dot.
#include <immintrin.h>
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
#include "avx2_compat.h"  // the same source on AVX2 + FMA + F16C: each 512-bit vector as two 256-bit halves
#endif
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <vector>

// the inner loops' pieces, inlined whatever GCC's size heuristics say: one left out of line passes the integer dots
// through memory (a chunk's slices out of line cost decode ~10%)
#define TF_INLINE __attribute__((always_inline)) static inline
#ifdef TF_AVX2
#define TF_KEEP(x) (void)0
#else
#define TF_KEEP(x) __asm__("" : "+v"(x))  // an empty-asm register barrier (see chunk_dots)
#endif

#ifndef PREFETCH
#define PREFETCH 8192
#endif

#ifdef TF_AVX2
#include "decode_avx2.h"  // decode's and prefill's products on AVX2 (4- and 6-bit codes)
#endif

static inline __m512i ldm(const void* p, __mmask64 m) { return _mm512_maskz_loadu_epi8(m, p); }

// the bytes of a chunk's slice vectors present (cb blocks of 4 bytes each)
static inline __mmask64 lanes_mask(int cb) { return cb >= 16 ? ~0ULL : ((1ULL << (cb * 4)) - 1); }

static inline __m512i load_lut(const uint8_t* lut) {
    return lut ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)lut)) : _mm512_setzero_si512();
}

// the fp16 values of super-blocks s and s + 1 (s + 1 only where `two`, else zero) over lanes 0-7 and 8-15: two
// scalar loads, where AVX2's stand-in for a masked load of 2 lanes was a call (every live vector register saved
// and restored around it, twice per row per chunk of Q4_K: 5.6% of a Qwen2.5-1.5B Q4_K_M decode step in the call)
static inline __m512 sb_pair(const uint16_t* p, bool two) {
    const float lo = _cvtsh_ss(p[0]), hi = two ? _cvtsh_ss(p[1]) : 0.f;
#ifdef TF_AVX2
    return {_mm256_set1_ps(lo), _mm256_set1_ps(hi)};
#else
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
#endif
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
    const bool two = km >> 8;
    const size_t so = (size_t)n * ns + c / 8;
    const __m512 d = sb_pair(D + so, two);
    const uint8_t* codes = (const uint8_t*)Mn;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(km, codes + (size_t)n * nb + c)));
    *dw = _mm512_mul_ps(d, sc);
    const __m512 lowd = _mm512_mul_ps(_mm512_set1_ps(low), *dw);
    if (SB == 1) {
        const __m512 dm = sb_pair(D + (size_t)N * ns + so, two);
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
    const __m512 d = sb_pair(D + (size_t)n * ns + c / 8, km >> 8);
    // 16 int16 words, each a block's two int8 codes (first half low)
    const __m256i pairs = _mm256_maskz_loadu_epi16(km, (const uint8_t*)Mn + ((size_t)n * nb + c) * 2);
    const __m512i lo = _mm512_cvtepi16_epi32(_mm256_srai_epi16(_mm256_slli_epi16(pairs, 8), 8));
    const __m512i hi = _mm512_cvtepi16_epi32(_mm256_srai_epi16(pairs, 8));
    *dlo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(lo));
    *dhi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi));
}

// vpdpbusd of weight codes u; on AVX2 a cheaper exact form where every code is below 128 (avx2_compat.h)
template <int BITS, bool NL>
TF_INLINE __m512i dpb(__m512i acc, __m512i u, __m512i s) {
#ifdef TF_AVX2
    if constexpr (BITS < 8 && !NL) return tf_dpbusd_small(acc, u, s);
#endif
    return _mm512_dpbusd_epi32(acc, u, s);
}

// AVX2 with 4-bit uniform codes: a chunk's slices summed in int16 lanes and widened once after the chunk
// (tf_dpbusw_small, widen16), a third fewer operations per slice than tf_dpbusd_small's widening every one
template <int BITS, bool NL>
constexpr bool sum16() {
#ifdef TF_AVX2
    return BITS == 4 && !NL;
#else
    return false;
#endif
}
template <int BITS, bool NL>
TF_INLINE __m512i dps(__m512i acc, __m512i u, __m512i s) {
#ifdef TF_AVX2
    if constexpr (sum16<BITS, NL>()) return tf_dpbusw_small(acc, u, s);
#endif
    return dpb<BITS, NL>(acc, u, s);
}

// a chunk's int16 sums (dps) to int32, after its slices
template <int BITS, bool NL, int SB, int R, int T>
TF_INLINE void widen16(__m512i (&dot)[R][T], __m512i (&doth)[R][T]) {
#ifdef TF_AVX2
    if constexpr (sum16<BITS, NL>())
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) {
                dot[r][t] = tf_widen_epi16(dot[r][t]);
                if constexpr (SB == 3) doth[r][t] = tf_widen_epi16(doth[r][t]);
            }
#endif
}

// slice i (0..7) of chunk ci (cb blocks) of weight row w, as unsigned bytes (see the top of this file)
template <int BITS, bool NL, int I>
static inline __m512i wslice(const uint8_t* w, int K, int ci, int cb, __mmask64 m, __m512i lut) {
    if constexpr (BITS == 8) {
        return ldm(w + (size_t)ci * 512 + I * cb * 4, m);
    } else {
        const __m512i raw = ldm(w + (size_t)ci * 256 + (I & 3) * cb * 4, m);
        __m512i v = _mm512_and_si512(I < 4 ? raw : _mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0F));
        if constexpr (BITS == 6) {
            const __m512i h = ldm(w + K / 2 + (size_t)ci * 128 + (I >> 2) * cb * 4, m);
            const __m512i h2 = _mm512_and_si512(_mm512_srli_epi16(h, 2 * (I & 3)), _mm512_set1_epi8(3));
            v = _mm512_or_si512(v, _mm512_slli_epi16(h2, 4));
        }
        if constexpr (NL) v = _mm512_shuffle_epi8(lut, v);
        return v;
    }
}

// R weight rows (from n) x T tokens (from t0): every chunk's 8 slices into per-block integer dots, then scaled once
// per chunk. SB 3 keeps each block's two halves (slices 0-3, 4-7) apart.
template <int BITS, bool NL, int SB, int R, int T, int I>
TF_INLINE void slice_step(const uint8_t* const* wr, const int8_t* const* xr, int K, int ci, int cb, __mmask64 m,
                          __m512i lut, __m512i (&dot)[R][T], __m512i (&doth)[R][T]) {
    __m512i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) wv[r] = wslice<BITS, NL, I>(wr[r], K, ci, cb, m, lut);
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        const __m512i xv = ldm(xr[t] + (size_t)ci * 512 + I * cb * 4, m);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            if (SB == 3 && I >= 4) doth[r][t] = dps<BITS, NL>(doth[r][t], wv[r], xv);
            else dot[r][t] = dps<BITS, NL>(dot[r][t], wv[r], xv);
        }
    }
}

// the 8 slices of chunk ci (cb blocks) of R rows x T tokens
template <int BITS, bool NL, int SB, int R, int T>
TF_INLINE void chunk_slices(const uint8_t* const* wr, const int8_t* const* xr, int K, int ci, int cb, __mmask64 m,
                            __m512i lut, __m512i (&dot)[R][T], __m512i (&doth)[R][T]) {
    slice_step<BITS, NL, SB, R, T, 0>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 1>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 2>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 3>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 4>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 5>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 6>(wr, xr, K, ci, cb, m, lut, dot, doth);
    slice_step<BITS, NL, SB, R, T, 7>(wr, xr, K, ci, cb, m, lut, dot, doth);
}

// A row's last chunk where it holds fewer than 16 blocks (576 columns: 16 + 2), laid out as a whole one, zero past
// its blocks: the activations' part once per product (ActTail), the weights' once per prefill panel, and on AVX2
// per decode tile (tail_rows). Every chunk then takes the same whole-vector loads: AVX2 has no masked byte loads,
// and their stand-ins are calls, each of which spilled every live register (a 576-wide row's 2-block tail cost
// prefill 3 whole chunks).
constexpr int tail_row_bytes(int bits) { return bits == 8 ? 512 : bits == 6 ? 384 : 256; }

// per token: 8 slices of 64 bytes (x); 16 floats of each block's scale, sum and first half's sum (dx, xs, xsl);
// 16 integer block sums, then 16 first-half sums (si). For a dense tail (below; units > 0) x holds its own layout
// instead (`units` vectors a token, 256 bytes apart), with the block scales replicated over its lanes (dxr: 16
// floats a token) and the replication's lane order (rep: lane l takes block l % cb).
struct ActTail {
    const int8_t* x;
    const float *dx, *xs, *xsl;
    const int32_t* si;
    const float* dxr;
    const int32_t* rep;
    int units;
};

// A dense tail: where a 4- or 8-bit row's partial last chunk has 2, 4 or 8 blocks (576 columns: 16 + 2; 8960: 17 x
// 16 + 8), its bytes are read as they lie, cb * 16 (4-bit) or cb * 32 (8-bit) of them, in cb / 2 vectors, rather
// than as a whole chunk of 16 blocks mostly zero. Laid out as 8 slices of cb lanes, a vector's lane l then holds
// block l % cb (cb divides 8), so the integer dots stay per lane, and a lane's scale is its block's, replicated:
// the final sum over lanes adds the slices up. A 576-wide row's tail had cost as much as its whole chunk (3072 x
// 576 took 1.9x the time of 3072 x 512). 6-bit codes and other block counts keep the whole-chunk copy.
static inline bool dense_tail(int bits, int cb) { return (bits == 4 || bits == 8) && (cb == 2 || cb == 4 || cb == 8); }

// unit u of a dense tail's weights (p: the row's tail + u * (BITS == 4 ? 32 : 64)): 4-bit codes as 32 bytes whose
// low nibbles (slices 0-3) fill the low half and high nibbles (slices 4-7) the high half; 8-bit codes as they are
template <int BITS, bool NL>
TF_INLINE __m512i unit_w(const uint8_t* p, __m512i lut) {
    if constexpr (BITS == 8) {
        return _mm512_loadu_si512(p);
    } else {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)p), nib = _mm256_set1_epi8(0x0F);
        __m256i lo = _mm256_and_si256(raw, nib), up = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
#ifdef TF_AVX2
        if constexpr (NL) {
            lo = _mm256_shuffle_epi8(lut.a, lo);
            up = _mm256_shuffle_epi8(lut.a, up);
        }
        return {lo, up};
#else
        if constexpr (NL) {
            lo = _mm256_shuffle_epi8(_mm512_castsi512_si256(lut), lo);
            up = _mm256_shuffle_epi8(_mm512_castsi512_si256(lut), up);
        }
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), up, 1);
#endif
    }
}

// a dense tail's integer dots of R rows (wr: each row's tail) x T tokens (xd: the first token's units)
template <int BITS, bool NL, int R, int T>
TF_INLINE void tail_dots(const uint8_t* const* wr, const int8_t* xd, int units, __m512i lut, __m512i (&dot)[R][T]) {
    for (int u = 0; u < units; u++) {
        __m512i wv[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = unit_w<BITS, NL>(wr[r] + u * (BITS == 4 ? 32 : 64), lut);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const __m512i xv = _mm512_loadu_si512(xd + (size_t)t * 256 + u * 64);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) dot[r][t] = dpb<BITS, NL>(dot[r][t], wv[r], xv);
        }
    }
}

// the first cb (< 16) 4-byte lanes of p, the rest zero, without a call (memcpy and memset of a few bytes per slice
// and row were a fifth of the server's batched decode step on AVX2)
static inline __m512i lanes32(int cb, const void* p) {
#ifdef TF_AVX2
    return tf_lanes_epi32(cb, p);
#else
    return _mm512_maskz_loadu_epi32((__mmask16)((1u << cb) - 1), p);
#endif
}

// rows n0..n1's last chunk (cb blocks): per row 4 slices of 64 bytes (4-bit), those and 2 of high bits (6-bit),
// or 8 (8-bit), zero past the blocks
template <int BITS>
static void tail_rows(const uint8_t* W, int K, int n0, int n1, int cb, uint8_t* out) {
    const size_t rb = (size_t)K * BITS / 8, tw = tail_row_bytes(BITS);
    const int lc = (K / 32 - 1) / 16;
    for (int n = n0; n < n1; n++) {
        const uint8_t* w = W + (size_t)n * rb;
        uint8_t* o = out + (size_t)(n - n0) * tw;
        const int slices = BITS == 8 ? 8 : 4;
        for (int i = 0; i < slices; i++)
            _mm512_storeu_si512(o + i * 64, lanes32(cb, w + (size_t)lc * (BITS == 8 ? 512 : 256) + i * cb * 4));
        if (BITS == 6)
            for (int h = 0; h < 2; h++)
                _mm512_storeu_si512(o + 256 + h * 64, lanes32(cb, w + K / 2 + (size_t)lc * 128 + h * cb * 4));
    }
}

// The choices AVX2 makes differently, where 16 256-bit registers hold each vector's two halves (bench/README.md):
// - ONE_ROW: one row per tile of prefill and of a few tokens (3 rows spilled most of the dots: 41% of prefill's
//   samples were stack loads and stores);
// - PANEL_M: prefill's panels (the sums in memory) from 4 tokens on, where tiles of registers spilled too (the
//   server's batched decode of 4 rows cost 2x per token what 8 did);
// - COPY_TAIL: decode's tiles copy a partial chunk too (AVX-512's masked loads need no copy).
#ifdef TF_AVX2
constexpr bool ONE_ROW = true, COPY_TAIL = true;
constexpr int PANEL_M = 3;
#else
constexpr bool ONE_ROW = false, COPY_TAIL = false;
constexpr int PANEL_M = 16;
#endif

template <int BITS, bool NL, int SB, int R, int T>
static inline void tile(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int n,
                        const int8_t* XQ, const float* DX, const float* XS, const float* XSL, const ActTail& at,
                        int t0, float* Y, __m512i lut, float low, bool prefetch) {
    const int nb = K / 32;
    const size_t row_bytes = (size_t)K * BITS / 8;
    const uint8_t* wr[R];
    const int8_t* xr[T];
    for (int r = 0; r < R; r++) wr[r] = W + (size_t)(n + r) * row_bytes;
    for (int t = 0; t < T; t++) xr[t] = XQ + (size_t)(t0 + t) * K;
    const int chunks = (nb + 15) / 16;
    // prefetch the next whole tiles (at least PREFETCH bytes), spread evenly over this tile's chunks: a fixed
    // distance from the first row fell inside this tile's own later rows where rows are long (down_proj's 8960
    // columns, 3 of its 4 rows, and Q6_K's high-bit plane: 0.80 ms for 1536 x 8960 in Q6_K, now 0.26)
    const size_t tile_bytes = R * row_bytes, ahead = tile_bytes * ((PREFETCH + tile_bytes - 1) / tile_bytes);
    const int lpc = (int)((tile_bytes / 64 + chunks - 1) / chunks);  // cache lines to prefetch per chunk
    __m512 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    constexpr int TW = tail_row_bytes(BITS);
    alignas(64) uint8_t wt[COPY_TAIL ? R * TW : 1];
    const uint8_t* wtr[R];
    const int8_t* xtr[T];
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16, cb = nb - c < 16 ? nb - c : 16;
        const __mmask16 km = (__mmask16)((1u << cb) - 1);
        const bool dense = cb < 16 && at.units;  // (see dense_tail)
        const bool copied = COPY_TAIL && cb < 16 && !dense;  // the partial chunk as a whole one (see ActTail)
        if (prefetch)  // whole tiles ahead: one thread alone keeps too few loads in flight otherwise
            for (int l = 0; l < lpc; l++) _mm_prefetch((const char*)(wr[0] + ahead + (size_t)(ci * lpc + l) * 64), _MM_HINT_T0);
        __m512i dot[R][T], doth[R][T];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) dot[r][t] = doth[r][t] = _mm512_setzero_si512();
        if constexpr (BITS == 4 || BITS == 8) {
            if (dense) {
                const uint8_t* wd[R];
                for (int r = 0; r < R; r++) wd[r] = wr[r] + (size_t)ci * (BITS == 8 ? 512 : 256);
                tail_dots<BITS, NL, R, T>(wd, at.x + (size_t)t0 * 256, at.units, lut, dot);
                const __m512i ix = _mm512_loadu_si512(at.rep);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m512 dw, mw;
                    block_scales<SB>(D, Mn, N, nb, n + r, c, km, low, &dw, &mw);
                    const __m512 dwr = _mm512_permutexvar_ps(ix, dw);
#pragma GCC unroll 8
                    for (int t = 0; t < T; t++) {
                        const __m512 dx = _mm512_loadu_ps(at.dxr + (size_t)(t0 + t) * 16);
                        __m512 a = _mm512_fmadd_ps(mw, _mm512_loadu_ps(at.xs + (size_t)(t0 + t) * 16), acc[r][t]);
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), _mm512_mul_ps(dwr, dx), a);
                    }
                }
                continue;
            }
        }
        if (copied) {
            tail_rows<BITS>(W, K, n, n + R, cb, wt);
            for (int r = 0; r < R; r++) wtr[r] = wt + r * TW;
            for (int t = 0; t < T; t++) xtr[t] = at.x + (size_t)(t0 + t) * 512;
        }
        chunk_slices<BITS, NL, SB, R, T>(copied ? wtr : wr, copied ? xtr : xr, copied ? 512 : K, copied ? 0 : ci,
                                         copied ? 16 : cb, copied ? ~0ULL : lanes_mask(cb), lut, dot, doth);
        widen16<BITS, NL, SB, R, T>(dot, doth);
        const __mmask16 kx = copied ? (__mmask16)0xFFFF : km;  // the activations' values: whole where copied
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512 dw, mw, dh = _mm512_setzero_ps(), ml = _mm512_setzero_ps();
            if constexpr (SB == 3) {
                half_scales(D, Mn, nb, n + r, c, km, &dw, &dh);
                mw = _mm512_mul_ps(_mm512_set1_ps(low), dh);  // low * (second-half scale) over the whole block
                ml = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(low), dw), mw);  // the first half's difference
            } else {
                block_scales<SB>(D, Mn, N, nb, n + r, c, km, low, &dw, &mw);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const size_t o = copied ? (size_t)(t0 + t) * 16 : (size_t)(t0 + t) * nb + c;
                const __m512 dx = _mm512_maskz_loadu_ps(kx, (copied ? at.dx : DX) + o);
                __m512 a = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(kx, (copied ? at.xs : XS) + o), acc[r][t]);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), _mm512_mul_ps(dw, dx), a);
                if constexpr (SB == 3) {
                    a = _mm512_fmadd_ps(ml, _mm512_maskz_loadu_ps(kx, (copied ? at.xsl : XSL) + o), a);
                    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(doth[r][t]), _mm512_mul_ps(dh, dx), a);
                }
                acc[r][t] = a;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) Y[(size_t)(t0 + t) * N + n + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// Prefill's inner loop: one full chunk (16 blocks) of R rows x T tokens into integer dots. Slices j and 4 + j of
// a 4- or 6-bit row share their bytes (one load); each activation slice is loaded once into a register and used
// by the R rows (folded into each product as a memory operand, the loads ran R times and bounded the loop).
template <int BITS, bool NL, int SB, int R, int T>
TF_INLINE void chunk_dots(const uint8_t* w, size_t rb, const int8_t* x, size_t K, const uint8_t* hi, __m512i lut,
                          __m512i (&dot)[R][T], __m512i (&doth)[R][T]) {
    if constexpr (BITS == 8) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m512i wv[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                wv[r] = _mm512_loadu_si512(w + r * rb + i * 64);
                TF_KEEP(wv[r]);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                __m512i xv = _mm512_loadu_si512(x + t * K + i * 64);
                TF_KEEP(xv);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) dot[r][t] = dpb<BITS, NL>(dot[r][t], wv[r], xv);
            }
        }
    } else if (BITS == 4 && ONE_ROW) {
        // AVX2 (one row, 16 registers): the low nibbles' products for the T tokens, then the high ones', the row's
        // bytes loaded again (from L1) between: lo and up both live with 4 tokens' sums spilled them to the stack
        const __m512i nib = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m512i lo[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                lo[r] = _mm512_and_si512(_mm512_loadu_si512(w + r * rb + j * 64), nib);
                if constexpr (NL) lo[r] = _mm512_shuffle_epi8(lut, lo[r]);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) dot[r][t] = dps<BITS, NL>(dot[r][t], lo[r], _mm512_loadu_si512(x + t * K + j * 64));
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                lo[r] = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(w + r * rb + j * 64), 4), nib);
                if constexpr (NL) lo[r] = _mm512_shuffle_epi8(lut, lo[r]);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m512i xv = _mm512_loadu_si512(x + t * K + (4 + j) * 64);
                    if constexpr (SB == 3) doth[r][t] = dps<BITS, NL>(doth[r][t], lo[r], xv);
                    else dot[r][t] = dps<BITS, NL>(dot[r][t], lo[r], xv);
                }
        }
    } else {
        const __m512i nib = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m512i lo[R], up[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512i raw = _mm512_loadu_si512(w + r * rb + j * 64);
                lo[r] = _mm512_and_si512(raw, nib);
                up[r] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
                if constexpr (BITS == 6) {  // the pair of high bits of slice j (and 4 + j) to bits 4..5
                    const int sh = 4 - 2 * j;
                    const __m512i h0 = _mm512_loadu_si512(hi + r * rb), h1 = _mm512_loadu_si512(hi + r * rb + 64);
                    const __m512i s0 = sh > 0 ? _mm512_slli_epi16(h0, sh) : sh < 0 ? _mm512_srli_epi16(h0, -sh) : h0;
                    const __m512i s1 = sh > 0 ? _mm512_slli_epi16(h1, sh) : sh < 0 ? _mm512_srli_epi16(h1, -sh) : h1;
                    lo[r] = _mm512_ternarylogic_epi32(lo[r], s0, _mm512_set1_epi8(0x30), 0xF8);  // lo | (s0 & 0x30)
                    up[r] = _mm512_ternarylogic_epi32(up[r], s1, _mm512_set1_epi8(0x30), 0xF8);
                }
                if constexpr (NL) {
                    lo[r] = _mm512_shuffle_epi8(lut, lo[r]);
                    up[r] = _mm512_shuffle_epi8(lut, up[r]);
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                __m512i xv = _mm512_loadu_si512(x + t * K + j * 64);
                TF_KEEP(xv);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) dot[r][t] = dps<BITS, NL>(dot[r][t], lo[r], xv);
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                __m512i xv = _mm512_loadu_si512(x + t * K + (4 + j) * 64);
                TF_KEEP(xv);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    if constexpr (SB == 3) doth[r][t] = dps<BITS, NL>(doth[r][t], up[r], xv);
                    else dot[r][t] = dps<BITS, NL>(dot[r][t], up[r], xv);
                }
            }
        }
    }
}

// A row's block scales as fp32 vectors, two per chunk of 16 blocks (its scales and ms; SB 3: the scales of its
// blocks' two halves, the ms joining the integer dot): written once per row and read by every tile of tokens that
// passes over it, where tile() decodes them again for each.
template <int SB>
static inline void row_scales(const uint16_t* D, const uint16_t* Mn, int N, int nb, int n, float low, float* out,
                              const int32_t* rep) {
    const int chunks = (nb + 15) / 16;
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16, cb = nb - c < 16 ? nb - c : 16;
        const __mmask16 km = (__mmask16)((1u << cb) - 1);
        __m512 a, b;
        if constexpr (SB == 3) half_scales(D, Mn, nb, n, c, km, &a, &b);
        else block_scales<SB>(D, Mn, N, nb, n, c, km, low, &a, &b);
        if (SB != 3 && cb < 16 && rep) a = _mm512_permutexvar_ps(_mm512_loadu_si512(rep), a);  // a dense tail's
        _mm512_storeu_ps(out + (size_t)ci * 32, a);
        _mm512_storeu_ps(out + (size_t)ci * 32 + 16, b);
    }
}

// Prefill's tile: R rows x T tokens over the whole row, like tile() (whose generic code still takes a row's last,
// partial chunk), with the rows' scales from row_scales() (SC: per row, its chunks' vectors) and the float sums
// kept in memory so that the registers hold the integer dots.
template <int BITS, bool NL, int SB, int R, int T>
static inline void ptile(const uint8_t* W, const float* SC, int N, int K, int n, const int8_t* XQ, const float* DX,
                         const float* XS, const int32_t* SI, const uint8_t* wt, const ActTail& at, int t0, float* Y,
                         __m512i lut, float low) {
    const int nb = K / 32, chunks = (nb + 15) / 16;
    const size_t rb = (size_t)K * BITS / 8, cw = BITS == 8 ? 512 : 256;
    const uint8_t* w0 = W + (size_t)n * rb;
    const int8_t* x0 = XQ + (size_t)t0 * K;
    constexpr size_t TW = tail_row_bytes(BITS);
    alignas(64) float acc[R][T][16];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) _mm512_store_ps(acc[r][t], _mm512_setzero_ps());
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16;
        const bool whole = nb - c >= 16;
        __m512i dot[R][T], doth[R][T];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) dot[r][t] = doth[r][t] = _mm512_setzero_si512();
        // the row's partial last chunk from the panel's copy (wt: this tile's rows) and the activations' (at)
        const bool dense = !whole && at.units;
        if constexpr (BITS == 4 || BITS == 8) {
            if (dense) {
                const uint8_t* wd[R];
                for (int r = 0; r < R; r++) wd[r] = w0 + r * rb + (size_t)ci * cw;
                tail_dots<BITS, NL, R, T>(wd, at.x + (size_t)t0 * 256, at.units, lut, dot);
            }
        }
        if (!dense) {
            const uint8_t* wc = whole ? w0 + (size_t)ci * cw : wt;
            chunk_dots<BITS, NL, SB, R, T>(wc, whole ? rb : TW, whole ? x0 + (size_t)ci * 512 : at.x + (size_t)t0 * 512,
                                            whole ? K : 512, whole ? w0 + K / 2 + (size_t)ci * 128 : wt + 256, lut,
                                            dot, doth);
            widen16<BITS, NL, SB, R, T>(dot, doth);
        }
        // the activations' block scales and sums of this chunk: per token, 16 of each (stride xst; si: sst, the
        // first halves' sums sf after the blocks'); a dense tail's scales replicated over its lanes
        const float* dx0 = whole ? DX + (size_t)t0 * nb + c : (dense ? at.dxr : at.dx) + (size_t)t0 * 16;
        const size_t xst = whole ? nb : 16;
        if constexpr (SB >= 2) {
            // no mins (m = low * scale): the low * sum(x) term joins the integer dot, which leaves 2 (SB 3: 3)
            // float multiplies per row and token where there were 3 (6)
            const int32_t* si0 = whole ? SI + (size_t)t0 * 2 * nb + c : at.si + (size_t)t0 * 32;
            const size_t sst = whole ? 2 * nb : 32, sf = whole ? nb : 16;
            const __m512i lw = _mm512_set1_epi32((int)low);
            __m512i ls[T], lsh[T];  // low * the sums over each block (SB 3: over its first and second halves)
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const __m512i all = _mm512_loadu_si512(si0 + (size_t)t * sst);
                if constexpr (SB == 3) {
                    const __m512i first = _mm512_loadu_si512(si0 + (size_t)t * sst + sf);
                    ls[t] = _mm512_mullo_epi32(lw, first);
                    lsh[t] = _mm512_mullo_epi32(lw, _mm512_sub_epi32(all, first));
                } else {
                    ls[t] = _mm512_mullo_epi32(lw, all);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const float* sc = SC + (size_t)r * chunks * 32 + (size_t)ci * 32;
                const __m512 dw = _mm512_loadu_ps(sc);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    const __m512 dx = _mm512_loadu_ps(dx0 + (size_t)t * xst);
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r][t], ls[t]));
                    __m512 a = _mm512_load_ps(acc[r][t]);
                    if constexpr (SB == 3) {
                        const __m512 hi = _mm512_cvtepi32_ps(_mm512_add_epi32(doth[r][t], lsh[t]));
                        const __m512 v = _mm512_fmadd_ps(hi, _mm512_loadu_ps(sc + 16), _mm512_mul_ps(lo, dw));
                        a = _mm512_fmadd_ps(v, dx, a);
                    } else {
                        a = _mm512_fmadd_ps(lo, _mm512_mul_ps(dw, dx), a);
                    }
                    _mm512_store_ps(acc[r][t], a);
                }
            }
            continue;
        }
        const float* xs0 = whole ? XS + (size_t)t0 * nb + c : at.xs + (size_t)t0 * 16;
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const float* sc = SC + (size_t)r * chunks * 32 + (size_t)ci * 32;
            const __m512 dw = _mm512_loadu_ps(sc), mw = _mm512_loadu_ps(sc + 16);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const __m512 dx = _mm512_loadu_ps(dx0 + (size_t)t * xst);
                const __m512 xs = _mm512_loadu_ps(xs0 + (size_t)t * xst);
                __m512 a = _mm512_fmadd_ps(mw, xs, _mm512_load_ps(acc[r][t]));
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), _mm512_mul_ps(dw, dx), a);
                _mm512_store_ps(acc[r][t], a);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) Y[(size_t)(t0 + t) * N + n + r] = _mm512_reduce_add_ps(_mm512_load_ps(acc[r][t]));
}

template <int BITS, bool NL, int SB>
static void gemm(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, const int8_t* XQ,
                 const float* DX, const float* XS, const float* XSL, const int32_t* SI, const ActTail& at, int M,
                 float* Y, int threads, const uint8_t* lut16, float low) {
    const __m512i lut = load_lut(lut16);
    // rows per tile: the accumulators fill the 32 vector registers (AVX2: ONE_ROW)
    constexpr int RR = ONE_ROW ? 1 : SB == 3 ? 2 : 3;
#define TF_TILE(R, T, n, t, pf) tile<BITS, NL, SB, R, T>(W, D, Mn, N, K, n, XQ, DX, XS, XSL, at, t, Y, lut, low, pf)
#ifdef TF_AVX2
    if constexpr ((BITS == 4 || BITS == 6) && !NL) {  // decode and prefill on AVX2: see decode_avx2.h
        if (tf_avx2::fits(K)) {
            const int nb = K / 32;
            thread_local std::vector<int32_t> spb;
            if (SB == 3 && low != 0) {  // each block's half sums as int16 pairs
                spb.resize((size_t)M * nb);
                for (int t = 0; t < M; t++) {
                    const int32_t* si = SI + (size_t)t * 2 * nb;
                    for (int b = 0; b < nb; b++)
                        spb[(size_t)t * nb + b] =
                            (int32_t)(((uint32_t)(si[b] - si[nb + b]) << 16) | ((uint32_t)si[nb + b] & 0xFFFF));
                }
            }
            const int32_t* sp = spb.data();
            const int lw = (int)low;
            if (M == 1) {
                // one row at a time, each thread on a contiguous run of rows (Qwen2.5-1.5B Q4_K_M decode,
                // interleaved: 4 rows a pass 1.0, 3 1.07, 2 1.16, 1 1.26-1.31; without the prefetch 0.43-0.53)
#pragma omp parallel for num_threads(threads) schedule(static)
                for (int n = 0; n < N; n++)
                    tf_avx2::decode_row<BITS, SB>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, Y);
                return;
            }
            if (M <= PANEL_M) {  // a few tokens (the server's batched decode): the weights streamed as for one
#pragma omp parallel for num_threads(threads) schedule(static)
                for (int n = 0; n < N; n++) {
                    if (M == 2) tf_avx2::tokens<BITS, SB, 2>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, 0, Y, true);
                    else tf_avx2::tokens<BITS, SB, 3>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, 0, Y, true);
                }
                return;
            }
            // prefill: panels of rows kept in L2 while every 4 tokens' activations, in L1, pass over them
            int nc = (int)((512 * 1024) / (K * BITS / 8));
            nc = nc < 16 ? 16 : nc > 192 ? 192 : nc;
            while (nc > 16 && (N + nc - 1) / nc < 2 * threads) nc -= 8;
            const int panels = (N + nc - 1) / nc, m4 = M / 4 * 4;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
            for (int p = 0; p < panels; p++) {
                const int n0 = p * nc, n1 = n0 + nc < N ? n0 + nc : N;
                for (int t = 0; t < m4; t += 4)
                    for (int n = n0; n < n1; n++)
                        tf_avx2::tokens<BITS, SB, 4>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, t, Y);
                for (int n = n0; n < n1; n++) {
                    int t = m4;
                    if (t + 2 <= M) {
                        tf_avx2::tokens<BITS, SB, 2>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, t, Y);
                        t += 2;
                    }
                    if (t < M) tf_avx2::tokens<BITS, SB, 1>(W, D, Mn, N, K, n, XQ, DX, XS, SI, sp, lw, t, Y);
                }
            }
            return;
        }
    }
#endif
    if (M == 1) {  // decode: four rows at a time, the weights streamed with prefetch (bandwidth-bound)
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int chunk = 0; chunk < (N + 15) / 16; chunk++) {
            const int n0 = chunk * 16, n1 = n0 + 16 < N ? n0 + 16 : N;
            int n = n0;
            for (; n + 4 <= n1; n += 4) TF_TILE(4, 1, n, 0, true);
            for (; n < n1; n++) TF_TILE(1, 1, n, 0, false);
        }
        return;
    }
    const int nb = K / 32, chunks = (nb + 15) / 16;
    if (M > PANEL_M) {
        // prefill: panels of rows whose weights stay in L2 while every 4-token tile of activations, in L1, passes
        // over them (activations streamed from L2 past each row tile instead took as many bytes as the products
        // could use: 8-bit activations weigh twice the 4-bit weights)
        int nc = (int)((512 * 1024) / (K * BITS / 8)) / 6 * 6;
        nc = nc < 24 ? 24 : nc > 192 ? 192 : nc;
        while (nc > 24 && (N + nc - 1) / nc < 2 * threads) nc -= 6;  // enough panels for the threads
        const int panels = (N + nc - 1) / nc, m4 = M / 4 * 4;
        const int cbt = at.units ? 0 : nb % 16;  // blocks of the rows' last chunk to copy (ActTail)
        constexpr size_t TW = tail_row_bytes(BITS);
#pragma omp parallel num_threads(threads)
        {
            thread_local std::vector<float> scb;
            thread_local std::vector<uint8_t> wtb;
            if (scb.size() < (size_t)nc * chunks * 32) scb.resize((size_t)nc * chunks * 32);
            if (cbt && wtb.size() < (size_t)nc * TW) wtb.resize((size_t)nc * TW);
            float* sc = scb.data();
#pragma omp for schedule(dynamic, 1)
            for (int p = 0; p < panels; p++) {
                const int n0 = p * nc, n1 = n0 + nc < N ? n0 + nc : N, nr = (n1 - n0) / RR * RR;
                for (int n = n0; n < n1; n++)
                    row_scales<SB>(D, Mn, N, nb, n, low, sc + (size_t)(n - n0) * chunks * 32, at.units ? at.rep : nullptr);
                if (cbt) tail_rows<BITS>(W, K, n0, n1, cbt, wtb.data());
                const uint8_t* wt = wtb.data();  // this panel's partial last chunks, TW bytes a row
                for (int t = 0; t < m4; t += 4) {
                    int n = n0;
                    for (; n < n0 + nr; n += RR)
                        ptile<BITS, NL, SB, RR, 4>(W, sc + (size_t)(n - n0) * chunks * 32, N, K, n, XQ, DX, XS, SI,
                                                   wt + (n - n0) * TW, at, t, Y, lut, low);
                    for (; n < n1; n++)
                        ptile<BITS, NL, SB, 1, 4>(W, sc + (size_t)(n - n0) * chunks * 32, N, K, n, XQ, DX, XS, SI,
                                                  wt + (n - n0) * TW, at, t, Y, lut, low);
                }
                for (int n = n0; n < n1; n++) {  // the last M % 4 tokens
                    int t = m4;
                    if (t + 2 <= M) { TF_TILE(1, 2, n, t, false); t += 2; }
                    if (t < M) TF_TILE(1, 1, n, t, false);
                }
            }
        }
        return;
    }
    // a few tokens (the server's batched decode): each weight is read once, from memory, so prefetch it as decode
    // does (without, 9 GB/s here against 45)
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int chunk = 0; chunk < (N + 17) / 18; chunk++) {  // 18 rows: a multiple of 2 and 3
        const int n0 = chunk * 18, n1 = n0 + 18 < N ? n0 + 18 : N;
        int n = n0;
        for (; n + RR <= n1; n += RR) {
            int t = 0;
            for (; t + 4 <= M; t += 4) TF_TILE(RR, 4, n, t, true);
            if (t + 2 <= M) { TF_TILE(RR, 2, n, t, true); t += 2; }
            if (t < M) TF_TILE(RR, 1, n, t, true);
        }
        for (; n < n1; n++) {
            int t = 0;
            for (; t + 4 <= M; t += 4) TF_TILE(1, 4, n, t, false);
            if (t + 2 <= M) { TF_TILE(1, 2, n, t, false); t += 2; }
            if (t < M) TF_TILE(1, 1, n, t, false);
        }
    }
#undef TF_TILE
}

// Weights back to floats: bf16 (round to nearest even) for prefill's large-M products, which run faster as a bf16
// GEMM on AMX tiles (oneDNN, through torch) than as int8 dot products, and fp32 (exact) for a tied embedding's rows:
// out[n, k] = u[n, k] * d + m (u through lut where it is given).
template <typename OutT>
static void dequant_t(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int bits,
                      const uint8_t* lut, int sb, int low, OutT* out, int threads) {
    const int nb = K / 32, ns = nb / 8;
    const uint8_t* codes = (const uint8_t*)Mn;
    const size_t row_bytes = (size_t)K * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t* w = W + (size_t)n * row_bytes;
        OutT* o = out + (size_t)n * K;
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
            const int c = b / 16, cb = nb - c * 16 < 16 ? nb - c * 16 : 16, bl = b % 16;
            const uint8_t* p = w + (size_t)c * (bits == 8 ? 512 : 256) + bl * 4;  // vector j: + j * cb * 4
            const uint8_t* hb = w + K / 2 + (size_t)c * 128 + bl * 4;            // 6-bit high vectors h: + h * cb * 4
            OutT* q = o + b * 32;
            for (int e = 0; e < 32; e++) {
                const int half = e >> 4, j = (e & 15) >> 2, t = e & 3;
                int u;
                if (bits == 8) {
                    u = p[(e >> 2) * cb * 4 + t];
                } else {
                    const uint8_t byte = p[j * cb * 4 + t];
                    u = half ? byte >> 4 : byte & 15;
                    if (bits == 6) u |= ((hb[half * cb * 4 + t] >> (2 * j)) & 3) << 4;
                }
                const float v = (float)(lut ? lut[u] : u) * d[half] + m[half];
                if constexpr (sizeof(OutT) == 4) {
                    q[e] = v;
                } else {
                    uint32_t a;
                    memcpy(&a, &v, 4);
                    q[e] = (uint16_t)((a + 0x7FFFu + ((a >> 16) & 1u)) >> 16);
                }
            }
        }
    }
}

extern "C" {

// x: fp32 [M, K] -> xq int8 [M, K] (slice order, see the top of this file), dx, xs and xsl (xs over each block's
// first 16) fp32 [M, K/32], and si int32 [M, 2, K/32]: each block's sum of codes, then its first half's
void quantize_act(const float* x, int M, int K, int8_t* xq, float* dx, float* xs, float* xsl, int32_t* si,
                  int threads) {
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
            alignas(16) int8_t q[32];
            _mm_store_si128((__m128i*)q, _mm512_cvtsepi32_epi8(q0));
            _mm_store_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(q1));
            const int c = b / 16, cb = nb - c * 16 < 16 ? nb - c * 16 : 16;
            int8_t* base = xq + (size_t)t * K + (size_t)c * 512 + (b % 16) * 4;
            for (int i = 0; i < 8; i++) memcpy(base + i * cb * 4, q + 4 * i, 4);
            dx[(size_t)t * nb + b] = d;
            const int s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
            xs[(size_t)t * nb + b] = d * (float)(s0 + s1);
            xsl[(size_t)t * nb + b] = d * (float)s0;
            si[(size_t)t * 2 * nb + b] = s0 + s1;  // the integer sums: the block's, then its first half's
            si[(size_t)t * 2 * nb + nb + b] = s0;
        }
    }
}

void dequant_bf16(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int bits, const uint8_t* lut,
                  int sb, int low, uint16_t* out, int threads) {
    dequant_t<uint16_t>(W, D, Mn, N, K, bits, lut, sb, low, out, threads);
}

void dequant_f32(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int bits, const uint8_t* lut,
                 int sb, int low, float* out, int threads) {
    dequant_t<float>(W, D, Mn, N, K, bits, lut, sb, low, out, threads);
}

// The activations' part of the rows' partial last chunk (ActTail; per-thread scratch): laid out whole, or for a
// dense tail (bits: the weights') in its units; empty where K is a multiple of 512.
static ActTail act_tail(const int8_t* XQ, const float* DX, const float* XS, const float* XSL, const int32_t* SI, int M,
                        int K, int bits) {
    thread_local std::vector<int8_t> xt;
    thread_local std::vector<float> vt;
    thread_local std::vector<int32_t> st;
    const int nb = K / 32, cb = nb % 16, lc = nb / 16;
    if (!cb) return ActTail{};
    const bool dense = dense_tail(bits, cb);
    xt.assign((size_t)M * (dense ? 256 : 512), 0);
    vt.assign((size_t)M * 64, 0.0f);
    st.assign((size_t)M * 32 + 16, 0);
    float *dx = vt.data(), *xs = dx + (size_t)M * 16, *xsl = xs + (size_t)M * 16, *dxr = xsl + (size_t)M * 16;
    int32_t* rep = st.data() + (size_t)M * 32;
    for (int l = 0; l < 16; l++) rep[l] = l % cb;
    for (int t = 0; t < M; t++) {
        const int8_t* x = XQ + (size_t)t * K + (size_t)lc * 512;
        if (!dense) {
            for (int i = 0; i < 8; i++) memcpy(&xt[(size_t)t * 512 + i * 64], x + i * cb * 4, cb * 4);
        } else if (bits == 8) {  // the slices as they lie
            memcpy(&xt[(size_t)t * 256], x, cb * 32);
        } else {  // 4-bit: unit u holds bytes 32u.. of slices 0-3, then the same of slices 4-7
            for (int u = 0; u < cb / 2; u++) {
                memcpy(&xt[(size_t)t * 256 + u * 64], x + u * 32, 32);
                memcpy(&xt[(size_t)t * 256 + u * 64 + 32], x + cb * 16 + u * 32, 32);
            }
        }
        const size_t o = (size_t)t * nb + lc * 16;
        memcpy(dx + (size_t)t * 16, DX + o, cb * 4);
        memcpy(xs + (size_t)t * 16, XS + o, cb * 4);
        memcpy(xsl + (size_t)t * 16, XSL + o, cb * 4);
        for (int l = 0; l < 16; l++) dxr[(size_t)t * 16 + l] = DX[o + rep[l]];
        memcpy(&st[(size_t)t * 32], SI + (size_t)t * 2 * nb + lc * 16, cb * 4);
        memcpy(&st[(size_t)t * 32 + 16], SI + (size_t)t * 2 * nb + nb + lc * 16, cb * 4);
    }
    return ActTail{xt.data(), dx, xs, xsl, st.data(), dxr, rep, dense ? cb / 2 : 0};
}

// One call per linear layer: quantize the activations (into per-thread scratch), then the product.
void linear(const float* x, int M, int K, const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int bits,
            const uint8_t* lut, int sb, int low, float* Y, int threads) {
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, xs, xsl;
    thread_local std::vector<int32_t> si;
    const size_t nb = (size_t)M * (K / 32);
    if (xq.size() < (size_t)M * K) xq.resize((size_t)M * K);
    if (dx.size() < nb) { dx.resize(nb); xs.resize(nb); xsl.resize(nb); si.resize(2 * nb); }
    quantize_act(x, M, K, xq.data(), dx.data(), xs.data(), xsl.data(), si.data(), threads);
    // only where a product reads it: prefill's panels, and AVX2's decode tiles (not a decode step's hot path else)
    const int cb = (K / 32) % 16;
    const ActTail at = COPY_TAIL || M > PANEL_M || dense_tail(bits, cb)
                           ? act_tail(xq.data(), dx.data(), xs.data(), xsl.data(), si.data(), M, K, bits)
                           : ActTail{};
    const int8_t* q = xq.data();
    const float *a = dx.data(), *c = xs.data(), *cl = xsl.data(), lw = (float)low;
#define TF_GEMM(B, NL, SB) \
    gemm<B, NL, SB>(W, D, Mn, N, K, q, a, c, cl, si.data(), at, M, Y, threads, NL ? lut : nullptr, lw)
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
    const QLin* next;  // a linear of several formats (a GGUF's q, k in Q4_K and v in Q6_K): its next part's
                       // outputs follow this one's, or null
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
    if (L.next) run_linear(*L.next, x, y + L.n, threads);
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

// 16 cached values as fp32 (bf16: the high halves of 32-bit words)
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16(const uint16_t* p) {
#ifdef TF_AVX2
    const __m256i a = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
    const __m256i b = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 8))), 16);
    return {_mm256_castsi256_ps(a), _mm256_castsi256_ps(b)};
#else
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#endif
}
template <typename KT>
static inline __m512 ld16n(const KT* p, int n) {  // the first n (< 16) of them, zero past
    KT buf[16] = {};
    for (int i = 0; i < n; i++) buf[i] = p[i];
    return ld16(buf);
}

// Scores of GN heads (q pre-scaled, [GN, hd]) over 16 positions of the keys (kr: [hd, cap] from the block's first
// position; n <= 16 of them), summed in registers over the head dimension: each key vector is loaded once for the
// GN heads (a head's whole row of scores loaded and stored again per key row, as before, bounded the loop)
template <typename KT, int GN>
static inline void score_block(const float* q, int hd, const KT* kr, size_t cap, int n, float* sc, int S) {
    constexpr int U = GN <= 2 ? 2 : 1;  // sums per head: one head alone was bound by the multiply-add's latency
    __m512 acc[U][GN];
    for (int u = 0; u < U; u++)
        for (int g = 0; g < GN; g++) acc[u][g] = _mm512_setzero_ps();
    int d = 0;
    for (; d + U <= hd; d += U) {
#pragma GCC unroll 2
        for (int u = 0; u < U; u++) {
            const KT* k = kr + (size_t)(d + u) * cap;
            const __m512 kv = n == 16 ? ld16(k) : ld16n(k, n);
#pragma GCC unroll 4
            for (int g = 0; g < GN; g++)
                acc[u][g] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)g * hd + d + u]), kv, acc[u][g]);
        }
    }
    for (; d < hd; d++) {  // an odd head dimension's last
        const KT* k = kr + (size_t)d * cap;
        const __m512 kv = n == 16 ? ld16(k) : ld16n(k, n);
        for (int g = 0; g < GN; g++) acc[0][g] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)g * hd + d]), kv, acc[0][g]);
    }
    alignas(64) float o[16];
    for (int g = 0; g < GN; g++) {
        _mm512_store_ps(o, U == 2 ? _mm512_add_ps(acc[0][g], acc[U - 1][g]) : acc[0][g]);
        for (int i = 0; i < n; i++) sc[(size_t)g * S + i] = o[i];
    }
}

// out[GN, 32 dims] = sum over S positions of p[g][s] * v[s, the 32 dims] (vr: [S, hd] from the block's first dim)
template <typename KT, int GN>
static inline void value_block(const float* p, int S, const KT* vr, int hd, float* out) {
    __m512 acc[GN][2];
    for (int g = 0; g < GN; g++) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int s = 0; s < S; s++) {
        const KT* v = vr + (size_t)s * hd;
        const __m512 v0 = ld16(v), v1 = ld16(v + 16);
#pragma GCC unroll 2
        for (int g = 0; g < GN; g++) {
            const __m512 pg = _mm512_set1_ps(p[(size_t)g * S + s]);
            acc[g][0] = _mm512_fmadd_ps(pg, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(pg, v1, acc[g][1]);
        }
    }
    for (int g = 0; g < GN; g++) {
        _mm512_storeu_ps(out + (size_t)g * hd, acc[g][0]);
        _mm512_storeu_ps(out + (size_t)g * hd + 16, acc[g][1]);
    }
}

// G query heads of one kv group (q: [G, hd]) over S cached positions (kc: [hd, cap], vc: [cap, hd]); fp32 softmax.
// The group's keys and values are read from memory once for its G heads, and prefetched: the cache of the step's
// earlier layers has left L3 by the time a layer comes round again, and the keys' rows of S values are streams too
// short for the hardware prefetcher (a head at a time, a 4-sequence step of the default model spent a quarter of
// its time waiting on these loads)
template <typename KT>
static void attend_group(const float* q, int G, const KT* kc, const KT* vc, int S, int cap, int hd, float scale,
                         float* out) {
    thread_local std::vector<float> scv;
    scv.resize((size_t)G * (S + hd));
    float *sc = scv.data(), *qs = sc + (size_t)G * S;
    for (int i = 0; i < G * hd; i++) qs[i] = q[i] * scale;
    const size_t vbytes = (size_t)S * hd * sizeof(KT), lines = vbytes / 64 + 1;
    const int blocks = (S + 15) / 16;
    for (int d = 0; d < hd; d++)  // the first blocks' keys
        _mm_prefetch((const char*)(kc + (size_t)d * cap), _MM_HINT_T0);
    for (int b = 0; b < blocks; b++) {
        const int s0 = b * 16, n = S - s0 < 16 ? S - s0 : 16;
        const int ahead = s0 + 64 / (int)sizeof(KT);  // keys a cache line ahead (2 or 4 made no difference)
        if ((s0 * sizeof(KT)) % 64 == 0 && ahead < S)
            for (int d = 0; d < hd; d++) _mm_prefetch((const char*)(kc + (size_t)d * cap + ahead), _MM_HINT_T0);
        for (size_t l = lines * b / blocks; l < lines * (b + 1) / blocks; l++)  // and the values, spread over them
            _mm_prefetch((const char*)vc + l * 64, _MM_HINT_T0);
        int g = 0;
        for (; g + 4 <= G; g += 4) score_block<KT, 4>(qs + (size_t)g * hd, hd, kc + s0, cap, n, sc + (size_t)g * S + s0, S);
        if (G - g == 3) score_block<KT, 3>(qs + (size_t)g * hd, hd, kc + s0, cap, n, sc + (size_t)g * S + s0, S);
        else if (G - g == 2) score_block<KT, 2>(qs + (size_t)g * hd, hd, kc + s0, cap, n, sc + (size_t)g * S + s0, S);
        else if (G - g == 1) score_block<KT, 1>(qs + (size_t)g * hd, hd, kc + s0, cap, n, sc + (size_t)g * S + s0, S);
    }
    for (int g = 0; g < G; g++) {
        float* sg = sc + (size_t)g * S;
        float mx = sg[0];
        for (int s = 1; s < S; s++) mx = sg[s] > mx ? sg[s] : mx;
        float sum = 0;
        for (int s = 0; s < S; s++) { sg[s] = expf(sg[s] - mx); sum += sg[s]; }
        for (int s = 0; s < S; s++) sg[s] /= sum;
    }
    if (hd % 32 == 0) {
        for (int d0 = 0; d0 < hd; d0 += 32) {
            int g = 0;
            for (; g + 2 <= G; g += 2) value_block<KT, 2>(sc + (size_t)g * S, S, vc + d0, hd, out + (size_t)g * hd + d0);
            if (g < G) value_block<KT, 1>(sc + (size_t)g * S, S, vc + d0, hd, out + (size_t)g * hd + d0);
        }
        return;
    }
    for (int i = 0; i < G * hd; i++) out[i] = 0;
    for (int s = 0; s < S; s++) {
        const KT* vr = vc + (size_t)s * hd;
        for (int g = 0; g < G; g++) {
            const float p = sc[(size_t)g * S + s];
            float* o = out + (size_t)g * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += p * ld(vr + d);
        }
    }
}

// attention of B sequences, each at its own position in its own cache (the server's batched decode step):
// qkv fp32 [B, H + 2 KV, hd] after RoPE; each row's k and v are stored, then every (row, kv group) attends
template <typename KT>
static void attend_rows_t(int B, int H, int KV, int hd, float scale, const float* qkv, KT* const* kcs, KT* const* vcs,
                          const int* pos, int cap, int window, float* att, int threads) {
    const size_t row = (size_t)(H + 2 * KV) * hd;
    for (int b = 0; b < B; b++)
        store_kv(qkv + b * row + (size_t)H * hd, qkv + b * row + (size_t)(H + KV) * hd, kcs[b], vcs[b], pos[b], cap,
                 KV, hd);
    const int group = H / KV;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int t = 0; t < B * KV; t++) {
        const int b = t / KV, g = t % KV, S = pos[b] + 1;
        const int start = window > 0 && S > window ? S - window : 0;
        attend_group(qkv + b * row + (size_t)g * group * hd, group, kcs[b] + (size_t)g * hd * cap + start,
                     vcs[b] + ((size_t)g * cap + start) * hd, S - start, cap, hd, scale,
                     att + ((size_t)b * H + (size_t)g * group) * hd);
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
    // by kv group, each group's keys and values read once for its heads (a head at a time read them group times:
    // 6 at Qwen2.5-1.5B, 0.8 ms a layer at 1000 positions); a group's heads split in parts where there are fewer
    // groups than threads
    const int par = S > 256 ? threads : 1, want = (par + KV - 1) / KV, parts = want < group ? want : group;
#pragma omp parallel for num_threads(threads) schedule(static) if (par > 1)
    for (int t = 0; t < KV * parts; t++) {
        const int g = t / parts, p = t % parts, h0 = g * group + group * p / parts, h1 = g * group + group * (p + 1) / parts;
        attend_group(qkv_p + (size_t)h0 * hd, h1 - h0, kc + (size_t)g * hd * cap + start,
                     vc + ((size_t)g * cap + start) * hd, S - start, cap, hd, m->scale, att_p + (size_t)h0 * hd);
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
static void run_part_rows(const QLin& L, const float* x, int M, float* y, int threads) {
    linear(x, M, L.k, L.w, L.sz, L.sb ? (const uint16_t*)L.codes : L.sz + (size_t)L.n * (L.k / 32), L.n, L.bits,
           L.lut, L.sb, L.low, y, threads);
    if (L.bias)
        for (int r = 0; r < M; r++)
            for (int i = 0; i < L.n; i++) y[(size_t)r * L.n + i] += L.bias[i];
}

static void run_linear_rows(const QLin& L, const float* x, int M, float* y, int threads) {
    if (!L.next) {
        run_part_rows(L, x, M, y, threads);
        return;
    }
    int total = 0;
    for (const QLin* p = &L; p; p = p->next) total += p->n;
    std::vector<float> part;
    int off = 0;
    for (const QLin* p = &L; p; p = p->next) {  // each part on its own, its columns into y's rows
        part.resize((size_t)M * p->n);
        run_part_rows(*p, x, M, part.data(), threads);
        for (int r = 0; r < M; r++) memcpy(y + (size_t)r * total + off, part.data() + (size_t)r * p->n, p->n * 4);
        off += p->n;
    }
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


// prefill's RMSNorm of M rows of n: out = h * rsqrt(mean(h^2) + eps) * w
void norm_rows(const float* h, const float* w, int M, int n, float eps, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int t = 0; t < M; t++) rmsnorm(h + (size_t)t * n, w, n, eps, out + (size_t)t * n);
}

// prefill's rotate-half RoPE, in place, on the first `heads` heads (of hd, the first rot dimensions) of M rows
// rs floats apart; row r takes row r % T of the tables cos, sin ([T, rot], cs floats a row)
void rope_rows(float* x, int M, int rs, int heads, int hd, int rot, const float* cos, const float* sin, int T, int cs,
               int threads) {
    const int rh = rot / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int r = 0; r < M; r++) {
        const float* c = cos + (size_t)(r % T) * cs;
        const float* s = sin + (size_t)(r % T) * cs;
        for (int head = 0; head < heads; head++) {
            float* v = x + (size_t)r * rs + (size_t)head * hd;
#pragma omp simd
            for (int i = 0; i < rh; i++) {
                const float a = v[i], b = v[i + rh];
                v[i] = a * c[i] - b * s[i];
                v[i + rh] = b * c[i + rh] + a * s[i + rh];
            }
        }
    }
}

// prefill's gated activation: out [M, F] = act(gu[:, :F]) * gu[:, F:] for gu fp32 [M, 2F] (torch's SiLU and the
// product took ~15 ms a layer of the 1.5B at 512 tokens here, over 9 GB of memory traffic)
void gate_rows(int act_kind, const float* gu, int M, int F, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 1)
    for (int t = 0; t < M; t++) gated(act_kind, gu + (size_t)t * 2 * F, F, out + (size_t)t * F);
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

// ---- load: an artifact's packed codes straight into the kernel's layout (runtime/linear.py pack_blocks) ----

// Row r of src holds K unsigned codes of src_bits each: 2, 4 or 8 bits whole per byte (lowest first), else a
// little-endian bit stream (formats/weight.py pack). dst gets the kernel's bytes of dst_bits (4, 6 or 8) codes.
static inline void unpack_row(const uint8_t* s, int K, int bits, uint8_t* u) {
    if (bits == 8) { memcpy(u, s, K); return; }
    if (bits == 4 || bits == 2) {
        const int per = 8 / bits, mask = (1 << bits) - 1;
        for (int i = 0; i < K; i++) u[i] = (s[i / per] >> ((i % per) * bits)) & mask;
        return;
    }
    const int mask = (1 << bits) - 1;
    const size_t nbytes = ((size_t)K * bits + 7) / 8;
    for (int i = 0; i < K; i++) {
        const size_t bit = (size_t)i * bits, byte = bit >> 3;
        unsigned v = s[byte] | (byte + 1 < nbytes ? (unsigned)s[byte + 1] << 8 : 0u);
        u[i] = (v >> (bit & 7)) & mask;
    }
}

static inline void pack_row(const uint8_t* u, int K, int bits, uint8_t* d) {
    const int nb = K / 32;
    uint8_t* hi = d + K / 2;  // 6-bit: every chunk's low nibbles first, then every chunk's high bits
    for (int c0 = 0; c0 < nb; c0 += 16) {
        const int cb = nb - c0 < 16 ? nb - c0 : 16;
        const uint8_t* b0 = u + (size_t)c0 * 32;
        if (bits == 8) {
            for (int i = 0; i < 8; i++)
                for (int b = 0; b < cb; b++)
                    for (int t = 0; t < 4; t++) *d++ = b0[b * 32 + 4 * i + t];
            continue;
        }
        for (int j = 0; j < 4; j++)
            for (int b = 0; b < cb; b++)
                for (int t = 0; t < 4; t++)
                    *d++ = (b0[b * 32 + 4 * j + t] & 15) | (b0[b * 32 + 16 + 4 * j + t] & 15) << 4;
        if (bits == 6)
            for (int h = 0; h < 2; h++)
                for (int b = 0; b < cb; b++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t v = 0;
                        for (int j = 0; j < 4; j++) v |= (b0[b * 32 + 16 * h + 4 * j + t] >> 4) << (2 * j);
                        *hi++ = v;
                    }
    }
}

extern "C" void repack_codes(const uint8_t* src, int src_bits, int N, int K, int dst_bits, uint8_t* dst,
                             int threads) {
    const size_t sstride = ((size_t)K * src_bits + 7) / 8, dstride = (size_t)K * dst_bits / 8;
#pragma omp parallel num_threads(threads)
    {
        std::vector<uint8_t> u(K);
#pragma omp for schedule(static)
        for (int r = 0; r < N; r++) {
            unpack_row(src + r * sstride, K, src_bits, u.data());
            pack_row(u.data(), K, dst_bits, dst + r * dstride);
        }
    }
}
