// gdscache codec kernels, C ABI (loaded with ctypes by gdscache/codecs/_cuda.py).
//
// Every kernel has a torch/numpy reference (gdscache/codecs/rans.py, cachegen.py) and must produce
// the same bits: integer arithmetic, explicitly rounded fp32 (__fmul_rn, __fdiv_rn, rintf) and no
// fused multiply-adds. Functions return a cudaError_t (0 = success).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr uint32_t kProbBits = 16;
constexpr uint32_t kRansL = 1u << 16;
constexpr int kThreads = 128;
constexpr int kBuckets = 256;  // symbol lookup: lut[slot >> 8] = last symbol starting at or before the bucket
constexpr int kCodeMax = 8 * 127 - 1;
constexpr int kCodeMin = -8 * 126;

__constant__ uint32_t kMantissaUp[8] = {0, 759234, 1587185, 2490071, 3474676, 4548395, 5719293, 6996167};

// The symbol whose [cum[s], cum[s + 1]) holds slot: start at the bucket's symbol, step over the rest.
__device__ __forceinline__ int find_symbol(const uint32_t* cu, const uint16_t* lt, uint32_t slot, int A) {
  int s = __ldg(lt + (slot >> 8));
  while (s < A - 1 && __ldg(cu + s + 1) <= slot) ++s;
  return s;
}

// One rANS decode step: the symbol under x's slot, then x renormalised from words[pos < end]
// (bad is set when the stream runs out).
__device__ __forceinline__ int rans_decode_symbol(uint32_t& x, const uint32_t* ct, const uint16_t* lt, int A,
                                                  const uint16_t* __restrict__ words, int64_t& pos, int64_t end,
                                                  bool& bad) {
  const uint32_t slot = x & ((1u << kProbBits) - 1);
  const int sym = find_symbol(ct, lt, slot, A);
  const uint32_t c = __ldg(ct + sym);
  const uint32_t f = __ldg(ct + sym + 1) - c;
  x = f * (x >> kProbBits) + slot - c;
  if (x < kRansL) {
    if (pos < end) {
      x = (x << 16) | words[pos++];
    } else {
      bad = true;
    }
  }
  return sym;
}

// One thread per stream (row r, channel group cg); symbols coded in reverse, words written to
// scratch[(n + 2), S] from the end so the decoder reads them forward.
// Symbols are sym - mu[r, c] + offset (mu may be null: 0), so cachegen codes its quantized values in place.
template <int G>
__global__ void rans_encode_kernel(const int16_t* __restrict__ sym, int R, int T, int C,
                                   const int32_t* __restrict__ tab, const uint32_t* __restrict__ freq,
                                   const uint32_t* __restrict__ cum, int A, const int8_t* __restrict__ mu,
                                   int offset, uint16_t* __restrict__ scratch, int32_t* __restrict__ lengths) {
  const int groups = C / G;
  const int S = R * groups;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int r = s / groups, cg = s % groups;
  const int16_t* base = sym + (size_t)r * T * C + (size_t)cg * G;
  const uint32_t* ft[G];
  const uint32_t* ct[G];
  int shift[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const size_t ch = (size_t)r * C + cg * G + g;
    const int t = tab[ch];
    shift[g] = offset - (mu ? (int)mu[ch] : 0);
    ft[g] = freq + (size_t)t * A;
    ct[g] = cum + (size_t)t * (A + 1);
  }
  uint32_t x = kRansL;
  int pos = T * G + 1;
  for (int t = T - 1; t >= 0; --t) {
#pragma unroll
    for (int g = G - 1; g >= 0; --g) {
      const int v = base[(size_t)t * C + g] + shift[g];
      const uint32_t f = __ldg(ft[g] + v);
      const uint32_t c = __ldg(ct[g] + v);
      if (x >= (f << (32 - kProbBits))) {
        scratch[(size_t)pos * S + s] = (uint16_t)(x & 0xFFFF);
        --pos;
        x >>= 16;
      }
      x = ((x / f) << kProbBits) + (x % f) + c;
    }
  }
  scratch[(size_t)pos * S + s] = (uint16_t)(x >> 16);
  scratch[(size_t)(pos - 1) * S + s] = (uint16_t)(x & 0xFFFF);
  lengths[s] = T * G + 2 - (pos - 1);
}

// One block per stream: copy its words (the tail of its scratch column) to its packed offset.
__global__ void rans_compact_kernel(const uint16_t* __restrict__ scratch, const int32_t* __restrict__ lengths,
                                    const int64_t* __restrict__ ends, int S, int rows, uint16_t* __restrict__ out) {
  const int s = blockIdx.x;
  const int len = lengths[s];
  const int64_t start = ends[s] - len;
  const int first = rows - len;
  for (int k = threadIdx.x; k < len; k += blockDim.x) out[start + k] = scratch[(size_t)(first + k) * S + s];
}

template <int G>
__global__ void rans_decode_kernel(const uint16_t* __restrict__ words, int64_t nwords,
                                   const int64_t* __restrict__ offsets, const int64_t* __restrict__ lengths, int R,
                                   int T, int C, const int32_t* __restrict__ tab, const uint32_t* __restrict__ cum,
                                   const uint16_t* __restrict__ lut, int A, int16_t* __restrict__ out,
                                   int32_t* __restrict__ err) {
  const int groups = C / G;
  const int S = R * groups;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int r = s / groups, cg = s % groups;
  int64_t p = offsets[s];
  const int64_t end = p + lengths[s];
  if (lengths[s] < 2 || p < 0 || end > nwords) {
    atomicOr(err, 1);
    return;
  }
  const uint32_t* ct[G];
  const uint16_t* lt[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int t = tab[(size_t)r * C + cg * G + g];
    ct[g] = cum + (size_t)t * (A + 1);
    lt[g] = lut + (size_t)t * kBuckets;
  }
  int16_t* dst = out + (size_t)r * T * C + (size_t)cg * G;
  uint32_t x = (uint32_t)words[p] | ((uint32_t)words[p + 1] << 16);
  p += 2;
  bool bad = false;
  for (int t = 0; t < T; ++t) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      dst[(size_t)t * C + g] = (int16_t)rans_decode_symbol(x, ct[g], lt[g], A, words, p, end, bad);
    }
  }
  if (bad || x != kRansL || p != end) atomicOr(err, 1);
}

__device__ __forceinline__ float code_scale(int32_t code) {
  const int32_t bits = (((code >> 3) + 127) << 23) | (int32_t)kMantissaUp[code & 7];
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

// q[l, p, t, c] = clamp(rint(x / (scale(code[l, p, t, h]) * sw[l, p, c]))), x read through its strides.
__global__ void cachegen_quantize_kernel(const void* __restrict__ x, int L, int P, int T, int C, int D, int64_t s0,
                                         int64_t s1, int64_t s2, int64_t s3, int64_t s4, int dtype,
                                         const int32_t* __restrict__ code, const float* __restrict__ sw, int qmax,
                                         int16_t* __restrict__ q) {
  const int64_t total = (int64_t)L * P * T * C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(i % C);
    const int64_t lpt = i / C;
    const int t = (int)(lpt % T);
    const int64_t lp = lpt / T;
    const int l = (int)(lp / P), p = (int)(lp % P);
    const int h = c / D, d = c % D;
    const float v = load_as_float(x, l * s0 + p * s1 + t * s2 + h * s3 + d * s4, dtype);
    const float denom = __fmul_rn(code_scale(code[lpt * (C / D) + h]), sw[lp * C + c]);
    float r = rintf(__fdiv_rn(v, denom));
    r = fminf(fmaxf(r, (float)-qmax), (float)qmax);
    q[i] = (int16_t)r;
  }
}

__global__ void cachegen_dequantize_kernel(const int16_t* __restrict__ q, const int32_t* __restrict__ code,
                                           const float* __restrict__ sw, int L, int P, int T, int C, int D,
                                           int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t s4, int dtype,
                                           void* __restrict__ out) {
  const int64_t total = (int64_t)L * P * T * C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(i % C);
    const int64_t lpt = i / C;
    const int t = (int)(lpt % T);
    const int64_t lp = lpt / T;
    const int l = (int)(lp / P), p = (int)(lp % P);
    const int h = c / D, d = c % D;
    const float denom = __fmul_rn(code_scale(code[lpt * (C / D) + h]), sw[lp * C + c]);
    store_from_float(out, l * s0 + p * s1 + t * s2 + h * s3 + d * s4, dtype, __fmul_rn((float)q[i], denom));
  }
}

// Per (l, p, t, h) row, one warp: code = 8 * (exponent - 127) + k with 2**(k/8) rounded up covering the
// row's absmax (kCodeMax for zero/denormal rows); flag |= 1 on a non-finite value.
__global__ void cachegen_codes_kernel(const void* __restrict__ x, int L, int P, int T, int H, int D, int64_t s0,
                                      int64_t s1, int64_t s2, int64_t s3, int64_t s4, int dtype,
                                      int32_t* __restrict__ code, int32_t* __restrict__ flag) {
  const int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (int64_t)L * P * T * H) return;
  const int h = (int)(row % H);
  const int64_t lpt = row / H;
  const int t = (int)(lpt % T);
  const int64_t lp = lpt / T;
  const int l = (int)(lp / P), p = (int)(lp % P);
  const int64_t base = l * s0 + p * s1 + t * s2 + h * s3;
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
    code[row] = e > 0 ? 8 * (e - 127) + k : kCodeMax;
    if (!all_finite) atomicOr(flag, 1);
  }
}

// Per (row r, channel c), one block of NT = 64 threads: mu = floor((sum_t q + T/2) / T) clamped, then
// the table k minimising sum_t cost[k][q - mu + offset] (ties: lowest k), like the torch reference.
__global__ void cachegen_stats_kernel(const int16_t* __restrict__ q, int T, int C, const int32_t* __restrict__ cost,
                                      int A, int qmax, int offset, int8_t* __restrict__ mu_out,
                                      uint8_t* __restrict__ tab_out) {
  __shared__ int hist[512];
  __shared__ int bins[512];
  __shared__ long long part[64];
  __shared__ int nbins, mu_s;
  const int ch = blockIdx.x, tid = threadIdx.x;
  const int r = ch / C, c = ch % C;
  const int16_t* col = q + (size_t)r * T * C + c;
  long long sum = 0;
  for (int t = tid; t < T; t += 64) sum += col[(size_t)t * C];
  part[tid] = sum;
  for (int b = tid; b < A; b += 64) hist[b] = 0;
  if (tid == 0) nbins = 0;
  __syncthreads();
  if (tid == 0) {
    long long total = 0;
    for (int i = 0; i < 64; ++i) total += part[i];
    const long long a = total + T / 2;
    long long m = a >= 0 ? a / T : -((-a + T - 1) / T);
    m = m < -qmax ? -qmax : (m > qmax ? qmax : m);
    mu_s = (int)m;
  }
  __syncthreads();
  for (int t = tid; t < T; t += 64) atomicAdd(&hist[col[(size_t)t * C] - mu_s + offset], 1);
  __syncthreads();
  for (int b = tid; b < A; b += 64)
    if (hist[b]) bins[atomicAdd(&nbins, 1)] = b;
  __syncthreads();
  long long acc = 0;
  const int32_t* row = cost + (size_t)tid * A;
  for (int i = 0; i < nbins; ++i) acc += (long long)hist[bins[i]] * __ldg(row + bins[i]);
  part[tid] = acc;
  __syncthreads();
  if (tid == 0) {
    int best = 0;
    for (int k = 1; k < 64; ++k)
      if (part[k] < part[best]) best = k;
    mu_out[ch] = (int8_t)mu_s;
    tab_out[ch] = (uint8_t)best;
  }
}

// Fused cachegen decode: rANS-decode one stream, add back mu, dequantize with the token's scale and the
// channel's step, and store into the strided output. Any inconsistency sets *err.
template <int G>
__global__ void cachegen_decode_kernel(const uint16_t* __restrict__ words, int64_t nwords,
                                       const int64_t* __restrict__ offsets, const int32_t* __restrict__ lengths,
                                       int L, int P, int T, int H, int D, const uint8_t* __restrict__ tab,
                                       const int8_t* __restrict__ mu, const int16_t* __restrict__ base,
                                       const uint8_t* __restrict__ rel, const uint32_t* __restrict__ cum,
                                       const uint16_t* __restrict__ lut, int A, int NT, int qmax, int offset,
                                       const float* __restrict__ sw, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                                       int64_t s4, int dtype, void* __restrict__ out, int32_t* __restrict__ err) {
  const int C = H * D;
  const int groups = C / G;
  const int S = L * P * groups;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int r = s / groups, cg = s % groups;
  const int l = r / P, p = r % P;
  const int len = lengths[s];
  int64_t pos = offsets[s];
  const int64_t end = pos + len;
  if (pos < 0 || len < 2 || len > T * G + 2 || end > nwords || (s == S - 1 && end != nwords)) {
    atomicOr(err, 1);
    return;
  }
  const uint32_t* ct[G];
  const uint16_t* lt[G];
  int shift[G];
  float step[G];
  int64_t obase[G];
  const int16_t* bse[G];
  const uint8_t* rl[G];
  bool bad = false;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int c = cg * G + g;
    const size_t ch = (size_t)r * C + c;
    int t = tab[ch];
    const int m = mu[ch];
    if (t >= NT || m < -qmax || m > qmax) { bad = true; t = 0; }
    ct[g] = cum + (size_t)t * (A + 1);
    lt[g] = lut + (size_t)t * kBuckets;
    shift[g] = m - offset;
    step[g] = sw[ch];
    const int h = c / D, d = c % D;
    obase[g] = l * s0 + p * s1 + h * s3 + d * s4;
    bse[g] = base + ((size_t)r * H + h);
    rl[g] = rel + (size_t)r * T * H + h;
    const int b = *bse[g];
    if (b < kCodeMin || b > kCodeMax - 255) bad = true;
  }
  if (bad) {
    atomicOr(err, 1);
    return;
  }
  uint32_t x = (uint32_t)words[pos] | ((uint32_t)words[pos + 1] << 16);
  pos += 2;
  for (int t = 0; t < T; ++t) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      int qv = rans_decode_symbol(x, ct[g], lt[g], A, words, pos, end, bad) + shift[g];
      if (qv < -qmax || qv > qmax) {
        bad = true;
        qv = 0;
      }
      const int32_t code = (int32_t)*bse[g] + (int32_t)rl[g][(size_t)t * H];
      const float denom = __fmul_rn(code_scale(code), step[g]);
      store_from_float(out, obase[g] + t * s2, dtype, __fmul_rn((float)qv, denom));
    }
  }
  if (bad || x != kRansL || pos != end) atomicOr(err, 1);
}

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return (int)(b < 65535 * 16 ? b : 65535 * 16);
}

}  // namespace

extern "C" {

int gdc_rans_encode(const int16_t* sym, int R, int T, int C, int G, const int32_t* tab, const uint32_t* freq,
                    const uint32_t* cum, int A, const int8_t* mu, int offset, uint16_t* scratch, int32_t* lengths,
                    cudaStream_t stream) {
  const int S = R * (C / G);
  const int blocks = (S + kThreads - 1) / kThreads;
  switch (G) {
    case 1: rans_encode_kernel<1><<<blocks, kThreads, 0, stream>>>(sym, R, T, C, tab, freq, cum, A, mu, offset, scratch, lengths); break;
    case 2: rans_encode_kernel<2><<<blocks, kThreads, 0, stream>>>(sym, R, T, C, tab, freq, cum, A, mu, offset, scratch, lengths); break;
    case 4: rans_encode_kernel<4><<<blocks, kThreads, 0, stream>>>(sym, R, T, C, tab, freq, cum, A, mu, offset, scratch, lengths); break;
    case 8: rans_encode_kernel<8><<<blocks, kThreads, 0, stream>>>(sym, R, T, C, tab, freq, cum, A, mu, offset, scratch, lengths); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int gdc_rans_compact(const uint16_t* scratch, const int32_t* lengths, const int64_t* ends, int S, int rows,
                     uint16_t* out, cudaStream_t stream) {
  rans_compact_kernel<<<S, 64, 0, stream>>>(scratch, lengths, ends, S, rows, out);
  return (int)cudaGetLastError();
}

int gdc_rans_decode(const uint16_t* words, int64_t nwords, const int64_t* offsets, const int64_t* lengths, int R,
                    int T, int C, int G, const int32_t* tab, const uint32_t* cum, const uint16_t* lut, int A,
                    int16_t* out, int32_t* err, cudaStream_t stream) {
  const int S = R * (C / G);
  const int blocks = (S + kThreads - 1) / kThreads;
  switch (G) {
    case 1: rans_decode_kernel<1><<<blocks, kThreads, 0, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, cum, lut, A, out, err); break;
    case 2: rans_decode_kernel<2><<<blocks, kThreads, 0, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, cum, lut, A, out, err); break;
    case 4: rans_decode_kernel<4><<<blocks, kThreads, 0, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, cum, lut, A, out, err); break;
    case 8: rans_decode_kernel<8><<<blocks, kThreads, 0, stream>>>(words, nwords, offsets, lengths, R, T, C, tab, cum, lut, A, out, err); break;
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}

int gdc_cachegen_quantize(const void* x, int L, int P, int T, int C, int D, int64_t s0, int64_t s1, int64_t s2,
                          int64_t s3, int64_t s4, int dtype, const int32_t* code, const float* sw, int qmax,
                          int16_t* q, cudaStream_t stream) {
  cachegen_quantize_kernel<<<blocks_for((int64_t)L * P * T * C), kThreads, 0, stream>>>(
      x, L, P, T, C, D, s0, s1, s2, s3, s4, dtype, code, sw, qmax, q);
  return (int)cudaGetLastError();
}

int gdc_cachegen_dequantize(const int16_t* q, const int32_t* code, const float* sw, int L, int P, int T, int C, int D,
                            int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t s4, int dtype, void* out,
                            cudaStream_t stream) {
  cachegen_dequantize_kernel<<<blocks_for((int64_t)L * P * T * C), kThreads, 0, stream>>>(
      q, code, sw, L, P, T, C, D, s0, s1, s2, s3, s4, dtype, out);
  return (int)cudaGetLastError();
}

int gdc_cachegen_codes(const void* x, int L, int P, int T, int H, int D, int64_t s0, int64_t s1, int64_t s2,
                       int64_t s3, int64_t s4, int dtype, int32_t* code, int32_t* flag, cudaStream_t stream) {
  const int64_t threads = (int64_t)L * P * T * H * 32;
  cachegen_codes_kernel<<<(int)((threads + 255) / 256), 256, 0, stream>>>(x, L, P, T, H, D, s0, s1, s2, s3, s4,
                                                                          dtype, code, flag);
  return (int)cudaGetLastError();
}

int gdc_cachegen_stats(const int16_t* q, int R, int T, int C, const int32_t* cost, int NT, int A, int qmax,
                       int offset, int8_t* mu, uint8_t* tab, cudaStream_t stream) {
  if (NT != 64 || A > 512) return (int)cudaErrorInvalidValue;
  cachegen_stats_kernel<<<R * C, 64, 0, stream>>>(q, T, C, cost, A, qmax, offset, mu, tab);
  return (int)cudaGetLastError();
}

int gdc_cachegen_decode(const uint16_t* words, int64_t nwords, const int64_t* offsets, const int32_t* lengths, int L,
                        int P, int T, int H, int D, int G, const uint8_t* tab, const int8_t* mu, const int16_t* base,
                        const uint8_t* rel, const uint32_t* cum, const uint16_t* lut, int A, int NT, int qmax,
                        int offset, const float* sw, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int64_t s4,
                        int dtype, void* out, int32_t* err, cudaStream_t stream) {
  const int S = L * P * (H * D / G);
  const int blocks = (S + kThreads - 1) / kThreads;
#define GDC_DECODE(GG) cachegen_decode_kernel<GG><<<blocks, kThreads, 0, stream>>>(words, nwords, offsets, lengths, \
    L, P, T, H, D, tab, mu, base, rel, cum, lut, A, NT, qmax, offset, sw, s0, s1, s2, s3, s4, dtype, out, err)
  switch (G) {
    case 1: GDC_DECODE(1); break;
    case 2: GDC_DECODE(2); break;
    case 4: GDC_DECODE(4); break;
    case 8: GDC_DECODE(8); break;
    default: return (int)cudaErrorInvalidValue;
  }
#undef GDC_DECODE
  return (int)cudaGetLastError();
}

}  // extern "C"
