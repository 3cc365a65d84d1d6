// The owned forward's fused CPU kernels: what a decode step runs between its matmuls, one pass each instead of
// the dozen small torch ops (and the flash-attention kernel built for long queries) that cost more in dispatch
// than in arithmetic at a step's sizes. Math is in float32, in ATen's SIMD vectors, whatever the tensors hold;
// values are rounded to the tensor's dtype where the torch reference (ops.py) rounds them, so results match it.
//
// Registered as torch.ops.adapter_service.*; built for the CPU at hand by service/model/owned/kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kMaxGroup = 16;  // query heads per kv head the attention kernel takes
constexpr int64_t kNextTaskRows = 32;  // key/value rows of the next (token, kv head) an attention task prefetches

using adapter_service::parallel_for;
using adapter_service::parallel_for_claimed;

// -- scalar and vector loads/stores in float32, rounding through the tensor's dtype ------------------------------

template <typename T>
inline float scalar(T v) { return static_cast<float>(v); }

template <typename T>
inline float rounded(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
inline Vec load_floats(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
template <>
inline Vec load_floats<float>(const float* p) { return Vec::loadu(p); }

template <typename T>
inline void store_floats(T* p, const Vec& v) { at::vec::convert_from_float<T>(v, v).store(p, kLanes); }
template <>
inline void store_floats<float>(float* p, const Vec& v) { v.store(p); }

template <typename T>
inline Vec rounded(const Vec& v) {
  auto [low, high] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
  (void)high;
  return low;
}
template <>
inline Vec rounded<float>(const Vec& v) { return v; }

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// bf16 <-> float32 in one or two instructions where the CPU converts natively; ATen's portable conversions cost a
// bf16 norm or SiLU four to five times its float32 time here. Rounding is to nearest even, as ATen's; the
// instruction flushes float32 denormals (below 1.2e-38) to zero, which no activation or weight of a model holds.
template <>
inline Vec load_floats<at::BFloat16>(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
template <>
inline void store_floats<at::BFloat16>(at::BFloat16* p, const Vec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
template <>
inline Vec rounded<at::BFloat16>(const Vec& v) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// The dtypes a model runs in: float32, bfloat16, float16.
#define DISPATCH_MODEL_DTYPES(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline float sum(const Vec& v) { return at::vec::vec_reduce_all<float>(std::plus<Vec>(), v); }

// Every value of an int64 index tensor (contiguous, on the CPU) in [low, high): a plain loop, since these run
// once per layer and a tensor reduction costs more than the few dozen values it checks.
void check_range(const at::Tensor& index, int64_t low, int64_t high, const char* message) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous(),
              "indices: contiguous int64 on the CPU");
  const int64_t* values = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) TORCH_CHECK(values[i] >= low && values[i] < high, message);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// ---- attention of tokens over their rows' slots ------------------------------------------------------------
//
// Token t belongs to cache slot slots[t] at position positions[t]. Its key/value are written there first (all
// tokens, so a prompt chunk's tokens see each other), then it attends causally over entries [0, position] of its
// slot: prefix entries, earlier chunks, generated tokens. Query heads are grouped over their key/value head (GQA:
// head h reads kv head h / group), so each key and value row is read once for its whole group.

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The lane sums of sixteen vectors as one vector (out[j] = sum of p[j]'s lanes): a transposing tree of 45
// shuffles and adds, where sixteen separate reductions cost about three times that.
inline __m512 lane_sums16(const __m512* p) {
  __m512 pairs[8];  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of p[2i] = a, p[2i+1] = b
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  }
  __m512 quads[4];  // per 128-bit lane: that lane's sums of p[4i], ..., p[4i + 3]
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// bf16 queries x keys with the CPU's bf16 dot product (pairs of bf16 multiplied exactly and summed in float32),
// sixteen keys at a time: scores[g * length + j] = scale * q_g . k_j. A bf16 decode step spent most of its
// attention in per-key float conversions and reductions, the keys themselves coming from cache.
template <int64_t Pairs>  // head size / 32
void bf16_scores(const at::BFloat16* queries, int64_t query_stride, int64_t group, const at::BFloat16* key_rows,
                 const at::BFloat16* value_rows, int64_t length, float scale, float* scores) {
  constexpr int64_t dim = Pairs * 32;
  const __m512 scale_vec = _mm512_set1_ps(scale);
  for (int64_t first = 0; first < length; first += 16) {
    const int64_t count = std::min<int64_t>(16, length - first);
    for (int64_t j = first; j < first + count; ++j) {  // next block's keys and this block's values, from memory
      for (int64_t line = 0; line < dim * 2; line += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(key_rows + (j + 16) * dim) + line);
        __builtin_prefetch(reinterpret_cast<const char*>(value_rows + j * dim) + line);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512bh query[Pairs];
      for (int64_t c = 0; c < Pairs; ++c) {
        query[c] = (__m512bh)_mm512_loadu_si512(queries + g * query_stride + c * 32);
      }
      __m512 products[16];
      for (int64_t j = 0; j < 16; ++j) {
        __m512 sum = _mm512_setzero_ps();
        if (j < count) {
          const at::BFloat16* key = key_rows + (first + j) * dim;
          for (int64_t c = 0; c < Pairs; ++c) {
            sum = _mm512_dpbf16_ps(sum, query[c], (__m512bh)_mm512_loadu_si512(key + c * 32));
          }
        }
        products[j] = sum;
      }
      const __m512 block = _mm512_mul_ps(lane_sums16(products), scale_vec);
      _mm512_mask_storeu_ps(scores + g * length + first, static_cast<__mmask16>((1u << count) - 1), block);
    }
  }
}
#endif

template <typename T>
void slot_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                         at::Tensor& values, const at::Tensor& slots, const at::Tensor& positions, double scale,
                         at::Tensor& out) {
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), slot_tokens = keys.size(2);
  const int64_t group = heads / kv_heads;
  const int64_t q_token = q.stride(0), q_head = q.stride(1);
  const int64_t k_token = k.stride(0), k_head = k.stride(1);
  const int64_t v_token = v.stride(0), v_head = v.stride(1);
  const int64_t o_token = out.stride(0), o_head = out.stride(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k.data_ptr<T>();
  const T* v_ptr = v.data_ptr<T>();
  T* keys_ptr = keys.data_ptr<T>();
  T* values_ptr = values.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  const int64_t* pos_ptr = positions.data_ptr<int64_t>();
  auto entry = [&](int64_t slot, int64_t head, int64_t position) {
    return ((slot * kv_heads + head) * slot_tokens + position) * dim;
  };

  auto write = [&](int64_t i) {  // task i's key and value (token i / kv_heads, head i % kv_heads) into the cache
    const int64_t t = i / kv_heads, head = i % kv_heads;
    const int64_t at_entry = entry(slot_ptr[t], head, pos_ptr[t]);
    std::memcpy(keys_ptr + at_entry, k_ptr + t * k_token + head * k_head, dim * sizeof(T));
    std::memcpy(values_ptr + at_entry, v_ptr + t * v_token + head * v_head, dim * sizeof(T));
  };
  // Tokens in distinct slots (decode rows) read no other token's entries, so each task writes its own just before
  // it attends, in the same parallel region. Tokens sharing a slot (a prompt chunk) see each other's: all are
  // written first, in a region of their own.
  std::vector<char> seen(keys.size(0), 0);
  bool distinct = true;
  for (int64_t t = 0; t < tokens && distinct; ++t) distinct = !std::exchange(seen[slot_ptr[t]], 1);
  if (!distinct) {
    parallel_for(0, tokens * kv_heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) write(i);
    });
  }

  const float softmax_scale = static_cast<float>(scale);
  auto attend = [&](auto chunk_count) {
    constexpr int64_t C = decltype(chunk_count)::value;
    parallel_for_claimed(0, tokens * kv_heads, 4, [&](int64_t begin, int64_t end) {
      // Per task (token, kv head): the group's queries and outputs stay in registers across the key loop.
      Vec query[kMaxGroup][C], row[C];
      std::vector<float> scores;
      float totals[kMaxGroup];
      for (int64_t i = begin; i < end; ++i) {
        if (distinct) write(i);
        const int64_t t = i / kv_heads, head = i % kv_heads;
        const int64_t length = pos_ptr[t] + 1;
        scores.resize(group * length);
        const T* key_rows = keys_ptr + entry(slot_ptr[t], head, 0);
        const T* value_rows = values_ptr + entry(slot_ptr[t], head, 0);
        if (i + 1 < end) {
          // The next task's first keys and values, toward L2 while this one computes: each task's own prefetch
          // runs only a few rows ahead, so its first rows would otherwise each wait on memory.
          const int64_t next_t = (i + 1) / kv_heads, next_head = (i + 1) % kv_heads;
          const char* next_keys = reinterpret_cast<const char*>(keys_ptr + entry(slot_ptr[next_t], next_head, 0));
          const char* next_values =
              reinterpret_cast<const char*>(values_ptr + entry(slot_ptr[next_t], next_head, 0));
          const int64_t bytes = std::min<int64_t>(pos_ptr[next_t] + 1, kNextTaskRows) * dim * sizeof(T);
          for (int64_t line = 0; line < bytes; line += 64) {
            __builtin_prefetch(next_keys + line, 0, 2);
            __builtin_prefetch(next_values + line, 0, 2);
          }
        }
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, at::BFloat16> && C % 2 == 0) {
          bf16_scores<C / 2>(q_ptr + t * q_token + head * group * q_head, q_head, group, key_rows, value_rows,
                             length, softmax_scale, scores.data());
        } else
#endif
        {
        constexpr int64_t kRowBytes = C * kLanes * sizeof(T);
        for (int64_t g = 0; g < group; ++g) {
          const T* src = q_ptr + t * q_token + (head * group + g) * q_head;
          for (int64_t c = 0; c < C; ++c) query[g][c] = load_floats(src + c * kLanes) * Vec(softmax_scale);
        }
        for (int64_t j = 0; j < length; ++j) {
          // A decode step reads every row's cache once, from memory, not cache: prefetch keys a few rows ahead
          // and the values this loop will want next, which the hardware prefetcher alone leaves latency-bound.
          for (int64_t line = 0; line < kRowBytes; line += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(key_rows + (j + 8) * dim) + line);
            __builtin_prefetch(reinterpret_cast<const char*>(value_rows + j * dim) + line);
          }
          for (int64_t c = 0; c < C; ++c) row[c] = load_floats(key_rows + j * dim + c * kLanes);
          for (int64_t g = 0; g < group; ++g) {
            Vec products = query[g][0] * row[0];
            for (int64_t c = 1; c < C; ++c) products = at::vec::fmadd(query[g][c], row[c], products);
            scores[g * length + j] = sum(products);
          }
        }
        }
        const int64_t whole = length - length % kLanes;
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * length;
          // Vector maxima, then one reduction: a scalar max over the scores was a chain of dependent maxss,
          // each waiting on the score just stored, about a sixth of the kernel's time at 50 keys.
          Vec tops(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < whole; j += kLanes) tops = at::vec::maximum(tops, Vec::loadu(sg + j));
          float top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, tops);
          for (int64_t j = whole; j < length; ++j) top = std::max(top, sg[j]);
          const Vec shift(top);
          Vec total(0.f);
          for (int64_t j = 0; j < whole; j += kLanes) {
            const Vec e = (Vec::loadu(sg + j) - shift).exp_u20();
            e.store(sg + j);
            total = total + e;
          }
          float tail = 0.f;
          for (int64_t j = whole; j < length; ++j) {
            sg[j] = std::exp(sg[j] - top);
            tail += sg[j];
          }
          totals[g] = sum(total) + tail;
        }
        // One query head at a time, its sums in registers (all heads' at once spilled them to the stack, a load
        // and a store per multiply-add), two keys a step on separate sums to hide the multiply-add latency. The
        // value rows, read once per head, stay in L1 across the heads.
        for (int64_t g = 0; g < group; ++g) {
          const float* pg = scores.data() + g * length;
          Vec even[C], odd[C];
          for (int64_t c = 0; c < C; ++c) even[c] = odd[c] = Vec(0.f);
          int64_t j = 0;
          for (; j + 1 < length; j += 2) {
            const Vec p0(pg[j]), p1(pg[j + 1]);
            for (int64_t c = 0; c < C; ++c) {
              even[c] = at::vec::fmadd(p0, load_floats(value_rows + j * dim + c * kLanes), even[c]);
              odd[c] = at::vec::fmadd(p1, load_floats(value_rows + (j + 1) * dim + c * kLanes), odd[c]);
            }
          }
          if (j < length) {
            const Vec p0(pg[j]);
            for (int64_t c = 0; c < C; ++c) {
              even[c] = at::vec::fmadd(p0, load_floats(value_rows + j * dim + c * kLanes), even[c]);
            }
          }
          T* dst = out_ptr + t * o_token + (head * group + g) * o_head;
          const Vec inverse(1.f / totals[g]);
          for (int64_t c = 0; c < C; ++c) store_floats(dst + c * kLanes, (even[c] + odd[c]) * inverse);
        }
      }
    });
  };
  switch (dim / kLanes) {
#define ATTEND_CASE(C) \
  case C: attend(std::integral_constant<int64_t, C>{}); break;
    ATTEND_CASE(1) ATTEND_CASE(2) ATTEND_CASE(3) ATTEND_CASE(4) ATTEND_CASE(5) ATTEND_CASE(6) ATTEND_CASE(7)
    ATTEND_CASE(8) ATTEND_CASE(9) ATTEND_CASE(10) ATTEND_CASE(11) ATTEND_CASE(12) ATTEND_CASE(13) ATTEND_CASE(14)
    ATTEND_CASE(15) ATTEND_CASE(16)
#undef ATTEND_CASE
    default: TORCH_CHECK(false, "head size ", dim, " is past what the attention kernel is built for");
  }
}

at::Tensor slot_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys,
                          at::Tensor values, const at::Tensor& slots, const at::Tensor& positions, double scale) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(),
              "keys and values: contiguous, of one shape");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && keys.dim() == 4, "q/k/v [tokens, heads, dim], "
              "cache [slots, kv_heads, slot_tokens, dim]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && k.scalar_type() == keys.scalar_type() &&
              v.scalar_type() == keys.scalar_type() && values.scalar_type() == keys.scalar_type(),
              "q, k, v and the cache must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == keys.size(1) &&
              q.size(2) == keys.size(3) && k.size(2) == keys.size(3) && q.size(1) % keys.size(1) == 0,
              "head counts or head size do not match the cache");
  TORCH_CHECK(q.size(2) % kLanes == 0, "head size must be a multiple of ", kLanes);
  TORCH_CHECK(q.size(1) / keys.size(1) <= kMaxGroup, "more than ", kMaxGroup, " query heads per kv head");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
              positions.is_contiguous() && slots.numel() == q.size(0) && positions.numel() == q.size(0),
              "slots and positions: one int64 per token");
  check_range(slots, 0, keys.size(0), "a slot outside the cache");
  check_range(positions, 0, keys.size(2), "a position outside its slot");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  DISPATCH_MODEL_DTYPES(q.scalar_type(), "slot_attention", [&] {
    slot_attention_impl<scalar_t>(q, k, v, keys, values, slots, positions, scale, out);
  });
  return out;
}

// ---- residual add + RMSNorm --------------------------------------------------------------------------------
//
// x += residual (in place, rounded to x's dtype), then weight * dtype(x * rsqrt(mean(x^2) + eps)): HF's LlamaRMSNorm
// after the residual connection, in one pass over the row.

template <typename T>
void add_rms_norm_impl(at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
                       at::Tensor& out) {
  const int64_t rows = x.size(0), width = x.size(1), whole = width - width % kLanes;
  T* x_ptr = x.data_ptr<T>();
  const T* r_ptr = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t r_stride = residual ? residual->stride(0) : 0, x_stride = x.stride(0);
  const T* w_ptr = weight.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xi = x_ptr + i * x_stride;
      const T* ri = r_ptr ? r_ptr + i * r_stride : nullptr;
      Vec squares(0.f);
      float tail = 0.f;
      for (int64_t d = 0; d < whole; d += kLanes) {
        Vec value = load_floats(xi + d);
        if (ri) {
          value = rounded<T>(value + load_floats(ri + d));
          store_floats(xi + d, value);
        }
        squares = at::vec::fmadd(value, value, squares);
      }
      for (int64_t d = whole; d < width; ++d) {
        float value = scalar(xi[d]);
        if (ri) {
          value = rounded<T>(value + scalar(ri[d]));
          xi[d] = static_cast<T>(value);
        }
        tail += value * value;
      }
      const float inverse = 1.f / std::sqrt((sum(squares) + tail) / static_cast<float>(width) +
                                            static_cast<float>(eps));
      const Vec scale(inverse);
      T* oi = o_ptr + i * width;
      for (int64_t d = 0; d < whole; d += kLanes) store_floats(oi + d, load_floats(w_ptr + d) * rounded<T>(load_floats(xi + d) * scale));
      for (int64_t d = whole; d < width; ++d) {
        oi[d] = static_cast<T>(scalar(w_ptr[d]) * rounded<T>(scalar(xi[d]) * inverse));
      }
    }
  });
}

at::Tensor add_rms_norm(at::Tensor x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                        double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "x [rows, width], weight [width]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  if (residual) {
    check_cpu(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(x, residual ? &*residual : nullptr, weight, eps, out);
  });
  return out;
}

// ---- rotary embedding of q and k, in place -----------------------------------------------------------------
//
// qkv [tokens, features]: its first rotated_heads heads (q's, then k's) are rotated in HF's rotate-half layout by
// cos/sin [positions, dim] at each token's position; the values after them are left alone.

template <typename T>
void rotary_impl(at::Tensor& qkv, int64_t rotated_heads, int64_t dim, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& positions) {
  const int64_t tokens = qkv.size(0), half = dim / 2, whole = half - half % kLanes;
  T* base = qkv.data_ptr<T>();
  const int64_t stride = qkv.stride(0);
  const T* cos_ptr = cos.data_ptr<T>();
  const T* sin_ptr = sin.data_ptr<T>();
  const int64_t* pos_ptr = positions.data_ptr<int64_t>();
  parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos_ptr + pos_ptr[t] * dim;
      const T* s = sin_ptr + pos_ptr[t] * dim;
      for (int64_t head = 0; head < rotated_heads; ++head) {
        T* x = base + t * stride + head * dim;
        // x * cos + rotate_half(x) * sin, each product rounded where the reference's separate ops round it
        for (int64_t d = 0; d < whole; d += kLanes) {
          const Vec first = load_floats(x + d), second = load_floats(x + d + half);
          store_floats(x + d, rounded<T>(first * load_floats(c + d)) - rounded<T>(second * load_floats(s + d)));
          store_floats(x + d + half, rounded<T>(second * load_floats(c + d + half)) + rounded<T>(first * load_floats(s + d + half)));
        }
        for (int64_t d = whole; d < half; ++d) {
          const float first = scalar(x[d]), second = scalar(x[d + half]);
          x[d] = static_cast<T>(rounded<T>(first * scalar(c[d])) - rounded<T>(second * scalar(s[d])));
          x[d + half] = static_cast<T>(rounded<T>(second * scalar(c[d + half])) +
                                       rounded<T>(first * scalar(s[d + half])));
        }
      }
    }
  });
}

void rotary_(at::Tensor qkv, int64_t rotated_heads, int64_t dim, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& positions) {
  check_cpu(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) >= rotated_heads * dim && dim % 2 == 0, "qkv [tokens, features]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == dim &&
              sin.sizes() == cos.sizes() && cos.scalar_type() == qkv.scalar_type() &&
              sin.scalar_type() == qkv.scalar_type(), "cos/sin [positions, dim] in qkv's dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == qkv.size(0),
              "positions: one int64 per token");
  check_range(positions, 0, cos.size(0), "a position past the rotary table");
  DISPATCH_MODEL_DTYPES(qkv.scalar_type(), "rotary_", [&] {
    rotary_impl<scalar_t>(qkv, rotated_heads, dim, cos, sin, positions);
  });
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------------------------

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), width = out.size(1), whole = width - width % kLanes;
  const T* in_ptr = gate_up.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  const int64_t stride = gate_up.stride(0);
  const Vec one(1.f);
  parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gate = in_ptr + i * stride;
      const T* up = gate + width;
      T* dst = o_ptr + i * width;
      for (int64_t d = 0; d < whole; d += kLanes) {
        const Vec g = load_floats(gate + d);
        store_floats(dst + d, rounded<T>(g / (one + g.neg().exp_u20())) * load_floats(up + d));
      }
      for (int64_t d = whole; d < width; ++d) {
        const float g = scalar(gate[d]);
        dst[d] = static_cast<T>(rounded<T>(g / (1.f + std::exp(-g))) * scalar(up[d]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [rows, 2 * width]");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  DISPATCH_MODEL_DTYPES(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_impl<scalar_t>(gate_up, out);
  });
  return out;
}

// ---- per-token IA3 scales from the resident pool ---------------------------------------------------------------
//
// out[t, column:column + width] *= scales[slots[t]] in place, each product in float32 rounded once into out, as
// torch's multiply of the gathered rows rounds it. Slot 0 is the pool's row of ones (no adapter): skipped, since
// x * 1 is x. One call per module, with no [tokens, width] gather written and read back.

template <typename T>
void scale_columns_impl(at::Tensor& out, const at::Tensor& slots, const at::Tensor& scales, int64_t column) {
  const int64_t tokens = out.size(0), width = scales.size(1), whole = width - width % kLanes;
  const int64_t stride = out.stride(0);
  T* o_ptr = out.data_ptr<T>() + column;
  const T* s_ptr = scales.data_ptr<T>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot_ptr[t] == 0) continue;
    const T* scale = s_ptr + slot_ptr[t] * width;
    T* dst = o_ptr + t * stride;
    for (int64_t d = 0; d < whole; d += kLanes) store_floats(dst + d, load_floats(dst + d) * load_floats(scale + d));
    for (int64_t d = whole; d < width; ++d) dst[d] = static_cast<T>(scalar(dst[d]) * scalar(scale[d]));
  }
}

void scale_columns_(at::Tensor out, const at::Tensor& slots, const at::Tensor& scales, int64_t column) {
  check_cpu(out, "out");
  check_cpu(scales, "scales");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "out: [tokens, columns], columns contiguous");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous() && scales.scalar_type() == out.scalar_type(),
              "scales: [pool, width], contiguous, out's dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == out.size(0),
              "slots: one int64 per token");
  TORCH_CHECK(column >= 0 && column + scales.size(1) <= out.size(1), "the scaled columns lie outside out");
  check_range(slots, 0, scales.size(0), "a slot outside the pool");
  DISPATCH_MODEL_DTYPES(out.scalar_type(), "scale_columns_", [&] {
    scale_columns_impl<scalar_t>(out, slots, scales, column);
  });
}

// ---- per-token LoRA deltas from the resident pool (Punica's SGMV) ---------------------------------------------
//
// For each stack k (a module of one fused matmul) and token t with s = slots[t] >= 0:
// out[t, columns[k]:columns[k] + width_k] += (A_k[s] x[t]) B_k^T[s], with A [pool, rank, in] and the scaled,
// transposed B^T [pool, rank, width] straight from the pool: no per-row copy of any adapter's matrices. A step reads
// every adapter's rows from memory (they do not stay cached between steps, behind the base's weights), so the cost
// is the bytes read, and how well their reading overlaps: tokens are grouped by slot, and each group of up to
// kLoraTokens tokens reads its adapter's rows once per stack, only the slot's own ranks_k[s] rows (a rank-8 adapter
// in a pool padded to 16 reads half). A layer's stacks go in one call (q and v of one fused q/k/v output), and a
// task (a group against one stack) prefetches the next task's rows while it computes, so the memory stream never
// waits for a task to start: one task's rows are a few KiB, too short for the hardware prefetcher to get going.
// Each token's arithmetic is the same whatever its group: float32 accumulation in rank order, rounded once into out
// (its rows may be strided, as a fused output's are).

constexpr int kLoraTokens = 4;

// Cache lines of up to two byte ranges, issued a few at a time into L2 (the rows of the task after this one).
struct LinePrefetcher {
  const char* start[2] = {nullptr, nullptr};
  int64_t lines[2] = {0, 0};
  int part = 0;
  int64_t next = 0;

  int64_t total() const { return lines[0] + lines[1]; }
  void issue(int64_t count) {
    while (count > 0 && part < 2) {
      if (next >= lines[part]) {
        ++part;
        next = 0;
        continue;
      }
      __builtin_prefetch(start[part] + next * 64, 0, 2);
      ++next;
      --count;
    }
  }
};

template <typename T>
struct LoraStack {
  const T* a;             // [pool, pool_rank, in]
  const T* b_t;           // [pool, pool_rank, width]
  const int64_t* ranks;   // [pool]
  int64_t pool_rank;
  int64_t width;
  int64_t column;         // the stack's first column of out

  const T* a_rows(int64_t slot, int64_t in) const { return a + slot * pool_rank * in; }
  const T* b_rows(int64_t slot) const { return b_t + slot * pool_rank * width; }
};

// A group's shrink and expand keep several independent sums in flight: one token of a rank-16 adapter is 16 sums
// of 576 products, and summed one after the other each waits on the one before (the fused multiply-add's latency,
// not the memory, then bounds a step's LoRA). So rank rows go four at a time, output columns 64 at a time.
constexpr int kRankRows = 4;   // rank rows a shrink pass sums at once
constexpr int kOutChunks = 4;  // vectors of output columns an expand pass sums at once

// shrunk[j * rank + r] = A[r] . x_j for the group's tokens, in float32.
template <typename T, int N>
void lora_shrink(const T* const* xs, const T* a_slot, int64_t rank, int64_t in, float* shrunk, LinePrefetcher& next) {
  const int64_t in_whole = in - in % kLanes;
  const int64_t per_pass = (next.total() * kRankRows + rank - 1) / std::max<int64_t>(rank, 1);
  for (int64_t r0 = 0; r0 < rank; r0 += kRankRows) {
    next.issue(per_pass);
    const T* rows[kRankRows];  // past the rank: the last row again, its sums dropped
    for (int q = 0; q < kRankRows; ++q) rows[q] = a_slot + std::min<int64_t>(r0 + q, rank - 1) * in;
    Vec acc[N][kRankRows];
    for (int j = 0; j < N; ++j)
      for (int q = 0; q < kRankRows; ++q) acc[j][q] = Vec(0.f);
    for (int64_t i = 0; i < in_whole; i += kLanes) {
      Vec weights[kRankRows];
      for (int q = 0; q < kRankRows; ++q) weights[q] = load_floats(rows[q] + i);
      for (int j = 0; j < N; ++j) {
        const Vec x = load_floats(xs[j] + i);
        for (int q = 0; q < kRankRows; ++q) acc[j][q] = at::vec::fmadd(weights[q], x, acc[j][q]);
      }
    }
    for (int q = 0; q < kRankRows && r0 + q < rank; ++q) {
      for (int j = 0; j < N; ++j) {
        float total = sum(acc[j][q]);
        for (int64_t i = in_whole; i < in; ++i) total += scalar(rows[q][i]) * scalar(xs[j][i]);
        shrunk[j * rank + r0 + q] = total;
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// bf16 on a CPU with AVX-512 BF16: the products of pairs summed by vdpbf16ps straight from the bf16 rows (no
// conversion of A or x; the tail of K masked in with zeros). Each sum is of the same bf16 products in float32, in
// another order (and with float32 denormals flushed, which no activation or weight holds).
template <int N>
void lora_shrink_bf16(const at::BFloat16* const* xs, const at::BFloat16* a_slot, int64_t rank, int64_t in,
                      float* shrunk, LinePrefetcher& next) {
  constexpr int64_t kPairs = 32;  // bf16 values a vdpbf16ps takes from each operand
  const int64_t per_pass = (next.total() * kRankRows + rank - 1) / std::max<int64_t>(rank, 1);
  for (int64_t r0 = 0; r0 < rank; r0 += kRankRows) {
    next.issue(per_pass);
    const at::BFloat16* rows[kRankRows];
    for (int q = 0; q < kRankRows; ++q) rows[q] = a_slot + std::min<int64_t>(r0 + q, rank - 1) * in;
    __m512 acc[N][kRankRows];
    for (int j = 0; j < N; ++j)
      for (int q = 0; q < kRankRows; ++q) acc[j][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += kPairs) {
      const __mmask32 mask = in - i >= kPairs ? ~__mmask32(0) : static_cast<__mmask32>((1u << (in - i)) - 1);
      __m512bh weights[kRankRows];
      for (int q = 0; q < kRankRows; ++q) weights[q] = (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[q] + i);
      for (int j = 0; j < N; ++j) {
        const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[j] + i);
        for (int q = 0; q < kRankRows; ++q) acc[j][q] = _mm512_dpbf16_ps(acc[j][q], x, weights[q]);
      }
    }
    for (int q = 0; q < kRankRows && r0 + q < rank; ++q) {
      for (int j = 0; j < N; ++j) shrunk[j * rank + r0 + q] = _mm512_reduce_add_ps(acc[j][q]);
    }
  }
}
#endif

// out_j[o] += sum_r shrunk[j * rank + r] * B^T[r][o], in float32, rounded once into out.
template <typename T, int N>
void lora_expand(T* const* outs, const T* b_slot, int64_t rank, int64_t width, const float* shrunk) {
  constexpr int64_t kStep = kLanes * kOutChunks;
  int64_t o = 0;
  for (; o + kStep <= width; o += kStep) {
    Vec delta[N][kOutChunks];
    for (int j = 0; j < N; ++j)
      for (int c = 0; c < kOutChunks; ++c) delta[j][c] = Vec(0.f);
    for (int64_t r = 0; r < rank; ++r) {
      Vec weights[kOutChunks];
      for (int c = 0; c < kOutChunks; ++c) weights[c] = load_floats(b_slot + r * width + o + c * kLanes);
      for (int j = 0; j < N; ++j) {
        const Vec factor(shrunk[j * rank + r]);
        for (int c = 0; c < kOutChunks; ++c) delta[j][c] = at::vec::fmadd(factor, weights[c], delta[j][c]);
      }
    }
    for (int j = 0; j < N; ++j)
      for (int c = 0; c < kOutChunks; ++c) {
        T* at = outs[j] + o + c * kLanes;
        store_floats(at, load_floats(at) + delta[j][c]);
      }
  }
  for (; o + kLanes <= width; o += kLanes) {
    Vec delta[N];
    for (int j = 0; j < N; ++j) delta[j] = Vec(0.f);
    for (int64_t r = 0; r < rank; ++r) {
      const Vec weights = load_floats(b_slot + r * width + o);
      for (int j = 0; j < N; ++j) delta[j] = at::vec::fmadd(Vec(shrunk[j * rank + r]), weights, delta[j]);
    }
    for (int j = 0; j < N; ++j) store_floats(outs[j] + o, load_floats(outs[j] + o) + delta[j]);
  }
  for (; o < width; ++o) {
    for (int j = 0; j < N; ++j) {
      float delta = 0.f;
      for (int64_t r = 0; r < rank; ++r) delta += shrunk[j * rank + r] * scalar(b_slot[r * width + o]);
      outs[j][o] = static_cast<T>(scalar(outs[j][o]) + delta);
    }
  }
}

template <typename T, int N>
void lora_group(const T* const* xs, T* const* outs, const T* a_slot, const T* b_slot, int64_t rank, int64_t in,
                int64_t width, float* shrunk, LinePrefetcher& next) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    lora_shrink_bf16<N>(xs, a_slot, rank, in, shrunk, next);
  } else {
    lora_shrink<T, N>(xs, a_slot, rank, in, shrunk, next);
  }
#else
  lora_shrink<T, N>(xs, a_slot, rank, in, shrunk, next);
#endif
  next.issue(next.total());
  lora_expand<T, N>(outs, b_slot, rank, width, shrunk);
}

thread_local int64_t lora_prefetched_task = -1;  // the task whose rows this thread last prefetched ahead

template <typename T>
void lora_delta_impl(const at::Tensor& x, const at::Tensor& slots, at::TensorList a, at::TensorList b_t,
                     at::TensorList ranks, at::IntArrayRef columns, at::Tensor& out) {
  const int64_t tokens = x.size(0), in = x.size(1);
  const T* x_ptr = x.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  const int64_t x_stride = x.stride(0), o_stride = out.stride(0);
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  std::vector<LoraStack<T>> stacks;
  int64_t max_rank = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    stacks.push_back({a[k].data_ptr<T>(), b_t[k].data_ptr<T>(), ranks[k].data_ptr<int64_t>(), a[k].size(1),
                      b_t[k].size(2), columns[k]});
    max_rank = std::max(max_rank, a[k].size(1));
  }
  // Tokens with an adapter, by slot (stable), cut into groups of one slot and at most kLoraTokens tokens.
  std::vector<int64_t> order;
  order.reserve(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot_ptr[t] >= 0) order.push_back(t);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t l, int64_t r) { return slot_ptr[l] < slot_ptr[r]; });
  std::vector<int64_t> starts;
  for (size_t i = 0; i < order.size(); ++i) {
    const bool same = i > 0 && slot_ptr[order[i]] == slot_ptr[order[i - 1]] && i - starts.back() < kLoraTokens;
    if (!same) starts.push_back(static_cast<int64_t>(i));
  }
  starts.push_back(static_cast<int64_t>(order.size()));
  // Tasks: each group against each stack its slot has rows in, a group's stacks together (its tokens stay cached).
  struct Task {
    int64_t group, stack, slot, rank;
  };
  std::vector<Task> tasks;
  for (int64_t g = 0; g + 1 < static_cast<int64_t>(starts.size()); ++g) {
    const int64_t slot = slot_ptr[order[starts[g]]];
    for (int64_t k = 0; k < static_cast<int64_t>(stacks.size()); ++k) {
      if (stacks[k].ranks[slot] > 0) tasks.push_back({g, k, slot, stacks[k].ranks[slot]});
    }
  }
  const int64_t task_count = static_cast<int64_t>(tasks.size());
  // The rows a task reads, as the prefetcher takes them.
  const auto rows_of = [&](int64_t task) {
    LinePrefetcher lines;
    if (task < 0 || task >= task_count) return lines;
    const Task& t = tasks[task];
    const LoraStack<T>& stack = stacks[t.stack];
    lines.start[0] = reinterpret_cast<const char*>(stack.a_rows(t.slot, in));
    lines.lines[0] = (t.rank * in * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    lines.start[1] = reinterpret_cast<const char*>(stack.b_rows(t.slot));
    lines.lines[1] = (t.rank * stack.width * static_cast<int64_t>(sizeof(T)) + 63) / 64;
    return lines;
  };
  adapter_service::parallel_for_stealing(
      task_count,
      [&](int64_t task) {
        constexpr int64_t kStackRank = 64;  // ranks up to this use a buffer on the stack (no allocation per task)
        float stack_buffer[kLoraTokens * kStackRank];
        thread_local std::vector<float> heap_buffer;  // larger ranks: one buffer per thread, grown as needed
        if (max_rank > kStackRank && static_cast<int64_t>(heap_buffer.size()) < kLoraTokens * max_rank) {
          heap_buffer.resize(kLoraTokens * max_rank);
        }
        float* shrunk = max_rank > kStackRank ? heap_buffer.data() : stack_buffer;
        if (lora_prefetched_task != task) {  // a thread's first task, or one taken from another's range
          LinePrefetcher own = rows_of(task);
          own.issue(own.total());
        }
        LinePrefetcher next = rows_of(task + 1);
        lora_prefetched_task = task + 1;
        const Task& t = tasks[task];
        const LoraStack<T>& stack = stacks[t.stack];
        const int64_t first = starts[t.group], count = starts[t.group + 1] - first, rank = t.rank;
        const T* xs[kLoraTokens];
        T* outs[kLoraTokens];
        for (int64_t j = 0; j < count; ++j) {
          xs[j] = x_ptr + order[first + j] * x_stride;
          outs[j] = o_ptr + order[first + j] * o_stride + stack.column;
        }
        const T* a_slot = stack.a_rows(t.slot, in);
        const T* b_slot = stack.b_rows(t.slot);
        switch (count) {
          case 1: lora_group<T, 1>(xs, outs, a_slot, b_slot, rank, in, stack.width, shrunk, next); break;
          case 2: lora_group<T, 2>(xs, outs, a_slot, b_slot, rank, in, stack.width, shrunk, next); break;
          case 3: lora_group<T, 3>(xs, outs, a_slot, b_slot, rank, in, stack.width, shrunk, next); break;
          default: lora_group<T, kLoraTokens>(xs, outs, a_slot, b_slot, rank, in, stack.width, shrunk, next); break;
        }
      },
      [] { lora_prefetched_task = -1; }, [] {});
}

void lora_delta_(const at::Tensor& x, const at::Tensor& slots, at::TensorList a, at::TensorList b_t,
                 at::TensorList ranks, at::IntArrayRef columns, at::Tensor out) {
  check_cpu(x, "x");
  check_cpu(out, "out");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0), "x [tokens, in] and out [tokens, columns]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: one int64 per token");
  TORCH_CHECK(b_t.size() == a.size() && ranks.size() == a.size() && columns.size() == a.size(),
              "one b_t, ranks and first column per stack");
  std::vector<std::pair<int64_t, int64_t>> spans;  // each stack's [first, last) columns of out
  int64_t pool = std::numeric_limits<int64_t>::max();  // slots every stack has
  for (size_t k = 0; k < a.size(); ++k) {
    check_cpu(a[k], "a");
    check_cpu(b_t[k], "b_t");
    TORCH_CHECK(a[k].is_contiguous() && b_t[k].is_contiguous() && a[k].dim() == 3 && b_t[k].dim() == 3 &&
                a[k].size(0) == b_t[k].size(0) && a[k].size(1) == b_t[k].size(1) && a[k].size(2) == x.size(1),
                "a [pool, rank, in] and b_t [pool, rank, width], contiguous, for x [tokens, in]");
    TORCH_CHECK(x.scalar_type() == a[k].scalar_type() && b_t[k].scalar_type() == a[k].scalar_type() &&
                out.scalar_type() == a[k].scalar_type(), "x, a, b_t and out must share a dtype");
    TORCH_CHECK(columns[k] >= 0 && columns[k] <= out.size(1) - b_t[k].size(2), "a stack's columns outside out");
    spans.emplace_back(columns[k], columns[k] + b_t[k].size(2));
    TORCH_CHECK(ranks[k].scalar_type() == at::kLong && ranks[k].is_contiguous() && ranks[k].numel() == a[k].size(0),
                "ranks: one int64 per pool slot");
    check_range(ranks[k], 0, a[k].size(1) + 1, "a rank outside the pool's");
    pool = std::min(pool, a[k].size(0));
  }
  // Stacks sharing columns would have two threads add into the same values at once.
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k - 1].second <= spans[k].first, "stacks' columns overlap");
  }
  if (a.empty()) return;
  check_range(slots, -1, pool, "a slot outside the pool");
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "lora_delta_", [&] {
    lora_delta_impl<scalar_t>(x, slots, a, b_t, ranks, columns, out);
  });
}

// ---- greedy tokens from logits laid out [vocabulary, rows] --------------------------------------------------
//
// The logits of a step come out transposed ([vocab, rows], the lm_head as the matmul's left operand, which spares
// oneDNN reordering the whole head on every call). Per row: its largest logit and the first index holding it, as
// torch.max gives them; NaN wins (and stays), so a row with any NaN reports NaN and the step is refused.

template <typename T>
void column_max_impl(const at::Tensor& logits, at::Tensor& top, at::Tensor& index) {
  const int64_t vocab = logits.size(0), rows = logits.size(1);
  const T* base = logits.data_ptr<T>();
  const int64_t stride = logits.stride(0);
  const int threads = std::max<int>(1, std::min<int>(adapter_service::team_size(), static_cast<int>(vocab / 1024 + 1)));
  std::vector<float> best(threads * rows, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> where(threads * rows, 0);
  parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t from = vocab * part / threads, to = vocab * (part + 1) / threads;
      float* b = best.data() + part * rows;
      int64_t* w = where.data() + part * rows;
      const int64_t whole = rows - rows % kLanes, vectors = whole / kLanes;
      std::vector<Vec> best_vec(vectors, Vec(-std::numeric_limits<float>::infinity())), where_vec(vectors, Vec(0.f));
      for (int64_t v = from; v < to; ++v) {  // float indices: exact below 2^24, far above any vocabulary
        const T* row = base + v * stride;
        const Vec at(static_cast<float>(v));
        for (int64_t c = 0; c < vectors; ++c) {
          const Vec value = load_floats(row + c * kLanes);
          const Vec take = (value > best_vec[c]) | (value.isnan() & (best_vec[c] == best_vec[c]));
          best_vec[c] = Vec::blendv(best_vec[c], value, take);
          where_vec[c] = Vec::blendv(where_vec[c], at, take);
        }
      }
      for (int64_t c = 0; c < vectors; ++c) {
        float where_floats[kLanes];
        best_vec[c].store(b + c * kLanes);
        where_vec[c].store(where_floats);
        for (int64_t lane = 0; lane < kLanes; ++lane) w[c * kLanes + lane] = static_cast<int64_t>(where_floats[lane]);
      }
      for (int64_t v = from; v < to; ++v) {
        const T* row = base + v * stride;
        for (int64_t r = whole; r < rows; ++r) {
          const float value = scalar(row[r]);
          if (value > b[r] || (std::isnan(value) && !std::isnan(b[r]))) {
            b[r] = value;
            w[r] = v;
          }
        }
      }
    }
  });
  float* top_ptr = top.data_ptr<float>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    float value = best[r];
    int64_t at = where[r];
    for (int part = 1; part < threads; ++part) {
      const float other = best[part * rows + r];
      if (other > value || (std::isnan(other) && !std::isnan(value))) {
        value = other;
        at = where[part * rows + r];
      }
    }
    top_ptr[r] = value;
    index_ptr[r] = at;
  }
}

std::tuple<at::Tensor, at::Tensor> column_max(const at::Tensor& logits) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) > 0, "logits [vocabulary, rows]");
  auto top = at::empty({logits.size(1)}, logits.options().dtype(at::kFloat));
  auto index = at::empty({logits.size(1)}, logits.options().dtype(at::kLong));
  DISPATCH_MODEL_DTYPES(logits.scalar_type(), "column_max", [&] { column_max_impl<scalar_t>(logits, top, index); });
  return {top, index};
}

// Hands this thread's torch thread count to the kernels' team alone (on), torch's own ops then running on one
// thread so that OpenMP opens no team of its own beside the kernels' during a step; or gives it back (off).
// Returns whether it was handed over before the call.
bool kernel_threads(bool on) {
  int& kept = adapter_service::kernel_threads;
  const bool was_on = kept != 0;
  if (on && !was_on) {
    kept = at::get_num_threads();
    omp_set_num_threads(1);  // this thread's OpenMP count only: torch's default for new threads is untouched
  } else if (!on && was_on) {
    omp_set_num_threads(kept);
    kept = 0;
  }
  return was_on;
}

}  // namespace

TORCH_LIBRARY(adapter_service, m) {
  m.def("kernel_threads(bool on) -> bool", kernel_threads);
  m.def("slot_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor slots, "
        "Tensor positions, float scale) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) qkv, int rotated_heads, int dim, Tensor cos, Tensor sin, Tensor positions) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("column_max(Tensor logits) -> (Tensor, Tensor)");
  m.def("lora_delta_(Tensor x, Tensor slots, Tensor[] a, Tensor[] b_t, Tensor[] ranks, int[] columns, "
        "Tensor(a!) out) -> ()");
  m.def("scale_columns_(Tensor(a!) out, Tensor slots, Tensor scales, int column) -> ()");
}

TORCH_LIBRARY_IMPL(adapter_service, CPU, m) {
  m.impl("slot_attention", slot_attention);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rotary_", rotary_);
  m.impl("silu_mul", silu_mul);
  m.impl("lora_delta_", lora_delta_);
  m.impl("scale_columns_", scale_columns_);
  m.impl("column_max", column_max);
}
