// gdscache codec kernels, C ABI (loaded with ctypes by gdscache/codecs/_cuda.py).
//
// Every kernel has a torch/numpy reference (gdscache/codecs/rans.py, cachegen.py) and must produce
// the same bits: integer arithmetic, explicitly rounded fp32 (__fmul_rn, __fdiv_rn, rintf) and no
// fused multiply-adds. Functions return a cudaError_t (0 = success).
//
// Speed: a rANS stream is a serial chain, so the coder kernels are bound by the latency of one step.
// Their frequency tables are staged once per block in shared memory (uint16: cumulative starts are
// kept modulo 2**16), which keeps every table lookup of that chain out of L1/L2.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr uint32_t kProbBits = 16;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kRansL = 1u << 16;
constexpr int kBuckets = 256;  // symbol lookup by slot >> 8 (rans.bucket_lut)
constexpr int kCodeMax = 8 * 127 - 1;
constexpr int kCodeMin = -8 * 126;
constexpr int kStreamThreads = 512;  // rANS kernels: one thread per stream, at most this many per block
constexpr int kStatChannels = 16;   // channels per tile of the statistics kernel
constexpr int kStatThreads = 256;
constexpr int kStatTables = 64;

__constant__ uint32_t kMantissaUp[8] = {0, 759234, 1587185, 2490071, 3474676, 4548395, 5719293, 6996167};

// Table set on the device, one uint16 buffer: [entry N*A as uint32 | lut N*257 as uint16], the lut at
// lut_off (a multiple of 8). entry = cum | freq << 16: a symbol's cumulative start (below 2**16 for every
// symbol that can be coded) and its frequency (below 2**16), fetched in one load. A symbol's range ends
// at cum + freq (<= 2**16), so trailing zero-frequency symbols are never reached.
struct TableSet {
  const uint16_t* buf;
  int lut_off, end, count, alphabet;
};

struct Tables {
  const uint32_t* entry;
  const uint16_t* lut;
};

// buf[0, hi) (a multiple of 8 uint16) copied into dynamic shared memory by the whole block when Staged,
// else read in place. Staged pointers come from the shared array, so the compiler emits shared loads.
template <bool Staged>
__device__ __forceinline__ Tables stage_tables(const TableSet& ts, int hi) {
  extern __shared__ uint4 smem4[];
  if (!Staged) return Tables{reinterpret_cast<const uint32_t*>(ts.buf), ts.buf + ts.lut_off};
  const uint4* src = reinterpret_cast<const uint4*>(ts.buf);
#pragma unroll 4
  for (int i = threadIdx.x; i < hi / 8; i += blockDim.x) smem4[i] = __ldg(src + i);
  __syncthreads();
  return Tables{reinterpret_cast<const uint32_t*>(smem4), reinterpret_cast<const uint16_t*>(smem4) + ts.lut_off};
}

// One rANS decode step: the symbol under x's slot, then x renormalised with the prefetched word `next`
// (words[pos]); bad is set when the stream runs out. et/lt: one table's entries and bucket lut, where
// lt[b] .. lt[b + 1] bound the symbols that can hold a slot of bucket b (usually one: no search).
__device__ __forceinline__ int rans_decode_symbol(uint32_t& x, const uint32_t* et, const uint16_t* lt,
                                                  const uint16_t* __restrict__ words, int64_t& pos, int64_t end,
                                                  uint32_t& next, bool& bad) {
  const uint32_t slot = x & (kProbScale - 1);
  int lo = lt[slot >> 8], hi = lt[(slot >> 8) + 1];
  while (lo < hi) {  // the last symbol starting at or before slot
    const int mid = (lo + hi + 1) >> 1;
    if ((et[mid] & 0xFFFF) <= slot) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const uint32_t e = et[lo];
  x = (e >> 16) * (x >> kProbBits) + slot - (e & 0xFFFF);
  const bool need = x < kRansL;
  const bool take = need && pos < end;
  bad |= need && !take;
  x = take ? (x << 16) | next : x;
  pos += take;
  if (take) next = pos < end ? words[pos] : 0;  // read ahead: the load's latency overlaps the next symbols
  return lo;
}

// The stream (row r, channel group cg) of this thread among R rows of C / G groups; false past the last.
__device__ __forceinline__ bool stream_of_thread(int R, int C, int G, int& s, int& r, int& cg) {
  s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= R * (C / G)) return false;
  r = s / (C / G);
  cg = s % (C / G);
  return true;
}

// G int16 values as one aligned vector load.
template <int G> struct Vec;
template <> struct Vec<1> { using type = int16_t; };
template <> struct Vec<2> { using type = int32_t; };
template <> struct Vec<4> { using type = int2; };
template <> struct Vec<8> { using type = int4; };

template <int G>
union Group {
  typename Vec<G>::type v;
  int16_t s[G];
};

template <int G>
__device__ __forceinline__ Group<G> load_group(const int16_t* p) {
  Group<G> g;
  g.v = *reinterpret_cast<const typename Vec<G>::type*>(p);
  return g;
}

// One thread per stream (row r, channel group cg); symbols coded in reverse, words written to
// scratch[(n + 2), S] from the end so the decoder reads them forward.
// Symbols are sym - mu[r, c] + offset (mu may be null: 0), so cachegen codes its quantized values in place.
template <int G, bool Staged>
__global__ void __launch_bounds__(kStreamThreads) rans_encode_kernel(
    const int16_t* __restrict__ sym, int R, int T, int C, const int32_t* __restrict__ tab, TableSet ts,
    const int8_t* __restrict__ mu, int offset, uint16_t* __restrict__ scratch, int32_t* __restrict__ lengths) {
  const Tables tb = stage_tables<Staged>(ts, ts.lut_off);
  const int A = ts.alphabet;
  const int S = R * (C / G);  // scratch columns
  int s, r, cg;
  if (!stream_of_thread(R, C, G, s, r, cg)) return;
  const int16_t* base = sym + (size_t)r * T * C + (size_t)cg * G;
  int toff[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const size_t ch = (size_t)r * C + cg * G + g;
    toff[g] = tab[ch] * A + offset - (mu ? (int)mu[ch] : 0);
  }
  uint32_t x = kRansL;
  int pos = T * G + 1;
  Group<G> next = load_group<G>(base + (size_t)(T - 1) * C);
  for (int t = T - 1; t >= 0; --t) {
    const Group<G> cur = next;
    if (t > 0) next = load_group<G>(base + (size_t)(t - 1) * C);
#pragma unroll
    for (int g = G - 1; g >= 0; --g) {
      const uint32_t e = tb.entry[toff[g] + cur.s[g]];
      const uint32_t f = e >> 16;
      const float inv = __frcp_rn((float)f);  // depends on the symbol only: off the state's dependency chain
      const bool emit = x >= (f << (32 - kProbBits));
      if (emit) scratch[(size_t)pos * S + s] = (uint16_t)(x & 0xFFFF);
      pos -= emit;
      x = emit ? x >> 16 : x;
      // x / f by the fp32 reciprocal: here x < f * 2**16, so the quotient is below 2**16 and three
      // roundings put the product within 0.012 of it: the truncation is exact or off by one either way.
      uint32_t quo = __float2uint_rz(__fmul_rn(__uint2float_rn(x), inv));
      int32_t rem = (int32_t)(x - quo * f);
      const int32_t fix = (rem >= (int32_t)f) - (rem < 0);
      quo += fix;
      rem -= fix * (int32_t)f;
      x = (quo << kProbBits) + (uint32_t)rem + (e & 0xFFFF);
    }
  }
  scratch[(size_t)pos * S + s] = (uint16_t)(x >> 16);
  scratch[(size_t)(pos - 1) * S + s] = (uint16_t)(x & 0xFFFF);
  lengths[s] = T * G + 2 - (pos - 1);
}

// One block per stream: copy its words (the tail of its scratch column; rows of `stride` columns) to its
// packed offset.
__global__ void rans_compact_kernel(const uint16_t* __restrict__ scratch, const int32_t* __restrict__ lengths,
                                    const int64_t* __restrict__ ends, int64_t stride, int rows,
                                    uint16_t* __restrict__ out) {
  const int s = blockIdx.x;
  const int len = lengths[s];
  const int64_t start = ends[s] - len;
  const int first = rows - len;
  for (int k = threadIdx.x; k < len; k += blockDim.x) out[start + k] = scratch[(first + k) * stride + s];
}

template <int G, bool Staged>
__global__ void __launch_bounds__(kStreamThreads) rans_decode_kernel(
    const uint16_t* __restrict__ words, int64_t nwords, const int64_t* __restrict__ offsets,
    const int64_t* __restrict__ lengths, int R, int T, int C, const int32_t* __restrict__ tab, TableSet ts,
    int16_t* __restrict__ out, int32_t* __restrict__ err) {
  const Tables tb = stage_tables<Staged>(ts, ts.end);
  const int A = ts.alphabet;
  int s, r, cg;
  if (!stream_of_thread(R, C, G, s, r, cg)) return;
  int64_t p = offsets[s];
  const int64_t end = p + lengths[s];
  if (lengths[s] < 2 || p < 0 || end > nwords) {
    atomicOr(err, 1);
    return;
  }
  const uint32_t* et[G];
  const uint16_t* lt[G];
  bool bad = false;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    int t = tab[(size_t)r * C + cg * G + g];
    if (t < 0 || t >= ts.count) {
      bad = true;
      t = 0;
    }
    et[g] = tb.entry + (size_t)t * A;
    lt[g] = tb.lut + (size_t)t * (kBuckets + 1);
  }
  int16_t* dst = out + (size_t)r * T * C + (size_t)cg * G;
  uint32_t x = (uint32_t)words[p] | ((uint32_t)words[p + 1] << 16);
  p += 2;
  uint32_t next = p < end ? words[p] : 0;
  for (int t = 0; t < T; ++t) {
    Group<G> v;
#pragma unroll
    for (int g = 0; g < G; ++g) v.s[g] = (int16_t)rans_decode_symbol(x, et[g], lt[g], words, p, end, next, bad);
    *reinterpret_cast<typename Vec<G>::type*>(dst + (size_t)t * C) = v.v;
  }
  if (bad || x != kRansL || p != end) atomicOr(err, 1);
}

// 2**(code/8) rounded up, exactly; mant is kMantissaUp (or a shared copy where lanes index it divergently).
__device__ __forceinline__ float code_scale(int32_t code, const uint32_t* mant = kMantissaUp) {
  const int32_t bits = (((code >> 3) + 127) << 23) | (int32_t)mant[code & 7];
  return __int_as_float(bits);
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t off, int dtype) {
  if (dtype == 0) return static_cast<const float*>(base)[off];
  if (dtype == 1) return __half2float(static_cast<const __half*>(base)[off]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
}

__device__ __forceinline__ void store_from_float(void* base, int64_t off, int dtype, float v) {
  if (dtype == 0) {
    static_cast<float*>(base)[off] = v;
  } else if (dtype == 1) {
    static_cast<__half*>(base)[off] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v);
  }
}

// One block per (l, p, t) row, one warp per head: code = 8 * (exponent - 127) + k with 2**(k/8) rounded up
// covering the row's absmax (kCodeMax for zero/denormal rows); flag |= 1 on a non-finite value.
// Element (l, p, t, h, d) of a chunk sits at l * s0 + p * s1 + tok[t] + h * s3 + d * s4: tok[t] = t * s2 for a
// strided tensor, a page's offset plus the token's slot for paged KV (so pages are read in place).
__global__ void cachegen_codes_kernel(const void* __restrict__ x, int P, int T, int H, int D, int64_t s0, int64_t s1,
                                      const int64_t* __restrict__ tok, int64_t s3, int64_t s4, int dtype,
                                      int32_t* __restrict__ code, int32_t* __restrict__ flag) {
  const int row = blockIdx.x;
  const int t = row % T, lp = row / T;
  const int l = lp / P, p = lp % P;
  const int lane = threadIdx.x % 32;
  const int64_t row_at = l * s0 + p * s1 + tok[t];
  for (int h = threadIdx.x / 32; h < H; h += blockDim.x / 32) {
    const int64_t base = row_at + h * s3;
    float m = 0.f;
    bool finite = true;
    for (int d = lane; d < D; d += 32) {
      const float v = fabsf(load_as_float(x, base + d * s4, dtype));
      finite = finite && isfinite(v);
      m = fmaxf(m, v);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const bool all_finite = __all_sync(0xffffffffu, finite);
    if (lane == 0) {
      const int32_t bits = __float_as_int(m);
      const int32_t e = bits >> 23, mant = bits & 0x7FFFFF;
      int k = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) k += mant > (int32_t)kMantissaUp[i];
      code[(size_t)row * H + h] = e > 0 ? 8 * (e - 127) + k : kCodeMax;
      if (!all_finite) atomicOr(flag, 1);
    }
  }
}

// One warp per (l, p, h): base = min over tokens of the code (0 when every row is zero), clamped to
// [kCodeMin, kCodeMax - 255]; rel = code - base clamped to [0, 255] (0 for zero rows).
__global__ void cachegen_base_rel_kernel(const int32_t* __restrict__ code, int LP, int T, int H,
                                         int16_t* __restrict__ base, uint8_t* __restrict__ rel) {
  const int w = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (w >= LP * H) return;
  const int lp = w / H, h = w % H;
  const int32_t* c = code + (size_t)lp * T * H + h;
  int m = kCodeMax;
  for (int t = lane; t < T; t += 32) m = min(m, c[(size_t)t * H]);
  for (int o = 16; o > 0; o >>= 1) m = min(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int b = min(max(m == kCodeMax ? 0 : m, kCodeMin), kCodeMax - 255);
  if (lane == 0) base[w] = (int16_t)b;
  uint8_t* rl = rel + (size_t)lp * T * H + h;
  for (int t = lane; t < T; t += 32) {
    const int v = c[(size_t)t * H];
    rl[(size_t)t * H] = (uint8_t)(v == kCodeMax ? 0 : min(max(v - b, 0), 255));
  }
}

__device__ __forceinline__ float step_denom(const int16_t* base, const uint8_t* rel, int lp, int row, int H, int h,
                                            float sw) {
  return __fmul_rn(code_scale((int32_t)base[lp * H + h] + (int32_t)rel[(size_t)row * H + h]), sw);
}

// One block per (l, p, t) row. Quantize: q[l, p, t, c] = clamp(rint(x / (scale(base + rel) * sw[l, p, c]))),
// reading x (addressed as in cachegen_codes_kernel); dequantize: x = q * scale(base + rel) * sw[l, p, c], writing
// x, except tokens whose tok[t] is negative (left alone).
template <bool Quantize>
__global__ void cachegen_scale_kernel(void* __restrict__ x, int P, int T, int H, int D, int64_t s0, int64_t s1,
                                      const int64_t* __restrict__ tok, int64_t s3, int64_t s4, int dtype,
                                      const int16_t* __restrict__ base,
                                      const uint8_t* __restrict__ rel, const float* __restrict__ sw, int qmax,
                                      int16_t* __restrict__ q) {
  const int row = blockIdx.x;
  const int t = row % T, lp = row / T;
  const int l = lp / P, p = lp % P;
  const int C = H * D;
  const int64_t at_t = tok[t];
  if (!Quantize && at_t < 0) return;
  const int64_t xb = l * s0 + p * s1 + at_t;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int h = c / D, d = c - h * D;
    const float denom = step_denom(base, rel, lp, row, H, h, sw[(size_t)lp * C + c]);
    const int64_t at = xb + h * s3 + d * s4;
    if (Quantize) {
      const float r = rintf(__fdiv_rn(load_as_float(x, at, dtype), denom));
      q[(size_t)row * C + c] = (int16_t)fminf(fmaxf(r, (float)-qmax), (float)qmax);
    } else {
      store_from_float(x, at, dtype, __fmul_rn((float)q[(size_t)row * C + c], denom));
    }
  }
}

// Per (row r, channel c) of q [R, T, C]: mu = floor((sum_t q + T/2) / T) clamped to [-qmax, qmax], then the
// table k minimising sum_t cost[k][q - mu + offset] (ties: lowest k), like the torch reference.
// Persistent blocks take tiles of kStatChannels channels of one row: a column histogram per channel in
// shared memory, its non-empty bins compacted in place, then one warp prices them under all 64 tables.
__global__ void __launch_bounds__(kStatThreads) cachegen_stats_kernel(
    const int16_t* __restrict__ q, int R, int T, int C, const uint16_t* __restrict__ cost, int A, bool staged,
    int qmax, int offset, int8_t* __restrict__ mu_out, uint8_t* __restrict__ tab_out) {
  extern __shared__ uint4 smem4[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int cost_words = (kStatTables * A + 7) / 8 * 8;
  const uint16_t* cst = cost;
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem4);
  if (staged) {
    const uint4* src = reinterpret_cast<const uint4*>(cost);
    for (int i = tid; i < cost_words / 8; i += blockDim.x) smem4[i] = __ldg(src + i);
    cst = reinterpret_cast<const uint16_t*>(smem4);
    hist = reinterpret_cast<uint32_t*>(smem4 + cost_words / 8);
  }
  __shared__ long long part[kStatThreads / 32][kStatChannels];
  __shared__ int mu_s[kStatChannels];
  __shared__ int nbins[kStatChannels];
  const int ch = tid % kStatChannels;
  const int tstep = kStatThreads / kStatChannels;
  const int per_row = (C + kStatChannels - 1) / kStatChannels;
  for (int tile = blockIdx.x; tile < R * per_row; tile += gridDim.x) {
    const int r = tile / per_row, c0 = tile % per_row * kStatChannels;
    const int width = min(kStatChannels, C - c0);
    const int16_t* col = q + (size_t)r * T * C + c0 + ch;
    __syncthreads();  // the previous tile's histograms (and the staged costs) are done with
    for (int i = tid; i < kStatChannels * A; i += blockDim.x) hist[i] = 0;
    long long sum = 0;
    if (ch < width)
      for (int t = tid / kStatChannels; t < T; t += tstep) sum += col[(size_t)t * C];
    sum += __shfl_down_sync(0xffffffffu, sum, 16);
    if (lane < kStatChannels) part[warp][lane] = sum;
    __syncthreads();
    if (tid < kStatChannels) {
      long long total = 0;
      for (int w = 0; w < kStatThreads / 32; ++w) total += part[w][tid];
      const long long a = total + T / 2;
      long long m = a >= 0 ? a / T : -((-a + T - 1) / T);
      mu_s[tid] = (int)(m < -qmax ? -qmax : (m > qmax ? qmax : m));
    }
    __syncthreads();
    const int shift = offset - mu_s[ch];
    if (ch < width)
      for (int t = tid / kStatChannels; t < T; t += tstep) atomicAdd(&hist[ch * A + col[(size_t)t * C] + shift], 1u);
    __syncthreads();
    // Compact each histogram's non-empty bins in place as count * 512 + bin (T < 2**23, A <= 512).
    for (int k = warp; k < width; k += kStatThreads / 32) {
      uint32_t* h = hist + k * A;
      int n = 0;
      for (int b0 = 0; b0 < A; b0 += 32) {
        const int b = b0 + lane;
        const uint32_t count = b < A ? h[b] : 0;
        const unsigned mask = __ballot_sync(0xffffffffu, count != 0);
        __syncwarp();
        if (count) h[n + __popc(mask & ((1u << lane) - 1))] = count * 512u + (uint32_t)b;
        n += __popc(mask);
        __syncwarp();
      }
      if (lane == 0) nbins[k] = n;
    }
    __syncthreads();
    for (int k = warp; k < width; k += kStatThreads / 32) {
      const uint32_t* h = hist + k * A;
      const uint16_t* c_lo = cst + lane * A;
      const uint16_t* c_hi = cst + (lane + 32) * A;
      unsigned long long lo = 0, hi = 0;
      for (int i = 0; i < nbins[k]; ++i) {
        const uint32_t e = h[i];
        const uint32_t b = e & 511u, count = e >> 9;
        lo += (unsigned long long)count * c_lo[b];
        hi += (unsigned long long)count * c_hi[b];
      }
      unsigned long long best = hi < lo ? hi : lo;
      int best_k = hi < lo ? lane + 32 : lane;
      for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int ok = __shfl_xor_sync(0xffffffffu, best_k, o);
        if (ob < best || (ob == best && ok < best_k)) {
          best = ob;
          best_k = ok;
        }
      }
      if (lane == 0) {
        const size_t out = (size_t)r * C + c0 + k;
        mu_out[out] = (int8_t)mu_s[k];
        tab_out[out] = (uint8_t)best_k;
      }
    }
  }
}

// Fused cachegen decode of N chunks at once: rANS-decode one stream, add back mu, dequantize with the
// token's scale and the channel's step, and store into the output. Side information is stacked over chunks
// ([N, L, P, ...]); chunk n's words end at word_end[n] (its start is word_end[n - 1] or 0). Token t of chunk n
// goes to out + tok[n * T + t] (+ l * s0 + p * s1 + h * s3 + d * s4): a strided tensor or pages of a paged
// cache; a negative tok leaves that token alone. Any inconsistency sets err[n].
template <int G, bool Staged>
__global__ void __launch_bounds__(kStreamThreads) cachegen_decode_kernel(
    const uint16_t* __restrict__ words, const int64_t* __restrict__ word_end, const int64_t* __restrict__ offsets,
    const int32_t* __restrict__ lengths, int N, int L, int P, int T, int H, int D, const uint8_t* __restrict__ tab,
    const int8_t* __restrict__ mu, const int16_t* __restrict__ base, const uint8_t* __restrict__ rel, TableSet ts,
    int qmax, int offset, const float* __restrict__ sw, int64_t s0, int64_t s1, const int64_t* __restrict__ tok,
    int64_t s3, int64_t s4, int dtype, void* __restrict__ out, int32_t* __restrict__ err) {
  __shared__ uint32_t mant[8];
  if (threadIdx.x < 8) mant[threadIdx.x] = kMantissaUp[threadIdx.x];
  if (!Staged) __syncthreads();
  const Tables tb = stage_tables<Staged>(ts, ts.end);
  const int A = ts.alphabet;
  const int C = H * D;
  const int groups = C / G;
  const int S = L * P * groups;
  const int64_t sg = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (sg >= (int64_t)N * S) return;
  const int n = (int)(sg / S), s = (int)(sg % S);
  const int r = s / groups, cg = s % groups;
  const int l = r / P, p = r % P;
  const int rg = n * L * P + r;  // row in the stacked side information
  const int len = lengths[sg];
  int64_t pos = offsets[sg];
  const int64_t end = pos + len, first = n ? word_end[n - 1] : 0;
  if (pos < first || len < 2 || len > T * G + 2 || end > word_end[n] || (s == S - 1 && end != word_end[n])) {
    atomicOr(err + n, 1);
    return;
  }
  const uint32_t* et[G];
  const uint16_t* lt[G];
  int shift[G];
  float step[G];
  int64_t obase[G];
  int32_t bcode[G];
  const uint8_t* rl[G];
  bool bad = false;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int c = cg * G + g;
    const size_t ch = (size_t)rg * C + c;
    int t = tab[ch];
    const int m = mu[ch];
    if (t >= ts.count || m < -qmax || m > qmax) {
      bad = true;
      t = 0;
    }
    et[g] = tb.entry + (size_t)t * A;
    lt[g] = tb.lut + (size_t)t * (kBuckets + 1);
    shift[g] = m - offset;
    step[g] = sw[(size_t)r * C + c];
    const int h = c / D, d = c % D;
    obase[g] = l * s0 + p * s1 + h * s3 + d * s4;
    bcode[g] = base[(size_t)rg * H + h];
    rl[g] = rel + (size_t)rg * T * H + h;
    if (bcode[g] < kCodeMin || bcode[g] > kCodeMax - 255) bad = true;
  }
  if (bad) {
    atomicOr(err + n, 1);
    return;
  }
  uint32_t x = (uint32_t)words[pos] | ((uint32_t)words[pos + 1] << 16);
  pos += 2;
  uint32_t next = pos < end ? words[pos] : 0;
  int32_t cur_rel[G], next_rel[G];
  const int64_t* tk = tok + (int64_t)n * T;
  int64_t cur_at = tk[0];
#pragma unroll
  for (int g = 0; g < G; ++g) cur_rel[g] = rl[g][0];
  for (int t = 0; t < T; ++t) {
    const int tn = t + 1 < T ? t + 1 : t;  // the next token's scale offsets and place load while this one decodes
    const int64_t next_at = tk[tn];
#pragma unroll
    for (int g = 0; g < G; ++g) next_rel[g] = rl[g][tn * H];
    float val[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      int qv = rans_decode_symbol(x, et[g], lt[g], words, pos, end, next, bad) + shift[g];
      if (qv < -qmax || qv > qmax) {
        bad = true;
        qv = 0;
      }
      val[g] = __fmul_rn((float)qv, __fmul_rn(code_scale(bcode[g] + cur_rel[g], mant), step[g]));
    }
    if (cur_at >= 0) {
#pragma unroll
      for (int g = 0; g < G; ++g) store_from_float(out, obase[g] + cur_at, dtype, val[g]);
    }
    cur_at = next_at;
#pragma unroll
    for (int g = 0; g < G; ++g) cur_rel[g] = next_rel[g];
  }
  if (bad || x != kRansL || pos != end) atomicOr(err + n, 1);
}

// Add the three sums of every thread of the block into sums[0..2]: a warp's by shuffles, then the warps' by one
// thread each (exact integer sums, so the order of addition does not matter).
__device__ void add_block_sums(unsigned long long a, unsigned long long b, unsigned long long c,
                               unsigned long long* sums) {
  __shared__ unsigned long long part[3][32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
    c += __shfl_xor_sync(0xffffffffu, c, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    part[0][warp] = a;
    part[1][warp] = b;
    part[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    unsigned long long t = 0;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) t += part[threadIdx.x][w];
    atomicAdd(sums + threadIdx.x, t);
  }
}

// Add words j = from, from + step, ... (below n) of a row into the three halfsum3 sums, one word at a time: word j
// is word start + j of its payload.
__device__ void add_words(const uint16_t* __restrict__ words, int64_t from, int64_t n, int64_t step, int64_t start,
                          unsigned long long& a, unsigned long long& b, unsigned long long& c) {
  for (int64_t j = from; j < n; j += step) {
    const unsigned long long word = words[j];
    const uint32_t k = (uint32_t)(start + j);
    a += word;
    b += word * (k % 65521u + 1u);
    c += word * (k % 65519u + 1u);
  }
}

// halfsum3 of n uint16 words that start at word `start` of the payload, added into sums[3] (exact integer
// sums, so the order of addition does not matter): sum w, sum w * ((start + j) % 65521 + 1) and
// sum w * ((start + j) % 65519 + 1); gdscache/format/checksum.py defines it. Row blockIdx.y of a batch of
// payloads `row_stride` words apart adds into sums[3 * row .. 3 * row + 2].
__global__ void halfsum3_kernel(const uint16_t* __restrict__ words, int64_t n, int64_t row_stride, int64_t start,
                                unsigned long long* __restrict__ sums) {
  words += blockIdx.y * row_stride;
  sums += 3 * blockIdx.y;
  unsigned long long a = 0, b = 0, c = 0;
  add_words(words, blockIdx.x * (int64_t)blockDim.x + threadIdx.x, n, (int64_t)gridDim.x * blockDim.x, start, a, b, c);
  add_block_sums(a, b, c, sums);
}

// halfsum3_kernel where every row starts 16-byte aligned: eight words per load, their weights stepped from one
// modulo each (most of the plain kernel's time went to 2-byte loads and two modulos per word).
__global__ void halfsum3_vec_kernel(const uint16_t* __restrict__ words, int64_t n, int64_t row_stride, int64_t start,
                                    unsigned long long* __restrict__ sums) {
  words += blockIdx.y * row_stride;
  sums += 3 * blockIdx.y;
  unsigned long long a = 0, b = 0, c = 0;
  const int64_t vectors = n / 8, first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t threads = (int64_t)gridDim.x * blockDim.x;
  const uint4* vec = reinterpret_cast<const uint4*>(words);
  for (int64_t q = first; q < vectors; q += threads) {
    const uint4 v = vec[q];
    const uint32_t halves[4] = {v.x, v.y, v.z, v.w};
    const uint32_t k = (uint32_t)(start + 8 * q);
    uint32_t w1 = k % 65521u + 1u, w2 = k % 65519u + 1u;  // the weights of word 8q, then stepped word by word
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t word = (halves[i / 2] >> (16 * (i % 2))) & 0xFFFFu;  // little-endian: the low half first
      a += word;
      b += word * w1;  // < 65536 * 65521 < 2^32
      c += word * w2;
      w1 = w1 == 65521u ? 1u : w1 + 1u;
      w2 = w2 == 65519u ? 1u : w2 + 1u;
    }
  }
  add_words(words, 8 * vectors + first, n, threads, start, a, b, c);  // the last n % 8 words
  add_block_sums(a, b, c, sums);
}

// Whether `bytes` of tables fit the device's shared memory per block (then set as the kernel's limit).
template <typename Kernel>
bool can_stage(Kernel kernel, size_t bytes) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      bytes + 4096 > (size_t)optin) {
    return false;
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

int blocks_for(int64_t n, int threads) { return (int)((n + threads - 1) / threads); }

int sm_count() {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Threads per block for one-thread-per-stream kernels: blocks hold staged tables (one or two per SM), so a
// few streams spread over every SM, and many streams (batches of chunks) fill each SM with more warps.
int stream_threads(int64_t streams) {
  const int sms = sm_count();
  const int64_t per_sm = (streams + sms - 1) / sms;
  const int64_t threads = (per_sm + 63) / 64 * 64;
  return (int)(threads < 64 ? 64 : (threads > kStreamThreads ? kStreamThreads : threads));
}

template <int G>
int launch_encode(const int16_t* sym, int R, int T, int C, const int32_t* tab, const TableSet& ts, const int8_t* mu,
                  int offset, uint16_t* scratch, int32_t* lengths, cudaStream_t stream) {
  const int64_t streams = (int64_t)R * (C / G);
  const int threads = stream_threads(streams), blocks = blocks_for(streams, threads);
  const size_t bytes = (size_t)ts.lut_off * 2;
  if (can_stage(rans_encode_kernel<G, true>, bytes)) {
    rans_encode_kernel<G, true><<<blocks, threads, bytes, stream>>>(sym, R, T, C, tab, ts, mu, offset, scratch,
                                                                    lengths);
  } else {
    rans_encode_kernel<G, false><<<blocks, threads, 0, stream>>>(sym, R, T, C, tab, ts, mu, offset, scratch,
                                                                 lengths);
  }
  return (int)cudaGetLastError();
}

template <int G>
int launch_decode(const uint16_t* words, int64_t nwords, const int64_t* offsets, const int64_t* lengths, int R, int T,
                  int C, const int32_t* tab, const TableSet& ts, int16_t* out, int32_t* err, cudaStream_t stream) {
  const int64_t streams = (int64_t)R * (C / G);
  const int threads = stream_threads(streams), blocks = blocks_for(streams, threads);
  const size_t bytes = (size_t)ts.end * 2;
  if (can_stage(rans_decode_kernel<G, true>, bytes)) {
    rans_decode_kernel<G, true><<<blocks, threads, bytes, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, ts,
                                                                    out, err);
  } else {
    rans_decode_kernel<G, false><<<blocks, threads, 0, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, ts,
                                                                 out, err);
  }
  return (int)cudaGetLastError();
}

template <int G>
int launch_cachegen_decode(const uint16_t* words, const int64_t* word_end, const int64_t* offsets,
                           const int32_t* lengths, int N, int L, int P, int T, int H, int D, const uint8_t* tab,
                           const int8_t* mu, const int16_t* base, const uint8_t* rel, const TableSet& ts, int qmax,
                           int offset, const float* sw, int64_t s0, int64_t s1, const int64_t* tok, int64_t s3,
                           int64_t s4, int dtype, void* out, int32_t* err, cudaStream_t stream) {
  const int64_t streams = (int64_t)N * L * P * (H * D / G);
  const int threads = stream_threads(streams), blocks = blocks_for(streams, threads);
  const size_t bytes = (size_t)ts.end * 2;
  if (can_stage(cachegen_decode_kernel<G, true>, bytes)) {
    cachegen_decode_kernel<G, true><<<blocks, threads, bytes, stream>>>(
        words, word_end, offsets, lengths, N, L, P, T, H, D, tab, mu, base, rel, ts, qmax, offset, sw, s0, s1, tok,
        s3, s4, dtype, out, err);
  } else {
    cachegen_decode_kernel<G, false><<<blocks, threads, 0, stream>>>(
        words, word_end, offsets, lengths, N, L, P, T, H, D, tab, mu, base, rel, ts, qmax, offset, sw, s0, s1, tok,
        s3, s4, dtype, out, err);
  }
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {
// The SHA-256 of this file as CMake read it (CMakeLists.txt), or "" when built some other way.
#ifndef GDSCACHE_SOURCE_SHA256
#define GDSCACHE_SOURCE_SHA256 ""
#endif
const char* gdscache_source_sha256() { return GDSCACHE_SOURCE_SHA256; }

int gdc_rans_encode(const int16_t* sym, int R, int T, int C, int G, const int32_t* tab, const uint16_t* tables,
                    int lut_off, int end, int count, int A, const int8_t* mu, int offset, uint16_t* scratch,
                    int32_t* lengths, cudaStream_t stream) {
  const TableSet ts{tables, lut_off, end, count, A};
  switch (G) {
    case 1: return launch_encode<1>(sym, R, T, C, tab, ts, mu, offset, scratch, lengths, stream);
    case 2: return launch_encode<2>(sym, R, T, C, tab, ts, mu, offset, scratch, lengths, stream);
    case 4: return launch_encode<4>(sym, R, T, C, tab, ts, mu, offset, scratch, lengths, stream);
    case 8: return launch_encode<8>(sym, R, T, C, tab, ts, mu, offset, scratch, lengths, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

int gdc_rans_compact(const uint16_t* scratch, const int32_t* lengths, const int64_t* ends, int S, int64_t stride,
                     int rows, uint16_t* out, cudaStream_t stream) {
  rans_compact_kernel<<<S, 64, 0, stream>>>(scratch, lengths, ends, stride, rows, out);
  return (int)cudaGetLastError();
}

int gdc_rans_decode(const uint16_t* words, int64_t nwords, const int64_t* offsets, const int64_t* lengths, int R,
                    int T, int C, int G, const int32_t* tab, const uint16_t* tables, int lut_off, int end, int count,
                    int A, int16_t* out, int32_t* err, cudaStream_t stream) {
  const TableSet ts{tables, lut_off, end, count, A};
  switch (G) {
    case 1: return launch_decode<1>(words, nwords, offsets, lengths, R, T, C, tab, ts, out, err, stream);
    case 2: return launch_decode<2>(words, nwords, offsets, lengths, R, T, C, tab, ts, out, err, stream);
    case 4: return launch_decode<4>(words, nwords, offsets, lengths, R, T, C, tab, ts, out, err, stream);
    case 8: return launch_decode<8>(words, nwords, offsets, lengths, R, T, C, tab, ts, out, err, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

int gdc_halfsum3(const uint16_t* words, int64_t rows, int64_t n, int64_t row_stride, int64_t start,
                 unsigned long long* sums, cudaStream_t stream) {
  if (n <= 0 || rows <= 0) return 0;
  if (rows > 65535) return (int)cudaErrorInvalidValue;
  const int64_t sms = sm_count();
  const bool aligned = reinterpret_cast<uintptr_t>(words) % 16 == 0 && (rows == 1 || row_stride % 8 == 0);
  const int64_t per_thread = aligned ? 8 : 1;  // words
  const int64_t want = (n + 256 * per_thread - 1) / (256 * per_thread), cap = (4 * sms + rows - 1) / rows;
  const dim3 grid((unsigned)(want < cap ? want : cap), (unsigned)rows);  // about 4 blocks per SM in all
  if (aligned) {
    halfsum3_vec_kernel<<<grid, 256, 0, stream>>>(words, n, row_stride, start, sums);
  } else {
    halfsum3_kernel<<<grid, 256, 0, stream>>>(words, n, row_stride, start, sums);
  }
  return (int)cudaGetLastError();
}

int gdc_cachegen_codes(const void* x, int L, int P, int T, int H, int D, int64_t s0, int64_t s1, const int64_t* tok,
                       int64_t s3, int64_t s4, int dtype, int32_t* code, int32_t* flag, cudaStream_t stream) {
  const int threads = 32 * (H < 8 ? H : 8);
  cachegen_codes_kernel<<<L * P * T, threads, 0, stream>>>(x, P, T, H, D, s0, s1, tok, s3, s4, dtype, code, flag);
  return (int)cudaGetLastError();
}

int gdc_cachegen_base_rel(const int32_t* code, int LP, int T, int H, int16_t* base, uint8_t* rel,
                          cudaStream_t stream) {
  cachegen_base_rel_kernel<<<blocks_for((int64_t)LP * H * 32, 256), 256, 0, stream>>>(code, LP, T, H, base, rel);
  return (int)cudaGetLastError();
}

int gdc_cachegen_quantize(const void* x, int L, int P, int T, int H, int D, int64_t s0, int64_t s1,
                          const int64_t* tok, int64_t s3, int64_t s4, int dtype, const int16_t* base,
                          const uint8_t* rel, const float* sw, int qmax, int16_t* q, cudaStream_t stream) {
  cachegen_scale_kernel<true><<<L * P * T, 256, 0, stream>>>(const_cast<void*>(x), P, T, H, D, s0, s1, tok, s3, s4,
                                                             dtype, base, rel, sw, qmax, q);
  return (int)cudaGetLastError();
}

int gdc_cachegen_dequantize(const int16_t* q, const int16_t* base, const uint8_t* rel, const float* sw, int L, int P,
                            int T, int H, int D, int64_t s0, int64_t s1, const int64_t* tok, int64_t s3, int64_t s4,
                            int dtype, void* out, cudaStream_t stream) {
  cachegen_scale_kernel<false><<<L * P * T, 256, 0, stream>>>(out, P, T, H, D, s0, s1, tok, s3, s4, dtype, base, rel,
                                                              sw, 0, const_cast<int16_t*>(q));
  return (int)cudaGetLastError();
}

int gdc_cachegen_stats(const int16_t* q, int R, int T, int C, const uint16_t* cost, int NT, int A, int qmax,
                       int offset, int8_t* mu, uint8_t* tab, cudaStream_t stream) {
  if (NT != kStatTables || A > 512 || T >= (1 << 23)) return (int)cudaErrorInvalidValue;
  const size_t hist = (size_t)kStatChannels * A * 4;
  const size_t costs = (size_t)(kStatTables * A + 7) / 8 * 8 * 2;
  const bool staged = can_stage(cachegen_stats_kernel, costs + hist);
  if (!staged && hist > 48 * 1024) return (int)cudaErrorInvalidValue;
  const int sms = sm_count();
  const int tiles = R * ((C + kStatChannels - 1) / kStatChannels);
  const int grid = tiles < 2 * sms ? tiles : 2 * sms;
  cachegen_stats_kernel<<<grid, kStatThreads, staged ? costs + hist : hist, stream>>>(q, R, T, C, cost, A, staged, qmax,
                                                                                      offset, mu, tab);
  return (int)cudaGetLastError();
}

int gdc_cachegen_decode(const uint16_t* words, const int64_t* word_end, const int64_t* offsets, const int32_t* lengths,
                        int N, int L, int P, int T, int H, int D, int G, const uint8_t* tab, const int8_t* mu,
                        const int16_t* base, const uint8_t* rel, const uint16_t* tables, int lut_off, int end,
                        int count, int A, int qmax, int offset, const float* sw, int64_t s0, int64_t s1,
                        const int64_t* tok, int64_t s3, int64_t s4, int dtype, void* out, int32_t* err,
                        cudaStream_t stream) {
  const TableSet ts{tables, lut_off, end, count, A};
#define GDC_DECODE(GG)                                                                                             \
  return launch_cachegen_decode<GG>(words, word_end, offsets, lengths, N, L, P, T, H, D, tab, mu, base, rel, ts,  \
                                    qmax, offset, sw, s0, s1, tok, s3, s4, dtype, out, err, stream)
  switch (G) {
    case 1: GDC_DECODE(1);
    case 2: GDC_DECODE(2);
    case 4: GDC_DECODE(4);
    case 8: GDC_DECODE(8);
    default: return (int)cudaErrorInvalidValue;
  }
#undef GDC_DECODE
}

int gdc_copy_rows(int n, const uint64_t* dsts, const uint64_t* srcs, int64_t rows, int64_t width, int64_t dst_pitch,
                  int64_t src_pitch, cudaStream_t stream) {
  // n copies of `rows` rows of `width` bytes, each from srcs[i] (rows src_pitch apart) to dsts[i] (dst_pitch apart):
  // copy engines move a strided chunk without a staging buffer or a kernel, pinned host memory asynchronously
  for (int i = 0; i < n; ++i) {
    const cudaError_t err = cudaMemcpy2DAsync(reinterpret_cast<void*>(dsts[i]), (size_t)dst_pitch,
                                              reinterpret_cast<const void*>(srcs[i]), (size_t)src_pitch,
                                              (size_t)width, (size_t)rows, cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return (int)err;
  }
  return 0;
}

}  // extern "C"
