// CPU kernels of the fused 4-bit LoRA linear. Both directions are one GEMM C = A_op @ B_op (+ LoRA
// term in the epilogue) in which B_op is the 4-bit weight read either transposed (forward: W^T) or
// as stored (backward: W). Large M: BLIS-style blocking, B_op dequantized panel by panel into
// per-thread buffers and consumed by a register-blocked 6x16 micro-kernel. Small M: GEMV paths that
// decode each weight element once, in registers (a 32-element byte-shuffle decoder when rows allow).
#include "qlora/qlora_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace forge_qlora {
namespace {

constexpr int MR = 6, NR = 16;
constexpr int64_t KC = 256;       // depth of a dequantized panel (micro-panel = KC*NR*4 = 16 KiB, L1)
constexpr int64_t NC = 256;       // width of a dequantized panel (KC*NC*4 = 256 KiB, L2)
constexpr double SCRATCH_FRACTION = 0.10;  // scratch cap, as a fraction of the fp32 weight's bytes
constexpr int64_t GEMV_MAX_M = 4;  // below this many rows a 6-row micro-kernel wastes most lanes
constexpr int64_t CHUNK = 512;    // gx columns per GEMV-backward task (M rows of it stay in L1)

constexpr int64_t WORK_PER_THREAD = int64_t(1) << 20;  // ~0.1 ms: below this a fork/join costs more

std::atomic<int64_t> g_transient{0};

// Threads worth waking for `work` (weight elements decoded + multiply-adds), at most n_threads.
int threads_for(int64_t work, int n_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, work / WORK_PER_THREAD)));
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Gemm {
  int64_t M, Nc, Kd;
  const float* a;  // [M, Kd] row-major
  const NF4View* w;
  bool forward;    // forward: B_op[k][n] = W[n][k]; backward: B_op[n][k] = W[n][k]
  const float* la; // LoRA left factor [M, r]
  const float* lr; // LoRA right factor: forward B[Nc, r] (read transposed), backward A[r, Nc]
  int64_t r;
  float s;
  const float* bias;  // [Nc] or null
  float* c;           // [M, Nc]
};

// dst[i*lds + j] = src[j*lss + i] for an 8x8 block, writing only the first `rows` output rows.
void transpose8(const float* src, int64_t lss, float* dst, int64_t lds, int rows) {
#ifdef FORGE_RT_AVX2
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lss);
  __m256 r2 = _mm256_loadu_ps(src + 2 * lss), r3 = _mm256_loadu_ps(src + 3 * lss);
  __m256 r4 = _mm256_loadu_ps(src + 4 * lss), r5 = _mm256_loadu_ps(src + 5 * lss);
  __m256 r6 = _mm256_loadu_ps(src + 6 * lss), r7 = _mm256_loadu_ps(src + 7 * lss);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  const __m256 out[8] = {
      _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
      _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
      _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
      _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  for (int i = 0; i < rows; ++i) _mm256_storeu_ps(dst + i * lds, out[i]);
#else
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 8; ++j) dst[i * lds + j] = src[j * lss + i];
#endif
}

// dst: ceil(ncl/NR) micro-panels, each [kdl][NR], of B_op[kd0:kd0+kdl, nc0:nc0+ncl]; zero padded.
void pack_weight(const Gemm& p, int64_t kd0, int64_t kdl, int64_t nc0, int64_t ncl, float* dst,
                 float* tmp) {
  const NF4View& w = *p.w;
  const int64_t npanels = (ncl + NR - 1) / NR;
  if (p.forward) {  // decode NR weight rows as stored, then transpose them into the micro-panel
    const int64_t kp = round_up(kdl, 8);
    for (int64_t jr = 0; jr < npanels; ++jr) {
      for (int64_t j = 0; j < NR; ++j) {
        float* t = tmp + j * kp;
        const int64_t n = jr * NR + j;
        const int64_t done = n < ncl ? kdl : 0;
        if (done) decode_run(w, (nc0 + n) * w.cols + kd0, kdl, t);
        std::fill(t + done, t + kp, 0.f);
      }
      float* d = dst + jr * kdl * NR;
      for (int64_t k0 = 0; k0 < kdl; k0 += 8)
        for (int64_t j0 = 0; j0 < NR; j0 += 8)
          transpose8(tmp + j0 * kp + k0, kp, d + k0 * NR + j0, NR, static_cast<int>(std::min<int64_t>(8, kdl - k0)));
    }
  } else {
    for (int64_t kk = 0; kk < kdl; ++kk) {
      decode_run(w, (kd0 + kk) * w.cols + nc0, ncl, tmp);
      std::fill(tmp + ncl, tmp + npanels * NR, 0.f);
      for (int64_t jr = 0; jr < npanels; ++jr)
        std::memcpy(dst + (jr * kdl + kk) * NR, tmp + jr * NR, NR * sizeof(float));
    }
  }
}

// LoRA right factor of columns [nc0, nc0+ncl), pre-scaled by s, in micro-panels [r][NR].
void pack_lora(const Gemm& p, int64_t nc0, int64_t ncl, float* dst) {
  const int64_t npanels = (ncl + NR - 1) / NR;
  for (int64_t jr = 0; jr < npanels; ++jr)
    for (int64_t j = 0; j < p.r; ++j)
      for (int64_t jj = 0; jj < NR; ++jj) {
        const int64_t col = jr * NR + jj;
        float v = 0.f;
        if (col < ncl) v = p.forward ? p.lr[(nc0 + col) * p.r + j] : p.lr[j * p.Nc + nc0 + col];
        dst[(jr * p.r + j) * NR + jj] = p.s * v;
      }
}

// C tile [mr x nr] (=|+=) a[mr, kc] @ b[kc, NR] (+ la[mr, kl] @ lb[kl, NR]) (+ bias).
// Rows beyond mr read row mr-1 (valid memory) and are not stored.
void micro_kernel(int64_t kc, const float* const* a, const float* b, int64_t kl,
                  const float* const* la, const float* lb, float* c, int64_t ldc, int mr, int nr,
                  bool accumulate, const float* bias) {
  float tile[MR][NR];
#ifdef FORGE_RT_AVX2
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  auto run = [&](int64_t depth, const float* const* ap, const float* bp) {
    for (int64_t k = 0; k < depth; ++k, bp += NR) {
      const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
#pragma GCC unroll 6
      for (int i = 0; i < MR; ++i) {
        const __m256 av = _mm256_broadcast_ss(ap[i] + k);
        acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
      }
    }
  };
  run(kc, a, b);
  if (kl) run(kl, la, lb);
  if (mr == MR && nr == NR) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      __m256 v0 = acc[i][0], v1 = acc[i][1];
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci + 8));
      } else if (bias) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
      }
      _mm256_storeu_ps(ci, v0);
      _mm256_storeu_ps(ci + 8, v1);
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(tile[i], acc[i][0]);
    _mm256_storeu_ps(tile[i] + 8, acc[i][1]);
  }
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) tile[i][j] = 0.f;
  auto run = [&](int64_t depth, const float* const* ap, const float* bp) {
    for (int64_t k = 0; k < depth; ++k, bp += NR)
      for (int i = 0; i < MR; ++i) {
        const float av = ap[i][k];
        for (int j = 0; j < NR; ++j) tile[i][j] += av * bp[j];
      }
  };
  run(kc, a, b);
  if (kl) run(kl, la, lb);
#endif
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      float v = tile[i][j];
      if (accumulate) v += c[i * ldc + j];
      else if (bias) v += bias[j];
      c[i * ldc + j] = v;
    }
}

void gemm(const Gemm& p, int n_threads) {
  const int64_t panels = (p.Nc + NR - 1) / NR;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, panels)));
  const int64_t per_thread = (panels + nt - 1) / nt * NR;  // columns per thread, whole micro-panels
  // Small weights get smaller panels so that scratch stays a small fraction of the weight.
  int64_t kc = KC, nc = NC;
  auto scratch = [&] { return nt * (kc * nc + p.r * nc + std::max(NR * kc, nc + NR)); };
  const double cap = SCRATCH_FRACTION * static_cast<double>(p.Nc) * static_cast<double>(p.Kd);
  while (scratch() > cap && (nc > NR || kc > 32)) {
    if (nc > NR) nc /= 2;
    else kc /= 2;
  }
  const int64_t wbuf = kc * nc, lbuf = p.r * nc, tbuf = std::max(NR * kc, nc + NR);
  g_transient = nt * static_cast<int64_t>((wbuf + lbuf + tbuf) * sizeof(float));
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    std::vector<float> wpanel(wbuf), lpanel(lbuf), tmp(tbuf);
    const int64_t c_begin = tid * per_thread, c_end = std::min(p.Nc, c_begin + per_thread);
    const float* arows[MR];
    const float* lrows[MR];
    for (int64_t nc0 = c_begin; nc0 < c_end; nc0 += nc) {
      const int64_t ncl = std::min(nc, c_end - nc0);
      if (p.r) pack_lora(p, nc0, ncl, lpanel.data());
      for (int64_t kd0 = 0; kd0 < p.Kd || kd0 == 0; kd0 += kc) {
        const int64_t kdl = std::min(kc, p.Kd - kd0);
        const bool first = kd0 == 0;
        pack_weight(p, kd0, kdl, nc0, ncl, wpanel.data(), tmp.data());
        for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, p.M - m0));
          for (int i = 0; i < MR; ++i) {
            const int64_t m = m0 + std::min(i, mr - 1);
            arows[i] = p.a + m * p.Kd + kd0;
            lrows[i] = p.r ? p.la + m * p.r : nullptr;
          }
          for (int64_t jr = 0; jr * NR < ncl; ++jr) {
            const int nr = static_cast<int>(std::min<int64_t>(NR, ncl - jr * NR));
            const int64_t col = nc0 + jr * NR;
            micro_kernel(kdl, arows, wpanel.data() + jr * kdl * NR, first ? p.r : 0, lrows,
                         lpanel.data() + jr * p.r * NR, p.c + m0 * p.Nc + col, p.Nc, mr, nr,
                         !first, p.bias ? p.bias + col : nullptr);
          }
        }
      }
    }
  }
}

#ifdef FORGE_RT_AVX2
float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}
#endif

float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float s = 0.f;
#ifdef FORGE_RT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

void axpy(float* y, float alpha, const float* x, int64_t n) {
  int64_t k = 0;
#ifdef FORGE_RT_AVX2
  const __m256 av = _mm256_set1_ps(alpha);
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
#endif
  for (; k < n; ++k) y[k] += alpha * x[k];
}


// Rows permuted group by group into decode32's element order (and back), so GEMV inputs and
// outputs line up with the byte-plane decoder.
void permute32(const float* src, float* dst, int64_t n) {
  for (int64_t g = 0; g < n; g += 32)
    for (int q = 0; q < 32; ++q) dst[g + q] = src[g + perm32_index(q)];
}
void unpermute32(const float* src, float* dst, int64_t n) {
  for (int64_t g = 0; g < n; g += 32)
    for (int q = 0; q < 32; ++q) dst[g + perm32_index(q)] = src[g + q];
}

#ifdef FORGE_RT_AVX2
// acc[0..NA) += x . v, spread over NA independent chains to hide the FMA latency.
template <int NA, int NV>
void accumulate(__m256* acc, const float* x, const Vecs<NV>& v) {
  for (int j = 0; j < NV; ++j) acc[j % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * j), v.v[j], acc[j % NA]);
}
template <int NV>
void axpy_vec(float* out, float alpha, const Vecs<NV>& v) {
  const __m256 a = _mm256_set1_ps(alpha);
  for (int j = 0; j < NV; ++j)
    _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(a, v.v[j], _mm256_loadu_ps(out + 8 * j)));
}
#endif

// Small M forward: each weight row is decoded once, in registers, and dotted with the MM input rows
// (kPerm: rows of x already permuted into decode32's order).
template <int MM, bool kPerm>
void gemv_forward_rows(const float* x, const NF4View& w, const float* xa, const float* B, int64_t r,
                       float s, const float* bias, float* y, int n_threads) {
  const int64_t N = w.rows, K = w.cols;
#ifdef FORGE_RT_AVX2
  const Perm32Code pc(w.code);
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float acc[MM] = {};
#ifdef FORGE_RT_AVX2
    constexpr int NA = MM == 1 ? 4 : (MM == 2 ? 2 : 1);  // accumulator chains per input row
    __m256 vacc[MM][NA];
    for (int m = 0; m < MM; ++m)
      for (int a = 0; a < NA; ++a) vacc[m][a] = _mm256_setzero_ps();
    auto vec = [&](int64_t o, const auto& v) {
      for (int m = 0; m < MM; ++m) accumulate<NA>(vacc[m], x + m * K + o, v);
    };
    if (kPerm) {
      decode_visit_perm32(w, pc, n * K, K, vec);
    } else
#else
    auto vec = [](int64_t, int) {};
#endif
    decode_visit(w, n * K, K, vec, [&](int64_t o, float v) {
      for (int m = 0; m < MM; ++m) acc[m] += x[m * K + o] * v;
    });
    for (int m = 0; m < MM; ++m) {
#ifdef FORGE_RT_AVX2
      for (int a = 0; a < NA; ++a) acc[m] += hsum(vacc[m][a]);
#endif
      if (bias) acc[m] += bias[n];
      if (r) acc[m] += s * dot(xa + m * r, B + n * r, r);
      y[m * N + n] = acc[m];
    }
  }
}

template <int MM>
void gemv_forward(const float* x, const NF4View& w, const float* xa, const float* B, int64_t r,
                  float s, const float* bias, float* y, int n_threads) {
  const int64_t K = w.cols;
  g_transient = 0;
#ifdef FORGE_RT_AVX2
  if (perm32_ok(w)) {
    std::vector<float> xp(MM * K);  // input-sized, not weight-sized
    g_transient = static_cast<int64_t>(xp.size() * sizeof(float));
    for (int m = 0; m < MM; ++m) permute32(x + m * K, xp.data() + m * K, K);
    return gemv_forward_rows<MM, true>(xp.data(), w, xa, B, r, s, bias, y, n_threads);
  }
#endif
  gemv_forward_rows<MM, false>(x, w, xa, B, r, s, bias, y, n_threads);
}

// Small M backward: each thread owns slices of gx's columns and sweeps all weight rows over them
// (kPerm: a slice is accumulated in decode32's order and put back in place at the end).
template <bool kPerm>
void gemv_backward_cols(const float* g, int64_t M, const NF4View& w, const float* gb, const float* A,
                        int64_t r, float s, float* gx, int n_threads) {
  const int64_t N = w.rows, K = w.cols;
  const int64_t chunks = (K + CHUNK - 1) / CHUNK;
#ifdef FORGE_RT_AVX2
  const Perm32Code pc(w.code);
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t ci = 0; ci < chunks; ++ci) {
    const int64_t k0 = ci * CHUNK, len = std::min(CHUNK, K - k0);
    for (int64_t m = 0; m < M; ++m) std::fill(gx + m * K + k0, gx + m * K + k0 + len, 0.f);
    for (int64_t n = 0; n < N; ++n) {
#ifdef FORGE_RT_AVX2
      auto vec = [&](int64_t o, const auto& v) {
        for (int64_t m = 0; m < M; ++m) axpy_vec(gx + m * K + k0 + o, g[m * N + n], v);
      };
      if (kPerm) {
        decode_visit_perm32(w, pc, n * K + k0, len, vec);
        continue;
      }
#else
      auto vec = [](int64_t, int) {};
#endif
      decode_visit(w, n * K + k0, len, vec, [&](int64_t o, float v) {
        for (int64_t m = 0; m < M; ++m) gx[m * K + k0 + o] += g[m * N + n] * v;
      });
    }
    if (kPerm) {
      float tmp[CHUNK];
      for (int64_t m = 0; m < M; ++m) {
        unpermute32(gx + m * K + k0, tmp, len);
        std::copy(tmp, tmp + len, gx + m * K + k0);
      }
    }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t m = 0; m < M; ++m) axpy(gx + m * K + k0, s * gb[m * r + j], A + j * K + k0, len);
  }
}

void gemv_backward(const float* g, int64_t M, const NF4View& w, const float* gb, const float* A,
                   int64_t r, float s, float* gx, int n_threads) {
  g_transient = 0;  // per-slice buffers live on each thread's stack
  if (perm32_ok(w)) return gemv_backward_cols<true>(g, M, w, gb, A, r, s, gx, n_threads);
  gemv_backward_cols<false>(g, M, w, gb, A, r, s, gx, n_threads);
}

}  // namespace

void forward(const float* x, int64_t M, const NF4View& w, const float* xa, const float* B, int64_t r,
             float s, const float* bias, float* y, int n_threads) {
  if (!xa || !B) r = 0;
  n_threads = threads_for(w.rows * w.cols * std::max<int64_t>(M, 1), n_threads);
  switch (M) {  // small M: one register accumulator per input row
    case 0: return;
    case 1: return gemv_forward<1>(x, w, xa, B, r, s, bias, y, n_threads);
    case 2: return gemv_forward<2>(x, w, xa, B, r, s, bias, y, n_threads);
    case 3: return gemv_forward<3>(x, w, xa, B, r, s, bias, y, n_threads);
    case 4: return gemv_forward<4>(x, w, xa, B, r, s, bias, y, n_threads);
    default: break;
  }
  static_assert(GEMV_MAX_M == 4, "the switch above covers M <= GEMV_MAX_M");
  gemm(Gemm{M, w.rows, w.cols, x, &w, true, xa, B, r, s, bias, y}, n_threads);
}

void backward_input(const float* g, int64_t M, const NF4View& w, const float* gb, const float* A,
                    int64_t r, float s, float* gx, int n_threads) {
  if (!gb || !A) r = 0;
  n_threads = threads_for(w.rows * w.cols * std::max<int64_t>(M, 1), n_threads);
  if (M <= GEMV_MAX_M) return gemv_backward(g, M, w, gb, A, r, s, gx, n_threads);
  gemm(Gemm{M, w.cols, w.rows, g, &w, false, gb, A, r, s, nullptr, gx}, n_threads);
}

int64_t last_transient_bytes() { return g_transient; }

}  // namespace forge_qlora
