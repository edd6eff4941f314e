// Decode (one token) on AVX2 for 4- and 6-bit uniform codes: qgemm.cpp's layout (see the top of that file), read
// half a chunk at a time (8 blocks: one 256-bit register per slice), with the integer block scales applied by
// vpmaddwd as the int16 sums widen (as llama.cpp's K-quant dot products do), so only one float multiply-add per 8
// blocks is left for the scales, and a row's sums fit in 2 registers (tile()'s 16-lane emulation held 4 rows' sums in
// 16 of AVX2's 16 and spilled them to the stack every chunk). Qwen2.5-Coder-1.5B Q4_K_M decode, interleaved on a
// Zen 3 EPYC: 1.24x tile() with 4 rows a pass, 1.7x with one row a pass (gemm() runs R = 1).
//
// Per half chunk of row n (blocks b0..b0+7, super-block s = b0 / 8, one fp16 d for all 8):
//   P_b = sc_b * sum_j u_bj x_bj (int32; SB 3: each half-block's code times its half's dot; SB 0: the plain dot)
//   y  += dx_b * d * P_b + m_b * xs_b
// with the codes' offset (low) folded into P as low * sc_b * sum_j x_bj (SB 1, 2) or per half-block (SB 3, from
// sp: each block's two half sums as int16 pairs), and m_b = dmin * mc_b (SB 1) or the block's fp16 m (SB 0).
// int16 bounds (|x| <= 127): 4-bit codes, 8 slices: 8 x 2 x 15 x 127 = 30480; 6-bit codes, 2 slices:
// 2 x 2 x 63 x 127 = 32004; scale codes times the low offset: 127 x 128 = 16256.
// Needs a chunk of 16 blocks, or a row's last chunk of 8 (K = 8960: 17 x 16 + 8); other tails take tile().
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

template <int BITS, int SB>
TF_INLINE __m256i half_dot(const uint8_t* w, const uint8_t* hb, const int8_t* x, int step, __m256i sc,
                           __m256i sclo, __m256i schi) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const auto xs = [&](int i) { return _mm256_loadu_si256((const __m256i*)(x + i * step)); };
    if constexpr (BITS == 4) {
        __m256i s = _mm256_setzero_si256(), sh = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + j * step));
            const __m256i lo = _mm256_and_si256(raw, nib), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo, xs(j)));
            if constexpr (SB == 3) sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(hi, xs(4 + j)));
            else s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi, xs(4 + j)));
        }
        if constexpr (SB == 3) return _mm256_add_epi32(_mm256_madd_epi16(s, sclo), _mm256_madd_epi16(sh, schi));
        return _mm256_madd_epi16(s, sc);
    } else {
        const __m256i h0 = _mm256_loadu_si256((const __m256i*)hb), h1 = _mm256_loadu_si256((const __m256i*)(hb + step));
        const __m256i top = _mm256_set1_epi8(0x30);
        __m256i p = _mm256_setzero_si256(), lo2 = _mm256_setzero_si256(), hi2 = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(w + j * step));
            // slice j's high bits sit at bits 2j of h0, slice 4 + j's at bits 2j of h1: to bits 4..5
            const int sh = 4 - 2 * j;
            const __m256i a0 = sh > 0 ? _mm256_slli_epi16(h0, sh) : sh < 0 ? _mm256_srli_epi16(h0, -sh) : h0;
            const __m256i a1 = sh > 0 ? _mm256_slli_epi16(h1, sh) : sh < 0 ? _mm256_srli_epi16(h1, -sh) : h1;
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, nib), _mm256_and_si256(a0, top));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), _mm256_and_si256(a1, top));
            const __m256i pl = _mm256_maddubs_epi16(lo, xs(j)), ph = _mm256_maddubs_epi16(hi, xs(4 + j));
            if (j % 2 == 0) {
                lo2 = pl;
                hi2 = ph;
            } else {  // two slices' int16 sums, then widened by their scale
                if constexpr (SB == 3) {
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_add_epi16(lo2, pl), sclo));
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_add_epi16(hi2, ph), schi));
                } else {
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_add_epi16(lo2, pl), sc));
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_add_epi16(hi2, ph), sc));
                }
            }
        }
        return p;
    }
}

// rows n..n+R-1 of W times the one token x (quantize_act's layout); sp: per block, its two half sums as int16
// pairs (SB 3 with low != 0)
template <int BITS, int SB, int R>
static void rows(const uint8_t* W, const uint16_t* D, const uint16_t* Mn, int N, int K, int n, const int8_t* x,
                 const float* DX, const float* XS, const int32_t* SI, const int32_t* SP, int low, float* Y,
                 bool prefetch) {
    const int nb = K / 32, ns = nb / 8, chunks = (nb + 15) / 16;
    const size_t rb = (size_t)K * BITS / 8;
    const uint8_t* codes = (const uint8_t*)Mn;
    const size_t tile_bytes = R * rb, ahead = tile_bytes * ((PREFETCH + tile_bytes - 1) / tile_bytes);
    const int lpc = (int)((tile_bytes / 64 + chunks - 1) / chunks);
    const uint8_t* w0 = W + (size_t)n * rb;
    const __m256i ones = _mm256_set1_epi16(1), lowv = _mm256_set1_epi32(low & 0xFFFF),
                  lowp = _mm256_set1_epi16((int16_t)low);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int ci = 0; ci < chunks; ci++) {
        const int c = ci * 16, cb = nb - c < 16 ? nb - c : 16, step = cb * 4;
        if (prefetch)
            for (int l = 0; l < lpc; l++) _mm_prefetch((const char*)(w0 + ahead + (size_t)(ci * lpc + l) * 64), _MM_HINT_T0);
        for (int h = 0; h < cb / 8; h++) {
            const int b0 = c + 8 * h;
            const int8_t* xh = x + (size_t)ci * 512 + h * 32;
            const __m256 dx = _mm256_loadu_ps(DX + b0);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const size_t row = (size_t)(n + r);
                const uint8_t* w = W + row * rb + (size_t)ci * 256 + h * 32;
                const uint8_t* hb = W + row * rb + K / 2 + (size_t)ci * 128 + h * 32;
                __m256i sc = ones, sclo = ones, schi = ones, pair = ones;
                if constexpr (SB == 1 || SB == 2) {
                    sc = pair_codes(codes + row * nb + b0);
                } else if constexpr (SB == 3) {  // words (lo_b, hi_b): each block's two half codes
                    pair = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(codes + (row * nb + b0) * 2)));
                    sclo = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pair, 0xA0), 0xA0);
                    schi = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pair, 0xF5), 0xF5);
                }
                __m256i p = half_dot<BITS, SB>(w, hb, xh, step, sc, sclo, schi);
                if (low && (SB == 1 || SB == 2))  // low * sc_b * (the block's sum of x): SI's words (s_b, sign)
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(SI + b0)),
                                                              _mm256_mullo_epi16(sc, lowv)));
                if (low && SB == 3)
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(SP + b0)),
                                                              _mm256_mullo_epi16(pair, lowp)));
                __m256 a = acc[r];
                if constexpr (SB == 0) {
                    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(D + row * nb + b0)));
                    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(Mn + row * nb + b0)));
                    a = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS + b0), a);
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dx), a);
                } else {
                    const size_t so = row * ns + b0 / 8;
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_set1_ps(f16(D[so])), dx), a);
                    if constexpr (SB == 1) {
                        const __m256 mc = _mm256_cvtepi32_ps(
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + (size_t)N * nb + row * nb + b0))));
                        const __m256 mw = _mm256_mul_ps(_mm256_set1_ps(f16(D[(size_t)N * ns + so])), mc);
                        a = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XS + b0), a);
                    }
                }
                acc[r] = a;
            }
        }
    }
    for (int r = 0; r < R; r++) Y[n + r] = hsum(acc[r]);
}

// whether rows() runs this product: full chunks, or a last one of 8 blocks
inline bool fits(int bits, bool nl, int K) {
    const int cb = (K / 32) % 16;
    return (bits == 4 || bits == 6) && !nl && (cb == 0 || cb == 8);
}

}  // namespace tf_avx2
