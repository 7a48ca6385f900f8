// Paged decode attention on CPU, reading each row's pages where they lie in the pool.
//
// One query per row over its first reads[s] positions, found through its page table (the layout
// of `paged_attention.py`): q [S, N, H], k and v pages [K, NP, PS, H], table [S, W] int32,
// reads [S] int32 (0: idle, output 0) -> out [S, N, H]. Scores are scaled by 1/sqrt(H); the
// softmax runs online, one page at a time (its positions' scores, one rescale per page), in
// float32 whatever the storage type (float32 or bfloat16). A page id out of [0, NP) is clamped,
// so a bad table reads a wrong page, never outside the pool.
//
// Built on first use by `cpu_paged_attention.py` and called through `jax.ffi`.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The running max before any score: finite (the kernel is built with fast math, which assumes no
// infinities), and exp(kLow - score) is 0 for any score a float can hold.
constexpr float kLow = -0.7f * 3.40282347e38f;

inline float Load(float x) { return x; }
inline float Load(uint16_t x) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void Store(float x, float* out) { *out = x; }
inline void Store(float x, uint16_t* out) {  // round to nearest even, as JAX's astype
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *out = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// HD: the head dim as a compile-time constant (its loops then unroll and vectorize), or 0 for
// any head dim (dim).
template <int64_t HD, typename T>
ffi::Error Attend(const T* q, const T* kp, const T* vp, const int32_t* table,
                  const int32_t* reads, T* out, int64_t rows, int64_t heads, int64_t kv_heads,
                  int64_t dim, int64_t pages, int64_t page_size, int64_t width) {
  if (kv_heads <= 0 || heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("query heads must be a multiple of kv heads");
  }
  const int64_t head_dim = HD > 0 ? HD : dim;
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  std::vector<float> qf(group * head_dim), acc(group * head_dim), kf(page_size * head_dim),
      vf(page_size * head_dim), score(group * page_size), m(group), l(group);
  for (int64_t s = 0; s < rows; ++s) {
    const int64_t n_pos = std::clamp<int64_t>(reads[s], 0, width * page_size);
    for (int64_t k = 0; k < kv_heads; ++k) {
      for (int64_t g = 0; g < group; ++g) {
        const T* src = q + (s * heads + k * group + g) * head_dim;
        for (int64_t h = 0; h < head_dim; ++h) qf[g * head_dim + h] = Load(src[h]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kLow);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t start = 0; start < n_pos; start += page_size) {
        const int64_t page = std::clamp<int64_t>(table[s * width + start / page_size], 0,
                                                 pages - 1);
        const int64_t count = std::min(page_size, n_pos - start);
        const int64_t base = (k * pages + page) * page_size * head_dim;
        for (int64_t i = 0; i < count * head_dim; ++i) {
          kf[i] = Load(kp[base + i]);
          vf[i] = Load(vp[base + i]);
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = &qf[g * head_dim];
          float* sg = &score[g * page_size];
          float page_max = kLow;
          for (int64_t p = 0; p < count; ++p) {
            const float* kr = &kf[p * head_dim];
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t h = 0; h < head_dim; ++h) dot += qg[h] * kr[h];
            sg[p] = dot;
            page_max = std::max(page_max, dot);
          }
          const float new_m = std::max(m[g], page_max);
          const float rescale = std::exp(m[g] - new_m);  // 0 on the first page
          float* __restrict ag = &acc[g * head_dim];
          for (int64_t h = 0; h < head_dim; ++h) ag[h] *= rescale;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t p = 0; p < count; ++p) {
            sg[p] = std::exp(sg[p] - new_m);
            sum += sg[p];
          }
          for (int64_t p = 0; p < count; ++p) {
            const float w = sg[p];
            const float* __restrict vr = &vf[p * head_dim];
#pragma omp simd
            for (int64_t h = 0; h < head_dim; ++h) ag[h] += w * vr[h];
          }
          l[g] = l[g] * rescale + sum;
          m[g] = new_m;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out + (s * heads + k * group + g) * head_dim;
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t h = 0; h < head_dim; ++h) Store(acc[g * head_dim + h] * inv, dst + h);
      }
    }
  }
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error Impl(ffi::Buffer<D> q, ffi::Buffer<D> kp, ffi::Buffer<D> vp,
                ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> reads,
                ffi::ResultBuffer<D> out) {
  auto qd = q.dimensions(), kd = kp.dimensions(), vd = vp.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      reads.dimensions().size() != 1 || reads.dimensions()[0] != qd[0] || td[0] != qd[0] ||
      kd[3] != qd[2]) {
    return ffi::Error::InvalidArgument(
        "paged attention: q [S, N, H], pages [K, NP, PS, H], table [S, W], reads [S]");
  }
  auto run = [&](auto attend) {
    return attend(q.typed_data(), kp.typed_data(), vp.typed_data(), table.typed_data(),
                  reads.typed_data(), out->typed_data(), qd[0], qd[1], kd[0], qd[2], kd[1], kd[2],
                  td[1]);
  };
  using T = ffi::NativeType<D>;
  switch (qd[2]) {  // the head dims of Qwen2.5 (128), its tests' and benchmarks' models
    case 16: return run(Attend<16, T>);
    case 32: return run(Attend<32, T>);
    case 64: return run(Attend<64, T>);
    case 128: return run(Attend<128, T>);
    default: return run(Attend<0, T>);
  }
}

}  // namespace

#define EXPLORE_JAX_BIND(D)                                                              \
  ffi::Ffi::Bind()                                                                       \
      .Arg<ffi::Buffer<D>>()                                                             \
      .Arg<ffi::Buffer<D>>()                                                             \
      .Arg<ffi::Buffer<D>>()                                                             \
      .Arg<ffi::Buffer<ffi::S32>>()                                                      \
      .Arg<ffi::Buffer<ffi::S32>>()                                                      \
      .Ret<ffi::Buffer<D>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32, Impl<ffi::F32>, EXPLORE_JAX_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionBF16, Impl<ffi::BF16>, EXPLORE_JAX_BIND(ffi::BF16));
