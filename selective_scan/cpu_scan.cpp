// The selective scan (Mamba, Gu & Dao 2023, eq. 2a/2b) fused for the CPU: forward and backward.
//
// Built on first use by selective_scan/cpu.py through torch.utils.cpp_extension and called
// through ctypes with raw pointers, so it includes no torch header (the build takes seconds, not
// the minutes torch/extension.h costs). All tensors are contiguous, in one dtype (float or
// double); cpu.py allocates every output.
//
// Layout of the work. A scan of one channel is a chain of dependent steps, one per token, too
// short per step to keep a core busy; so a vector holds W channels (16 or 8, below) of one B/C
// group and the scan runs them side by side: their N states live in registers, B_t and C_t are
// broadcast per token, and softplus, the skip and the gate are computed per vector. The tokens go
// in tiles of TL: a tile's inputs are transposed from (channel, token) into small (token, lane)
// buffers and its outputs transposed back, so nothing of size (B, Di, L, N) is ever written. The
// forward saves the state at every tile start (1/TL of the states); the backward walks the tiles
// in reverse, recomputes a tile's states from its start, and runs the adjoint recurrence
// backwards through it. Work items are (batch, block of W channels), split over threads in fixed
// ranges; the sums over items (dA, dD, d delta_bias over the batch; dB, dC over a group's
// blocks) are left to the caller, so no result depends on the number of threads.

// Headers: C ones only (<thread> and <vector> would double the build time), and the intrinsics
// only where the build targets AVX-512 (GCC's and clang's builtins differ there).
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Channels per vector: a 512-bit register's 16 floats where the build targets AVX-512, else 8
// (one AVX2 register; two NEON registers on Arm, which the compiler pairs).
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
constexpr int TL = 16;  // tokens per tile: the backward's buffers (2 TL N W) stay in L1
                        // (32 KiB at W = 16, N = 16)

typedef float vfloat __attribute__((vector_size(W * sizeof(float))));
typedef double vdouble __attribute__((vector_size(W * sizeof(double))));
typedef int32_t vint32 __attribute__((vector_size(W * sizeof(int32_t))));

template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef vfloat type; };
template <> struct VecOf<double> { typedef vdouble type; };

// ---- exp, log1p on [0, 1], sigmoid and sums across lanes -------------------------------------
// float: vectorised, exp by Cephes' polynomial (about 1 ulp); double (the checks' dtype): the C
// library, one lane at a time.

inline vfloat clamp(vfloat x, float lo, float hi) {
#if defined(__AVX512F__)
  return _mm512_min_ps(_mm512_max_ps(x, vfloat{} + lo), vfloat{} + hi);
#elif defined(__AVX__)
  return __builtin_ia32_minps256(__builtin_ia32_maxps256(x, vfloat{} + lo), vfloat{} + hi);
#else
  x = x < lo ? vfloat{} + lo : x;
  return x > hi ? vfloat{} + hi : x;
#endif
}

inline vfloat vexp(vfloat x) {
  // float's normal range: exp(-87.34) = 1.2e-38 stands for anything smaller (as a decay, the
  // same as 0 to float precision).
  x = clamp(x, -87.33654f, 88.37626f);
  // x / ln 2 rounded to the integer n by adding 1.5 * 2^23 (+ 127, the exponent bias): the low
  // bits of the sum are then n + 127, which shifted into the exponent field give 2^n.
  const float magic = 12582912.f + 127.f;
  const vfloat biased = x * 1.44269504088896341f + magic;
  const vfloat n = biased - magic;
  vfloat r = x - n * 0.693359375f;  // x - n ln 2, ln 2 in two parts (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return p * (vfloat)((vint32)biased << 23);
}

inline vfloat vlog1p_unit(vfloat e) {  // log(1 + e) for e in [0, 1]: 2 atanh(e / (2 + e))
  const vfloat s = e / (e + 2.f), s2 = s * s;  // s <= 1/3: the series' 9th term is < 4e-9
  vfloat p = vfloat{} + 1.f / 17;
  for (int k = 15; k >= 1; k -= 2) p = p * s2 + 1.f / k;
  return 2.f * s * p;
}

inline vfloat vsigmoid(vfloat x) { return 1.f / (1.f + vexp(-x)); }

inline vdouble vexp(vdouble x) {
  for (int j = 0; j < W; ++j) x[j] = exp(x[j]);
  return x;
}

inline vdouble vlog1p_unit(vdouble e) {
  for (int j = 0; j < W; ++j) e[j] = log1p(e[j]);
  return e;
}

inline vdouble vsigmoid(vdouble x) {
  for (int j = 0; j < W; ++j) x[j] = 1 / (1 + exp(-x[j]));
  return x;
}

template <typename V> inline V softplus(V x) {  // max(x, 0) + log(1 + exp(-|x|))
  return (x > 0 ? x : V{}) + vlog1p_unit(vexp(x > 0 ? -x : x));
}

// out[i] = the sum of v[i]'s lanes, for 8 vectors at once.
template <typename V, typename T> inline void lane_sums8(const V* v, T* out) {
  for (int i = 0; i < 8; ++i) {
    T s = v[i][0];
    for (int j = 1; j < W; ++j) s += v[i][j];
    out[i] = s;
  }
}

#if defined(__AVX__)
typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));

inline void lane_sums8_avx(const vfloat8* v, float* out) {
  // hadd pairs neighbours within each 128-bit half: after two rounds, half h of ab holds the
  // partial sums of v[0..3] over lanes 4h..4h+3, and likewise cd for v[4..7].
  const vfloat8 ab = __builtin_ia32_haddps256(__builtin_ia32_haddps256(v[0], v[1]),
                                              __builtin_ia32_haddps256(v[2], v[3]));
  const vfloat8 cd = __builtin_ia32_haddps256(__builtin_ia32_haddps256(v[4], v[5]),
                                              __builtin_ia32_haddps256(v[6], v[7]));
  const vfloat8 sums = __builtin_ia32_vperm2f128_ps256(ab, cd, 0x20) +
                       __builtin_ia32_vperm2f128_ps256(ab, cd, 0x31);
  for (int i = 0; i < 8; ++i) out[i] = sums[i];
}

template <> inline void lane_sums8<vfloat, float>(const vfloat* v, float* out) {
#if defined(__AVX512F__)  // each vector's two 256-bit halves added first
  vfloat8 halves[8][2];  // (memcpy, not __builtin_shufflevector, which GCC has from 12 on)
  __builtin_memcpy(halves, v, sizeof(halves));
  for (int i = 0; i < 8; ++i) halves[i][0] += halves[i][1];
  const vfloat8 sums[8] = {halves[0][0], halves[1][0], halves[2][0], halves[3][0],
                           halves[4][0], halves[5][0], halves[6][0], halves[7][0]};
  lane_sums8_avx(sums, out);
#else
  lane_sums8_avx(v, out);
#endif
}
#endif

template <typename X> inline X min(X a, X b) { return a < b ? a : b; }

// An array of n values, zeroed, freed at the end of its scope.
template <typename V> struct Buffer {
  V* data;
  explicit Buffer(int64_t n) : data(new V[n]()) {}
  ~Buffer() { delete[] data; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  V& operator[](int64_t i) { return data[i]; }
};

}  // namespace

// What cpu.py passes (a ctypes.Structure there mirrors it field by field). Shapes as mamba_ssm's
// selective_scan_fn: u, delta, z, out (batch, dim, length); A (dim, state); B, C (batch, groups,
// state, length); D, delta_bias (dim). Optional inputs are null when absent. `states` is
// (batch, blocks, tiles, state, W): the forward fills it unless it is null, the backward reads
// it. The backward writes du, ddelta, dz like u, and per item partial sums: dA_part
// (batch, dim, state), dD_part and dbias_part (batch, dim), dB_part and dC_part
// (batch, blocks, state, length), where blocks = groups * ceil(dim / groups / W).
struct ScanProblem {
  int64_t batch, dim, length, state, groups, softplus, threads;
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias;
  void *out, *states;
  const void* grad_out;
  void *du, *ddelta, *dz, *dA_part, *dD_part, *dbias_part, *dB_part, *dC_part;
};

namespace {

// ---- the layout: blocks of W channels, tiles of TL tokens ------------------------------------

struct Block {  // W channels of one group (fewer in a group's last block) of batch element b
  int64_t b, index, group, first, lanes;
};

int64_t blocks_per_group(const ScanProblem& p) { return (p.dim / p.groups + W - 1) / W; }

int64_t n_blocks(const ScanProblem& p) { return p.groups * blocks_per_group(p); }

int64_t n_tiles(const ScanProblem& p) { return (p.length + TL - 1) / TL; }

// A tile of a block's inputs, token by token (index t), W channels per vector.
template <typename T> struct Tile {
  typedef typename VecOf<T>::type V;
  int64_t start, len;
  V x[TL], dt[TL], dtx[TL], y[TL];  // u; delta after bias and softplus; dt * u; C h + D u
};

// Rows [first, first + lanes) of a (batch, dim, length) tensor, tokens [start, start + len),
// into buf[t][lane]; missing lanes read as 0, so they scan zeros to no effect.
template <typename T, typename V>
void load_tile(const void* src, const ScanProblem& p, const Block& k, int64_t start, int64_t len,
               V* buf) {
  for (int t = 0; t < TL; ++t) buf[t] = V{};
  for (int64_t j = 0; j < k.lanes; ++j) {
    const T* row = static_cast<const T*>(src) + (k.b * p.dim + k.first + j) * p.length + start;
    for (int64_t t = 0; t < len; ++t) buf[t][j] = row[t];
  }
}

template <typename T, typename V>
void store_tile(const V* buf, const ScanProblem& p, const Block& k, int64_t start, int64_t len,
                void* dst) {
  for (int64_t j = 0; j < k.lanes; ++j) {
    T* row = static_cast<T*>(dst) + (k.b * p.dim + k.first + j) * p.length + start;
    for (int64_t t = 0; t < len; ++t) row[t] = buf[t][j];
  }
}

// A per-channel vector (D, delta_bias, a column of A) of the block's lanes; missing lanes 0.
template <typename T, typename V> V load_lanes(const void* src, const Block& k, int64_t stride) {
  V v = {};
  for (int64_t j = 0; j < k.lanes; ++j) v[j] = static_cast<const T*>(src)[(k.first + j) * stride];
  return v;
}

template <typename T, typename V> void store_lanes(V v, const Block& k, int64_t stride, T* dst) {
  for (int64_t j = 0; j < k.lanes; ++j) dst[(k.first + j) * stride] = v[j];
}

// x, dt (delta + delta_bias, softplus'd if asked) and dt * x of a tile; y starts as D x, the skip
// term of 2b. sig_dt, when given, gets d dt / d delta: sigmoid of softplus' argument (or 1).
template <typename T>
void prepare_tile(const ScanProblem& p, const Block& k, Tile<T>& tile,
                  typename Tile<T>::V* sig_dt = nullptr) {
  typedef typename Tile<T>::V V;
  load_tile<T>(p.u, p, k, tile.start, tile.len, tile.x);
  load_tile<T>(p.delta, p, k, tile.start, tile.len, tile.dt);
  const V bias = p.delta_bias ? load_lanes<T, V>(p.delta_bias, k, 1) : V{};
  const V D = p.D ? load_lanes<T, V>(p.D, k, 1) : V{};
  for (int64_t t = 0; t < tile.len; ++t) {
    const V arg = tile.dt[t] + bias;
    tile.dt[t] = p.softplus ? softplus(arg) : arg;
    if (sig_dt) sig_dt[t] = p.softplus ? vsigmoid(arg) : V{} + 1;
    tile.dtx[t] = tile.dt[t] * tile.x[t];
    tile.y[t] = D * tile.x[t];
  }
}

template <typename T> const T* group_rows(const ScanProblem& p, const void* BC, const Block& k) {
  return static_cast<const T*>(BC) + (k.b * p.groups + k.group) * p.state * p.length;
}

template <typename T> T* state_slot(const ScanProblem& p, const Block& k, int64_t tile) {
  return static_cast<T*>(p.states) +
         ((k.b * n_blocks(p) + k.index) * n_tiles(p) + tile) * p.state * W;
}

template <int NS> struct Run {
  static constexpr int value = NS;
};
template <typename T> struct IsFloat {
  static constexpr bool value = false;
};
template <> struct IsFloat<float> {
  static constexpr bool value = true;
};

// Calls f(Run<NS>(), n0) for consecutive runs of NS states covering all N: in float, runs of 16
// keep Mamba's usual d_state in registers whole, single states take the rest; double (for
// checks) goes state by state, which halves the build time.
template <typename T, typename F> void by_state_runs(int64_t N, F f) {
  int64_t n0 = 0;
  if (IsFloat<T>::value)
    for (; n0 + 16 <= N; n0 += 16) f(Run<IsFloat<T>::value ? 16 : 1>(), n0);
  for (; n0 < N; ++n0) f(Run<1>(), n0);
}

// ---- forward ---------------------------------------------------------------------------------

// Eq. 2a over a tile for the states [n0, n0 + NS), in registers: h <- exp(dt A) h + dt B x, and
// C h added to tile.y (eq. 2b). With KEEP (the backward), the decays and the states of every
// token go to decay[t * N + n] and hs[t * N + n].
template <int NS, bool KEEP, typename T>
void scan_states(int64_t N, int64_t L, int64_t n0, Tile<T>& tile, const typename Tile<T>::V* A,
                 typename Tile<T>::V* h, const T* B, const T* C,
                 typename Tile<T>::V* decay = nullptr, typename Tile<T>::V* hs = nullptr) {
  typedef typename Tile<T>::V V;
  V hr[NS], Ar[NS];
  for (int n = 0; n < NS; ++n) hr[n] = h[n0 + n], Ar[n] = A[n0 + n];
  for (int64_t t = 0; t < tile.len; ++t) {
    const V dt = tile.dt[t], dtx = tile.dtx[t];
    V y[2] = {tile.y[t], V{}};  // two partial sums: half the dependent additions
#pragma GCC unroll 16
    for (int n = 0; n < NS; ++n) {
      const V a = vexp(dt * Ar[n]);
      hr[n] = a * hr[n] + dtx * B[(n0 + n) * L + t];
      y[n % 2] += hr[n] * C[(n0 + n) * L + t];
      if (KEEP) decay[t * N + n0 + n] = a, hs[t * N + n0 + n] = hr[n];
    }
    tile.y[t] = y[0] + y[1];
  }
  for (int n = 0; n < NS; ++n) h[n0 + n] = hr[n];
}

// The block's column of A, state by state, into A[0..N).
template <typename T, typename V> void load_A(const ScanProblem& p, const Block& k, V* A) {
  for (int64_t n = 0; n < p.state; ++n)
    A[n] = load_lanes<T, V>(static_cast<const T*>(p.A) + n, k, p.state);
}

template <typename V> void copy(const V* from, int64_t n, V* to) {
  for (int64_t i = 0; i < n; ++i) to[i] = from[i];
}

// The output gate: y * silu(z).
template <typename T> void gate(const ScanProblem& p, const Block& k, Tile<T>& tile) {
  typename Tile<T>::V z[TL];
  load_tile<T>(p.z, p, k, tile.start, tile.len, z);
  for (int64_t t = 0; t < tile.len; ++t) tile.y[t] *= z[t] * vsigmoid(z[t]);
}

template <typename T> void forward_item(const ScanProblem& p, const Block& k) {
  typedef typename VecOf<T>::type V;
  Buffer<V> A(p.state), h(p.state);
  load_A<T>(p, k, A.data);
  const T *B = group_rows<T>(p, p.B, k), *C = group_rows<T>(p, p.C, k);
  Tile<T> tile;
  for (int64_t i = 0; i < n_tiles(p); ++i) {
    tile.start = i * TL;
    tile.len = min<int64_t>(TL, p.length - tile.start);
    if (p.states) copy(h.data, p.state, reinterpret_cast<V*>(state_slot<T>(p, k, i)));
    prepare_tile(p, k, tile);
    by_state_runs<T>(p.state, [&](auto run, int64_t n0) {
      scan_states<decltype(run)::value, false>(p.state, p.length, n0, tile, A.data, h.data,
                                               B + tile.start, C + tile.start);
    });
    if (p.z) gate(p, k, tile);
    store_tile<T>(tile.y, p, k, tile.start, tile.len, p.out);
  }
}

// ---- backward --------------------------------------------------------------------------------

// The adjoint recurrence over a tile, tokens in reverse, for the states [n0, n0 + NS):
// lam_t = gy_t C_t + exp(dt_{t+1} A) lam_{t+1} is the gradient of h_t (carried in lam across
// tiles). Per token it adds sum_n lam B to sB (for du and d dt) and sum_n lam A exp(dt A) h_{t-1}
// to sq (for d dt), per state lam dt exp(dt A) h_{t-1} to dA, and it overwrites decay[t * N + n],
// read for the last time, with lam dt x, whose sum over lanes is dB.
template <int NS, typename T>
void adjoint_states(int64_t N, int64_t L, int64_t n0, const Tile<T>& tile,
                    const typename Tile<T>::V* A, typename Tile<T>::V* lam,
                    typename Tile<T>::V* dA, typename Tile<T>::V* decay,
                    const typename Tile<T>::V* hs, const typename Tile<T>::V* h0,
                    const typename Tile<T>::V* gy, typename Tile<T>::V* sB,
                    typename Tile<T>::V* sq, const T* B, const T* C) {
  typedef typename Tile<T>::V V;
  V lr[NS], Ar[NS], dAr[NS];
  for (int n = 0; n < NS; ++n) lr[n] = lam[n0 + n], Ar[n] = A[n0 + n], dAr[n] = dA[n0 + n];
  for (int64_t t = tile.len - 1; t >= 0; --t) {
    const V dt = tile.dt[t], dtx = tile.dtx[t], g = gy[t];
    const V* prev = t > 0 ? hs + (t - 1) * N : h0;
    V sb[2] = {}, s[2] = {};
#pragma GCC unroll 16
    for (int n = 0; n < NS; ++n) {
      const V a = decay[t * N + n0 + n];
      const V l = lr[n] + g * C[(n0 + n) * L + t];
      decay[t * N + n0 + n] = l * dtx;
      sb[n % 2] += l * B[(n0 + n) * L + t];
      const V q = l * a * prev[n0 + n];
      s[n % 2] += q * Ar[n];
      dAr[n] += q * dt;
      lr[n] = l * a;
    }
    sB[t] += sb[0] + sb[1];
    sq[t] += s[0] + s[1];
  }
  for (int n = 0; n < NS; ++n) lam[n0 + n] = lr[n], dA[n0 + n] = dAr[n];
}

// out[n * L + t] = sum over lanes of v[t * N + n] (times scale[t], if given), for a tile.
template <typename T, typename V>
void sum_lanes(const V* v, const V* scale, int64_t len, int64_t N, int64_t L, T* out) {
  V rows[8];
  T sums[8];
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      const int64_t count = min<int64_t>(8, N - n0);
      for (int64_t i = 0; i < 8; ++i)
        rows[i] = i < count ? (scale ? scale[t] * v[t * N + n0 + i] : v[t * N + n0 + i]) : V{};
      lane_sums8(rows, sums);
      for (int64_t i = 0; i < count; ++i) out[(n0 + i) * L + t] = sums[i];
    }
  }
}

template <typename T> void backward_item(const ScanProblem& p, const Block& k) {
  typedef typename VecOf<T>::type V;
  const int64_t N = p.state, L = p.length;
  Buffer<V> A(N), h0(N), h(N), lam(N), dA(N), decay(TL * N), hs(TL * N);
  load_A<T>(p, k, A.data);
  const T *B = group_rows<T>(p, p.B, k), *C = group_rows<T>(p, p.C, k);
  T* dB = static_cast<T*>(p.dB_part) + (k.b * n_blocks(p) + k.index) * N * L;
  T* dC = static_cast<T*>(p.dC_part) + (k.b * n_blocks(p) + k.index) * N * L;
  const V D = p.D ? load_lanes<T, V>(p.D, k, 1) : V{};
  V dD = {}, dbias = {};
  V sig[TL], g[TL], z[TL], sz[TL], gy[TL], sB[TL], sq[TL], du[TL], ddelta[TL];
  Tile<T> tile;
  for (int64_t i = n_tiles(p) - 1; i >= 0; --i) {
    tile.start = i * TL;
    tile.len = min<int64_t>(TL, L - tile.start);
    prepare_tile(p, k, tile, sig);
    load_tile<T>(p.grad_out, p, k, tile.start, tile.len, g);
    if (p.z) load_tile<T>(p.z, p, k, tile.start, tile.len, z);
    for (int64_t t = 0; t < tile.len; ++t) {
      sz[t] = p.z ? vsigmoid(z[t]) : V{};
      gy[t] = p.z ? g[t] * z[t] * sz[t] : g[t];  // the gradient of y, before the gate
      sB[t] = sq[t] = V{};
    }
    copy(reinterpret_cast<const V*>(state_slot<T>(p, k, i)), N, h0.data);
    copy(h0.data, N, h.data);
    by_state_runs<T>(N, [&](auto run, int64_t n0) {
      scan_states<decltype(run)::value, true>(N, L, n0, tile, A.data, h.data, B + tile.start,
                                              C + tile.start, decay.data, hs.data);
    });
    sum_lanes(hs.data, gy, tile.len, N, L, dC + tile.start);  // dC: sum over lanes of gy h
    if (p.z) {  // d/dz of y silu(z) = y sigmoid(z) (1 + z (1 - sigmoid(z)))
      for (int64_t t = 0; t < tile.len; ++t)
        g[t] *= tile.y[t] * sz[t] * (1 + z[t] * (1 - sz[t]));
      store_tile<T>(g, p, k, tile.start, tile.len, p.dz);
    }
    by_state_runs<T>(N, [&](auto run, int64_t n0) {
      adjoint_states<decltype(run)::value>(N, L, n0, tile, A.data, lam.data, dA.data, decay.data,
                         hs.data, h0.data, gy, sB, sq, B + tile.start, C + tile.start);
    });
    sum_lanes(decay.data, static_cast<V*>(nullptr), tile.len, N, L, dB + tile.start);
    for (int64_t t = 0; t < tile.len; ++t) {
      du[t] = sB[t] * tile.dt[t] + gy[t] * D;
      ddelta[t] = (sB[t] * tile.x[t] + sq[t]) * sig[t];
      dD += gy[t] * tile.x[t];
      dbias += ddelta[t];
    }
    store_tile<T>(du, p, k, tile.start, tile.len, p.du);
    store_tile<T>(ddelta, p, k, tile.start, tile.len, p.ddelta);
  }
  const int64_t row = k.b * p.dim;
  for (int64_t n = 0; n < N; ++n)
    store_lanes(dA[n], k, N, static_cast<T*>(p.dA_part) + row * N + n);
  store_lanes(dD, k, 1, static_cast<T*>(p.dD_part) + row);
  store_lanes(dbias, k, 1, static_cast<T*>(p.dbias_part) + row);
}

// ---- threads ---------------------------------------------------------------------------------

typedef void (*ItemFn)(const ScanProblem&, const Block&);

// Items [begin, end) of the (batch, block) items, in order, through `item`.
struct Range {
  const ScanProblem* p;
  ItemFn item;
  int64_t begin, end;
};

void* run_range(void* arg) {
  const Range& r = *static_cast<const Range*>(arg);
  const ScanProblem& p = *r.p;
  const int64_t per_group = blocks_per_group(p);
  for (int64_t i = r.begin; i < r.end; ++i) {
    Block k;
    k.b = i / n_blocks(p);
    k.index = i % n_blocks(p);
    k.group = k.index / per_group;
    const int64_t in_group = (k.index % per_group) * W;
    k.first = k.group * (p.dim / p.groups) + in_group;
    k.lanes = min<int64_t>(W, p.dim / p.groups - in_group);
    r.item(p, k);
  }
  return nullptr;
}

// Every item through `item`, in p.threads contiguous ranges (at most 64 threads).
void for_each_block(const ScanProblem& p, ItemFn item) {
  const int64_t items = p.batch * n_blocks(p);
  const int64_t threads = p.threads < 1 ? 1 : min<int64_t>(min<int64_t>(p.threads, 64), items);
  Range ranges[64];
  pthread_t ids[64];
  bool started[64] = {};
  for (int64_t i = 0; i < threads; ++i) {
    ranges[i] = Range{&p, item, items * i / threads, items * (i + 1) / threads};
    if (i > 0) started[i] = pthread_create(&ids[i], nullptr, run_range, &ranges[i]) == 0;
  }
  for (int64_t i = 0; i < threads; ++i)
    if (!started[i]) run_range(&ranges[i]);  // this thread's range, and any that got no thread
  for (int64_t i = 1; i < threads; ++i)
    if (started[i]) pthread_join(ids[i], nullptr);
}

}  // namespace

extern "C" {

int64_t selective_scan_lanes() { return W; }
int64_t selective_scan_tile() { return TL; }

void selective_scan_fwd_float(const ScanProblem* p) { for_each_block(*p, forward_item<float>); }
void selective_scan_fwd_double(const ScanProblem* p) { for_each_block(*p, forward_item<double>); }
void selective_scan_bwd_float(const ScanProblem* p) { for_each_block(*p, backward_item<float>); }
void selective_scan_bwd_double(const ScanProblem* p) { for_each_block(*p, backward_item<double>); }
}
