// Decode (one token) and prefill on AVX2 for 4- and 6-bit uniform codes: qgemm.cpp's layout (see the top of that file),
// read half a chunk at a time (8 blocks: one 256-bit register per slice), with the integer block scales applied by
// vpmaddwd as the int16 sums widen (as llama.cpp's K-quant dot products do), so only one float multiply-add per 8
// blocks is left for the scales, and a row's sums fit in 2 registers (tile()'s 16-lane emulation held 4 rows' sums in
// 16 of AVX2's 16 and spilled them to the stack every chunk). Qwen2.5-Coder-1.5B Q4_K_M decode, interleaved on a Zen 3
// EPYC: 1.24x tile() with 4 rows a pass, 1.7x with one row a pass (decode_row()).
//
// Per half chunk of row n (blocks b0..b0+7, super-block s = b0 / 8, one fp16 d for all 8):
//   P_b = sc_b * sum_j u_bj x_bj (int32; SB 3: each half-block's code times its half's dot; SB 0: the plain dot)
//   y  += dx_b * d * P_b + m_b * xs_b
// with the codes' offset (low) folded into P as low * sc_b * sum_j x_bj (SB 1, 2) or per half-block (SB 3, from
// sp: each block's two half sums as int16 pairs), and m_b = dmin * mc_b (SB 1) or the block's fp16 m (SB 0).
// int16 bounds (|x| <= 127): 4-bit codes, 8 slices: 8 x 2 x 15 x 127 = 30480; 6-bit codes, 2 slices:
// 2 x 2 x 63 x 127 = 32004; scale codes times the low offset: 127 x 128 = 16256.
// Needs a chunk of 16 blocks, or a row's last chunk of 8 (K = 8960: 17 x 16 + 8); other tails take tile().
// Prefill (tokens()) reads the same way, one row by 4 tokens, over panels of rows kept in L2: against ptile() at
// Qwen2.5-1.5B's shapes, 512 tokens, 1 thread: Q6_K 0.83-0.91x the time, asym4-g32 0.74-0.88x, Q4_K even.
#pragma once

namespace tf_avx2 {

TF_INLINE float f16(uint16_t v) { return _cvtsh_ss(v); }

TF_INLINE float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// lanes b (32 bits) = (v_b, v_b) as int16, from 8 int8 codes
TF_INLINE __m256i pair_codes(const uint8_t* p) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    return _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(v, 0xA0), 0xA0);  // words 0, 0, 2, 2
}

// a row-half's scale codes as vpmaddwd operands: sc (SB 1, 2: lanes (sc_b, sc_b)), sclo / schi (SB 3: each
// block's half codes, doubled), pair (SB 3: (lo_b, hi_b)); ones where the format has none
template <int SB>
struct HalfCodes {
    __m256i sc, sclo, schi, pair;
    __attribute__((always_inline)) HalfCodes(const uint8_t* codes, size_t row, int nb, int b0) {
        sc = sclo = schi = pair = _mm256_set1_epi16(1);
        if constexpr (SB == 1 || SB == 2) {
            sc = pair_codes(codes + row * nb + b0);
        } else if constexpr (SB == 3) {
            pair = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(codes + (row * nb + b0) * 2)));
            sclo = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pair, 0xA0), 0xA0);
            schi = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pair, 0xF5), 0xF5);
        }
    }
};

// the integer dots P of one row-half (w: its 4-bit planes; hb: its high bits, 6-bit) with T tokens (x: the first
// token's half chunk, xt apart), each block's scale code applied (see the top of this file). STEP: the bytes
// between a chunk's slices (64, or 32 in a row's last chunk of 8 blocks), a constant so that each token's slices
// are one base register's fixed offsets (a variable step spilled the 4 tokens' sums and addresses: prefill 1.4x)
template <int BITS, int SB, int T, int STEP>
TF_INLINE void half_dots(const uint8_t* w, const uint8_t* hb, const int8_t* x, size_t xt, const HalfCodes<SB>& hc,
                         __m256i (&p)[T]) {
    constexpr int step = STEP;
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const auto xv = [&](int t, int i) { return _mm256_loadu_si256((const __m256i*)(x + t * xt + i * step)); };
    if constexpr (BITS == 4) {
        __m256i s[T], sh[T];
        for (int t = 0; t < T; t++) s[t] = sh[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + j * step));
            const __m256i lo = _mm256_and_si256(raw, nib), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(lo, xv(t, j)));
                if constexpr (SB == 3) sh[t] = _mm256_add_epi16(sh[t], _mm256_maddubs_epi16(hi, xv(t, 4 + j)));
                else s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(hi, xv(t, 4 + j)));
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            p[t] = SB == 3 ? _mm256_add_epi32(_mm256_madd_epi16(s[t], hc.sclo), _mm256_madd_epi16(sh[t], hc.schi))
                           : _mm256_madd_epi16(s[t], hc.sc);
    } else {
        const __m256i h0 = _mm256_loadu_si256((const __m256i*)hb), h1 = _mm256_loadu_si256((const __m256i*)(hb + step));
        const __m256i top = _mm256_set1_epi8(0x30);
        const __m256i slo = SB == 3 ? hc.sclo : hc.sc, shi = SB == 3 ? hc.schi : hc.sc;
        // one token: two slices' int16 sums, then widened by their scale; more: each slice widened (the pairs' sums
        // would take T more registers)
        constexpr bool PAIRS = T == 1;
        __m256i lo2[T], hi2[T];
        for (int t = 0; t < T; t++) p[t] = lo2[t] = hi2[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + j * step));
            // slice j's high bits sit at bits 2j of h0, slice 4 + j's at bits 2j of h1: to bits 4..5
            const int sh = 4 - 2 * j;
            const __m256i a0 = sh > 0 ? _mm256_slli_epi16(h0, sh) : sh < 0 ? _mm256_srli_epi16(h0, -sh) : h0;
            const __m256i a1 = sh > 0 ? _mm256_slli_epi16(h1, sh) : sh < 0 ? _mm256_srli_epi16(h1, -sh) : h1;
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, nib), _mm256_and_si256(a0, top));
            const __m256i hi =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), _mm256_and_si256(a1, top));
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const __m256i pl = _mm256_maddubs_epi16(lo, xv(t, j)), ph = _mm256_maddubs_epi16(hi, xv(t, 4 + j));
                if constexpr (!PAIRS) {
                    p[t] = _mm256_add_epi32(p[t], _mm256_madd_epi16(pl, slo));
                    p[t] = _mm256_add_epi32(p[t], _mm256_madd_epi16(ph, shi));
                } else if (j % 2 == 0) {
                    lo2[t] = pl;
                    hi2[t] = ph;
                } else {
                    p[t] = _mm256_add_epi32(p[t], _mm256_madd_epi16(_mm256_add_epi16(lo2[t], pl), slo));
                    p[t] = _mm256_add_epi32(p[t], _mm256_madd_epi16(_mm256_add_epi16(hi2[t], ph), shi));
                }
            }
        }
    }
}

// the codes' offset: low * sc_b * (the block's sum of x) (SB 1, 2; si: SI's words (s_b, sign)) or per half-block
// (SB 3; sp: (s_lo, s_hi))
template <int SB>
TF_INLINE __m256i low_term(__m256i p, const HalfCodes<SB>& hc, int low, const int32_t* si, const int32_t* sp) {
    if (!low) return p;
    if constexpr (SB == 1 || SB == 2)
        return _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)si),
                                                     _mm256_mullo_epi16(hc.sc, _mm256_set1_epi32(low & 0xFFFF))));
    if constexpr (SB == 3)
        return _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)sp),
                                                     _mm256_mullo_epi16(hc.pair, _mm256_set1_epi16((int16_t)low))));
    return p;
}

// Decode: row n of W times the one token x (quantize_act's layout), its weights prefetched (without: 0.43-0.53x
// the speed); sp: per block, its two half sums as int16 pairs (SB 3 with low != 0)
template <int BITS, int SB>
static void decode_row(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int n, const int8_t* x,
                       const float* DX, const float* XS, const int32_t* SI, const int32_t* SP, int low, float* Y) {
    const int nb = K / 32, ns = nb / 8, chunks = (nb + 15) / 16;
    const size_t rb = (size_t)K * BITS / 8, row = (size_t)n;
    const uint8_t* codes = (const uint8_t*)Mn;
    const size_t ahead = rb * ((PREFETCH + rb - 1) / rb);
    const int lpc = (int)((rb / 64 + chunks - 1) / chunks);
    const uint8_t* w0 = W + row * rb;
    __m256 acc = _mm256_setzero_ps();
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16, cb = nb - c < 16 ? nb - c : 16;
        for (int l = 0; l < lpc; l++)
            _mm_prefetch((const char*)(w0 + ahead + (size_t)(ci * lpc + l) * 64), _MM_HINT_T0);
        for (int h = 0; h < cb / 8; h++) {
            const int b0 = c + 8 * h;
            const __m256 dx = _mm256_loadu_ps(DX + b0);
            const HalfCodes<SB> hc(codes, row, nb, b0);
            __m256i p[1];
            const uint8_t* w = w0 + (size_t)ci * 256 + h * 32;
            const uint8_t* hb = w0 + K / 2 + (size_t)ci * 128 + h * 32;
            if (cb == 16) half_dots<BITS, SB, 1, 64>(w, hb, x + (size_t)ci * 512 + h * 32, 0, hc, p);
            else half_dots<BITS, SB, 1, 32>(w, hb, x + (size_t)ci * 512 + h * 32, 0, hc, p);
            p[0] = low_term<SB>(p[0], hc, low, SI + b0, SP + b0);
            if constexpr (SB == 0) {
                const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(D + row * nb + b0)));
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(Mn + row * nb + b0)));
                acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS + b0), acc);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[0]), _mm256_mul_ps(dw, dx), acc);
            } else {
                const size_t so = row * ns + b0 / 8;
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[0]), _mm256_mul_ps(_mm256_set1_ps(f16(D[so])), dx), acc);
                if constexpr (SB == 1) {
                    const __m128i m8 = _mm_loadl_epi64((const __m128i*)(codes + (size_t)N * nb + row * nb + b0));
                    const __m256 mc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8));
                    const __m256 mw = _mm256_mul_ps(_mm256_set1_ps(f16(D[(size_t)N * ns + so])), mc);
                    acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS + b0), acc);
                }
            }
        }
    }
    Y[n] = hsum(acc);
}

// Prefill: row n of W times T tokens from t0 (the row from L2, the tokens' half chunks from L1); si, sp: as
// decode_row()'s for every token (2 nb and nb apart); prefetch: the weights streamed from memory (2-3 tokens'
// decode) as decode_row() does. (Decode through tokens<1> ran 0.82-0.85x decode_row()'s speed.)
template <int BITS, int SB, int T>
static void tokens(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int n, const int8_t* XQ,
                   const float* DX, const float* XS, const int32_t* SI, const int32_t* SP, int low, int t0, float* Y,
                   bool prefetch = false) {
    const int nb = K / 32, ns = nb / 8, chunks = (nb + 15) / 16;
    const size_t rb = (size_t)K * BITS / 8, row = (size_t)n;
    const uint8_t* codes = (const uint8_t*)Mn;
    const size_t ahead = rb * ((PREFETCH + rb - 1) / rb);
    const int lpc = (int)((rb / 64 + chunks - 1) / chunks);
    __m256 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16, cb = nb - c < 16 ? nb - c : 16;
        if (prefetch)
            for (int l = 0; l < lpc; l++)
                _mm_prefetch((const char*)(W + row * rb + ahead + (size_t)(ci * lpc + l) * 64), _MM_HINT_T0);
        for (int h = 0; h < cb / 8; h++) {
            const int b0 = c + 8 * h;
            const HalfCodes<SB> hc(codes, row, nb, b0);
            __m256i p[T];
            const uint8_t* w = W + row * rb + (size_t)ci * 256 + h * 32;
            const uint8_t* hb = W + row * rb + K / 2 + (size_t)ci * 128 + h * 32;
            const int8_t* xh = XQ + (size_t)t0 * K + (size_t)ci * 512 + h * 32;
            if (cb == 16) half_dots<BITS, SB, T, 64>(w, hb, xh, (size_t)K, hc, p);
            else half_dots<BITS, SB, T, 32>(w, hb, xh, (size_t)K, hc, p);
            __m256 dw, mw = _mm256_setzero_ps();
            if constexpr (SB == 0) {
                dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(D + row * nb + b0)));
                mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(Mn + row * nb + b0)));
            } else {
                const size_t so = row * ns + b0 / 8;
                dw = _mm256_set1_ps(f16(D[so]));
                if constexpr (SB == 1)
                    mw = _mm256_mul_ps(_mm256_set1_ps(f16(D[(size_t)N * ns + so])),
                                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                           _mm_loadl_epi64((const __m128i*)(codes + (size_t)N * nb + row * nb + b0)))));
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                const size_t o = (size_t)(t0 + t) * nb + b0;
                const __m256i pt = low_term<SB>(p[t], hc, low, SI + (size_t)(t0 + t) * 2 * nb + b0, SP + o);
                __m256 a = acc[t];
                if constexpr (SB <= 1) a = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS + o), a);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pt), _mm256_mul_ps(dw, _mm256_loadu_ps(DX + o)), a);
            }
        }
    }
    for (int t = 0; t < T; t++) Y[(size_t)(t0 + t) * N + n] = hsum(acc[t]);
}

// whether decode_row() and tokens() run a row of K columns: full chunks, or a last one of 8 blocks
inline bool fits(int K) {
    const int cb = (K / 32) % 16;
    return cb == 0 || cb == 8;
}

}  // namespace tf_avx2
