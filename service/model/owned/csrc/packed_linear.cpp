// bf16 matmuls y = x W^T (+ b) on Intel AMX or on AVX-512 BF16 (AMD Zen 4/5), for the owned forward's projections
// on CPUs that have either.
//
// A decode step's matmuls have few rows (16-64) against weights far larger than the caches, so they are bound by
// how fast the weights stream from memory, and a step runs ~120 of them back to back. oneDNN's prepacked kernel
// streamed the 30 layers' weights at ~9-15 GB/s here; this one holds each weight in the order its tiles are read,
// splits the output columns in one contiguous range per thread (prefetched ahead as it goes) and lets a thread
// that is done take blocks from the back of another's range, so a thread the OS preempts (the HTTP side, the
// client) holds back only its current block instead of the whole team at a barrier. Measured against oneDNN on
// the 30 layers of SmolLM2 (alternating, min of 8), with AMX: 16 rows 12.7 -> 10.9 ms, 64 rows 17.2 -> 14.0 ms,
// 512 rows 81 -> 69 ms; with a co-runner taking a quarter of a core, 64 rows 23.1 -> 17.3 ms. Without AMX the
// same layout feeds AVX-512's bf16 dot product (vector_block_sums); on an AMD EPYC (Zen 5), min of 6: 1 row 6.9
// -> 5.3 ms, 16 rows 9.6 -> 6.7 ms, 64 rows 21.0 -> 17.6 ms, 256 rows even.
//
// Numbers: products of bf16 values summed in float32 (by the tile unit, or by vdpbf16ps in pairs), the bias added
// in float32, rounded once to bf16, as oneDNN does.

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "parallel.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define ADAPTER_SERVICE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
#define AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#endif

namespace {

constexpr int64_t kTileRows = 16;  // rows of a tile
constexpr int64_t kBlockK = 32;    // bf16 values along K in a tile row (64 bytes)
constexpr int64_t kBlockN = 32;    // output columns of a block: two weight tiles
constexpr int64_t kBlockM = 32;    // input rows of a block: two input tiles
constexpr int64_t kRowSplitBlocks = 4;  // output column blocks up to which a call with many rows splits its rows
constexpr int64_t kRowSplitRows = 1024;  // rows from which it does
constexpr int64_t kPanelRows = 512;  // input rows a call takes against every column block before the next rows
constexpr int64_t kTileElements = kTileRows * kBlockK;  // a tile's bf16 values (1 KiB)
constexpr int64_t kPrefetchAhead = 4;  // K steps (2 KiB of weights each) the weight stream is prefetched ahead

int64_t round_up(int64_t value, int64_t to) { return (value + to - 1) / to * to; }

#ifdef ADAPTER_SERVICE_AMX

// The CPU has AVX-512 with bf16 dot products (vdpbf16ps), and the OS saves the vector registers it needs.
bool detect_avx512_bf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(1, 0, &eax, &ebx, &ecx, &edx) || !(ecx >> 27 & 1)) return false;  // OSXSAVE
  unsigned low, high;
  asm volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  if ((low & 0xE6) != 0xE6) return false;  // XMM, YMM and the three AVX-512 state parts enabled
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx512 = (ebx >> 16 & 1) && (ebx >> 30 & 1);  // AVX512F, AVX512BW
  return avx512 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 5 & 1);  // AVX512_BF16
}

// The CPU has AMX with bf16 (and AVX-512 BF16, for the epilogues), and the kernel lets this process use the tile
// data.
bool detect_amx() {
  if (!detect_avx512_bf16()) return false;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx >> 22 & 1) || !(edx >> 24 & 1)) return false;  // AMX-BF16, AMX-TILE
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the block's sums (input tile i x weight tile j in 2i + j); 4-5: weight tiles; 6-7: input tiles.
// `rows` is the block's input rows (1-32): a block past the last full 32 has fewer.
AMX_TARGET void configure_tiles(int64_t rows) {
  TileConfig config;
  const uint8_t first = static_cast<uint8_t>(std::min(rows, kTileRows));
  const uint8_t second = static_cast<uint8_t>(std::max<int64_t>(rows - kTileRows, 0));
  const uint8_t sum_rows[4] = {first, first, second, second};
  for (int t = 0; t < 4; ++t) {
    config.rows[t] = sum_rows[t];
    config.bytes_per_row[t] = sum_rows[t] ? kTileRows * sizeof(float) : 0;
  }
  for (int t = 4; t < 6; ++t) {
    config.rows[t] = kTileRows;
    config.bytes_per_row[t] = 64;
  }
  config.rows[6] = first;
  config.bytes_per_row[6] = 64;
  config.rows[7] = second;
  config.bytes_per_row[7] = second ? 64 : 0;
  // GCC 12 does not see ldtilecfg read the whole configuration: where this function is not inlined, it drops
  // the stores above as dead and the tiles are left unconfigured (SIGILL on first use). Make them visible.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

AMX_TARGET void release_tiles() { _tile_release(); }

// One block: sums[32][32] = input rows [32, K] x a 32-column block of the packed weight.
// `prefetch` (if not null): memory this call streams in ahead of its use, `prefetch_lines` cache lines of it per K
// step, from the start (the weights a few steps ahead, or the next rows of a row-split call).
AMX_TARGET void block_sums(const at::BFloat16* input, int64_t input_stride, const at::BFloat16* weight,
                           int64_t k_steps, bool two_input_tiles, float* sums, const char* prefetch,
                           int64_t prefetch_lines) {
  const int64_t stride_bytes = input_stride * static_cast<int64_t>(sizeof(at::BFloat16));
  _tile_zero(0);
  _tile_zero(1);
  if (two_input_tiles) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < k_steps; ++k) {
    const at::BFloat16* step = weight + k * 2 * kTileElements;
    if (prefetch) {
      const char* ahead = prefetch + k * prefetch_lines * 64;
      for (int64_t line = 0; line < prefetch_lines; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    }
    _tile_loadd(4, step, 64);
    _tile_loadd(5, step + kTileElements, 64);
    _tile_loadd(6, input + k * kBlockK, stride_bytes);
    _tile_dpbf16ps(0, 6, 4);
    _tile_dpbf16ps(1, 6, 5);
    if (two_input_tiles) {
      _tile_loadd(7, input + kTileRows * input_stride + k * kBlockK, stride_bytes);
      _tile_dpbf16ps(2, 7, 4);
      _tile_dpbf16ps(3, 7, 5);
    }
  }
  constexpr int64_t row_bytes = kBlockN * sizeof(float);
  _tile_stored(0, sums, row_bytes);
  _tile_stored(1, sums + kTileRows, row_bytes);
  if (two_input_tiles) {
    _tile_stored(2, sums + kTileRows * kBlockN, row_bytes);
    _tile_stored(3, sums + kTileRows * kBlockN + kTileRows, row_bytes);
  }
}

// The same sums as block_sums, on AVX-512 BF16 for CPUs without AMX (AMD Zen 4/5): a packed tile's row is one
// K pair of 16 columns, exactly vdpbf16ps's right operand, so the layout, the threading and the epilogues stay
// the tile unit's. Up to kVectorRows input rows at a time hold 2 accumulators each (the block's two tiles); each
// input pair is broadcast once per row and K pair. A block's weights (32 columns x K) are read from memory by the
// first group of rows and from L1/L2 by the others.
constexpr int64_t kVectorRows = 8;

template <int Rows>
AVX512_BF16_TARGET void vector_row_sums(const at::BFloat16* input, int64_t input_stride, const at::BFloat16* weight,
                                        int64_t k_steps, float* sums, const char* prefetch, int64_t prefetch_lines) {
  __m512 acc[Rows][2];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_steps; ++k) {
    const at::BFloat16* step = weight + k * 2 * kTileElements;
    if (prefetch) {
      const char* ahead = prefetch + k * prefetch_lines * 64;
      for (int64_t line = 0; line < prefetch_lines; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
    }
    for (int64_t pair = 0; pair < kTileRows; ++pair) {
      const __m512bh low = (__m512bh)_mm512_loadu_si512(step + pair * 32);
      const __m512bh high = (__m512bh)_mm512_loadu_si512(step + kTileElements + pair * 32);
#pragma GCC unroll 8
      for (int r = 0; r < Rows; ++r) {
        int32_t both;
        std::memcpy(&both, input + r * input_stride + k * kBlockK + pair * 2, sizeof(both));
        const __m512bh x = (__m512bh)_mm512_set1_epi32(both);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, low);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, high);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    _mm512_storeu_ps(sums + r * kBlockN, acc[r][0]);
    _mm512_storeu_ps(sums + r * kBlockN + kTileRows, acc[r][1]);
  }
}

// sums[rows][32] for 1-32 input rows, as block_sums; prefetching (if asked) only while the first rows run.
AVX512_BF16_TARGET void vector_block_sums(const at::BFloat16* input, int64_t input_stride,
                                          const at::BFloat16* weight, int64_t k_steps, int64_t rows, float* sums,
                                          const char* prefetch, int64_t prefetch_lines) {
  for (int64_t row = 0; row < rows; row += kVectorRows) {
    const at::BFloat16* part = input + row * input_stride;
    float* part_sums = sums + row * kBlockN;
    const char* ahead = row == 0 ? prefetch : nullptr;
    switch (std::min(kVectorRows, rows - row)) {
      case 1: vector_row_sums<1>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 2: vector_row_sums<2>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 3: vector_row_sums<3>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 4: vector_row_sums<4>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 5: vector_row_sums<5>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 6: vector_row_sums<6>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      case 7: vector_row_sums<7>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
      default: vector_row_sums<8>(part, input_stride, weight, k_steps, part_sums, ahead, prefetch_lines); break;
    }
  }
}

// sums (+ bias) rounded to bf16 into out's rows x columns (the block's valid part).
AVX512_BF16_TARGET void store_block(const float* sums, const float* bias, int64_t rows, int64_t columns,
                                    at::BFloat16* out, int64_t out_stride) {
  const __mmask16 low = columns >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << columns) - 1);
  const __mmask16 high = columns >= 32 ? 0xFFFF : columns > 16 ? static_cast<__mmask16>((1u << (columns - 16)) - 1) : 0;
  const __m512 bias_low = bias ? _mm512_maskz_loadu_ps(low, bias) : _mm512_setzero_ps();
  const __m512 bias_high = bias ? _mm512_maskz_loadu_ps(high, bias + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256bh first = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(sums + r * kBlockN), bias_low));
    const __m256bh second = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(sums + r * kBlockN + 16), bias_high));
    _mm256_mask_storeu_epi16(out + r * out_stride, low, (__m256i)first);
    _mm256_mask_storeu_epi16(out + r * out_stride + 16, high, (__m256i)second);
  }
}

// SiLU(gate) * up for a block's rows x 32 columns, from the float sums of a gate block and its up block: each sum
// rounded to bf16 as store_block rounds it, then what silu_mul (cpu_kernels.cpp) computes from those bf16 values,
// with the same vector ops, so the result has the bits of the unfused pair.
AVX512_BF16_TARGET void store_silu_mul_block(const float* gate, const float* up, int64_t rows,
                                             at::BFloat16* out, int64_t out_stride) {
  using Vec = at::vec::Vectorized<float>;
  const auto as_bf16 = [](const Vec& v) -> Vec {
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  };
  const Vec zero(0.f), one(1.f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t at = r * kBlockN + half * 16;
      const Vec g = as_bf16(Vec::loadu(gate + at) + zero);
      const Vec u = as_bf16(Vec::loadu(up + at) + zero);
      const Vec product = as_bf16(g / (one + g.neg().exp_u20())) * u;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + half * 16),
                          (__m256i)_mm512_cvtneps_pbh(product));
    }
  }
}

thread_local int64_t configured_rows = 0;  // the tile configuration a team thread holds during a call (0: none)

// A team thread's tiles over a call: configured for a pass's row count when it changes, released at the end.
void enter_tiles() { configured_rows = 0; }
void leave_tiles() {
  if (configured_rows != 0) release_tiles();
  configured_rows = 0;
}
void tiles_for(int64_t rows) {
  if (rows != configured_rows) {
    configure_tiles(rows);
    configured_rows = rows;
  }
}

// The tile unit reads whole 32-value steps of K along rows of the input: x itself, or a copy padded with zeros
// if K is not a multiple of 32 (or its rows are strided).
at::Tensor padded_input(const at::Tensor& x, int64_t k_steps) {
  if (x.size(1) % kBlockK == 0 && x.stride(1) == 1) return x;
  at::Tensor input = at::zeros({x.size(0), k_steps * kBlockK}, x.options());
  input.narrow(1, 0, x.size(1)).copy_(x);
  return input;
}

#endif  // ADAPTER_SERVICE_AMX

// What runs the packed matmuls here: the tile unit, AVX-512 BF16, or nothing (the callers use oneDNN).
enum class Unit { kNone, kVector, kTiles };

Unit matmul_unit() {
#ifdef ADAPTER_SERVICE_AMX
  static const Unit unit = detect_amx() ? Unit::kTiles : detect_avx512_bf16() ? Unit::kVector : Unit::kNone;
  return unit;
#else
  return Unit::kNone;
#endif
}

const char* unit_name() {
  switch (matmul_unit()) {
    case Unit::kTiles: return "amx";
    case Unit::kVector: return "avx512_bf16";
    default: return "";
  }
}

#ifdef ADAPTER_SERVICE_AMX
// One block's sums for `rows` (1-32) input rows, on whichever unit this CPU has (see block_sums for `prefetch`).
void unit_block_sums(const at::BFloat16* input, int64_t input_stride, const at::BFloat16* weight, int64_t k_steps,
                     int64_t rows, float* sums, const char* prefetch, int64_t prefetch_lines) {
  if (matmul_unit() == Unit::kTiles) {
    tiles_for(rows);
    block_sums(input, input_stride, weight, k_steps, rows > kTileRows, sums, prefetch, prefetch_lines);
  } else {
    vector_block_sums(input, input_stride, weight, k_steps, rows, sums, prefetch, prefetch_lines);
  }
}
#endif

// x [m, k] in bf16 on the CPU, and `packed` a bf16_pack of an [n, k] weight; returns the K steps.
int64_t check_packed_operands(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(matmul_unit() != Unit::kNone, "this CPU has neither AMX nor AVX-512 with bf16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "x: 2-D bfloat16 on the CPU");
  const int64_t k = x.size(1);
  const int64_t n_blocks = round_up(n, kBlockN) / kBlockN, k_steps = round_up(k, kBlockK) / kBlockK;
  TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.numel() == n_blocks * kBlockN * k_steps * kBlockK,
              "packed weight: bf16_pack of a [", n, ", ", k, "] weight");
  return k_steps;
}

// weight [N, K] -> 1-D, by 32-column block, then K step, then the block's two tiles, each 16 pairs of K x 16 columns
// x the pair (the tile unit's layout for the right operand); N and K padded with zeros to multiples of 32.
at::Tensor bf16_pack(const at::Tensor& weight) {
  TORCH_CHECK(matmul_unit() != Unit::kNone, "this CPU has neither AMX nor AVX-512 with bf16");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "weight: 2-D bfloat16 on the CPU");
  const at::Tensor dense = weight.contiguous();
  const int64_t n = dense.size(0), k = dense.size(1);
  const int64_t n_blocks = round_up(n, kBlockN) / kBlockN, k_steps = round_up(k, kBlockK) / kBlockK;
  at::Tensor packed = at::empty({n_blocks * kBlockN * k_steps * kBlockK}, dense.options());
  const at::BFloat16* source = dense.data_ptr<at::BFloat16>();
  at::BFloat16* target = packed.data_ptr<at::BFloat16>();
  adapter_service::parallel_for(0, n_blocks, 1, [&](int64_t first, int64_t last) {
    at::BFloat16* out = target + first * kBlockN * k_steps * kBlockK;
    for (int64_t block = first; block < last; ++block)
      for (int64_t step = 0; step < k_steps; ++step)
        for (int64_t tile = 0; tile < 2; ++tile)
          for (int64_t pair = 0; pair < kTileRows; ++pair)
            for (int64_t column = 0; column < kTileRows; ++column)
              for (int64_t half = 0; half < 2; ++half) {
                const int64_t row = block * kBlockN + tile * kTileRows + column;
                const int64_t along = step * kBlockK + pair * 2 + half;
                *out++ = row < n && along < k ? source[row * k + along] : at::BFloat16(0.0f);
              }
  });
  return packed;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  const int64_t m = x.size(0), n = out_features;
  const int64_t k_steps = check_packed_operands(x, packed, n), n_blocks = round_up(n, kBlockN) / kBlockN;
  at::Tensor bias_float;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "bias: [", n, "]");
    bias_float = bias->to(at::kFloat).contiguous();  // no copy for a float32 bias (what Matmul holds)
  }
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
#ifdef ADAPTER_SERVICE_AMX
  const at::Tensor input = padded_input(x, k_steps);
  const at::BFloat16* input_data = input.data_ptr<at::BFloat16>();
  const int64_t input_stride = input.stride(0);
  const at::BFloat16* weight = packed.data_ptr<at::BFloat16>();
  const float* bias_data = bias.has_value() ? bias_float.data_ptr<float>() : nullptr;
  at::BFloat16* out_data = out.data_ptr<at::BFloat16>();
  const int64_t block_weight = kBlockN * k_steps * kBlockK;
  // One pass: `rows` input rows from `row` against column block `block`, rounded into out (see block_sums for
  // `prefetch`).
  auto pass_over = [&](int64_t row, int64_t rows, int64_t block, const char* prefetch, int64_t prefetch_lines) {
    alignas(64) float sums[kBlockM * kBlockN];
    const int64_t column = block * kBlockN, columns = std::min(kBlockN, n - column);
    unit_block_sums(input_data + row * input_stride, input_stride, weight + block * block_weight, k_steps, rows,
                    sums, prefetch, prefetch_lines);
    store_block(sums, bias_data ? bias_data + column : nullptr, rows, columns, out_data + row * n + column, n);
  };
  if (n_blocks <= kRowSplitBlocks && m >= kRowSplitRows) {
    // Few output columns and many rows (a head computed as head x hidden^T, whose rows are the vocabulary): the
    // threads split the rows, so each input row, which is what streams from memory here, is read by one thread
    // once. A pass prefetches the next pass's rows, spread over its K steps: the tiles read 32 rows at a time,
    // too many streams for the hardware prefetcher to follow.
    const int64_t passes = (m + kBlockM - 1) / kBlockM;
    const int64_t pass_bytes = kBlockM * input_stride * static_cast<int64_t>(sizeof(at::BFloat16));
    const int64_t lines_per_step = k_steps > 0 ? (pass_bytes / 64 + k_steps - 1) / k_steps : 0;
    adapter_service::parallel_for_stealing(
        passes,
        [&](int64_t pass) {
          const int64_t row = pass * kBlockM, rows = std::min(kBlockM, m - row);
          const char* next_rows = pass + 1 < passes
                                      ? reinterpret_cast<const char*>(input_data + (row + kBlockM) * input_stride)
                                      : nullptr;
          for (int64_t block = 0; block < n_blocks; ++block) {
            pass_over(row, rows, block, block == 0 ? next_rows : nullptr, lines_per_step);
          }
        },
        enter_tiles, leave_tiles);
    return out;
  }
  // Passes after the first over a block's rows find its weights in L2 when they fit beside the input rows (all of
  // SmolLM2's and Llama 8B's but the widest); else every pass streams them in with software prefetch.
  const bool block_stays_cached = block_weight * static_cast<int64_t>(sizeof(at::BFloat16)) <= 256 * 1024;
  // Many rows go in panels of kPanelRows, each over every column block: all the rows against each block in turn
  // re-read the whole input from memory once per block (96 times for SmolLM2's gate/up at 4,096 rows), where a
  // panel's rows stay in L2 across the blocks and only the weights are read again, once per panel.
  for (int64_t first = 0; first < m; first += kPanelRows) {
    const int64_t last = std::min(m, first + kPanelRows);
    adapter_service::parallel_for_stealing(
        n_blocks,
        [&](int64_t block) {
          const char* weights_ahead =
              reinterpret_cast<const char*>(weight + block * block_weight + kPrefetchAhead * 2 * kTileElements);
          for (int64_t row = first; row < last; row += kBlockM) {
            // The first pass over the rows streams the weights in; later passes find them cached.
            const bool stream = row == first || !block_stays_cached;
            pass_over(row, std::min(kBlockM, last - row), block, stream ? weights_ahead : nullptr,
                      stream ? 2 * kTileElements * 2 / 64 : 0);
          }
        },
        enter_tiles, leave_tiles);
  }
#endif
  return out;
}

// SiLU(x W_gate^T) * (x W_up^T) from one packed [2 * width, K] weight (gate rows, then up rows; no bias): each
// thread takes a gate column block and its up block together, so the [rows, 2 * width] product is never written
// and read back. The same bits as bf16_linear followed by silu_mul. Panels of rows as bf16_linear's.
at::Tensor bf16_linear_silu_mul(const at::Tensor& x, const at::Tensor& packed, int64_t width) {
  TORCH_CHECK(width > 0 && width % kBlockN == 0, "width: a multiple of ", kBlockN);
  const int64_t m = x.size(0), k_steps = check_packed_operands(x, packed, 2 * width), half_blocks = width / kBlockN;
  at::Tensor out = at::empty({m, width}, x.options());
  if (m == 0) return out;
#ifdef ADAPTER_SERVICE_AMX
  const at::Tensor input = padded_input(x, k_steps);
  const at::BFloat16* input_data = input.data_ptr<at::BFloat16>();
  const int64_t input_stride = input.stride(0);
  const at::BFloat16* weight = packed.data_ptr<at::BFloat16>();
  at::BFloat16* out_data = out.data_ptr<at::BFloat16>();
  const int64_t block_weight = kBlockN * k_steps * kBlockK;
  const int64_t ahead = kPrefetchAhead * 2 * kTileElements, lines = 2 * kTileElements * 2 / 64;
  const bool blocks_stay_cached = 2 * block_weight * static_cast<int64_t>(sizeof(at::BFloat16)) <= 256 * 1024;
  for (int64_t first = 0; first < m; first += kPanelRows) {
    const int64_t last = std::min(m, first + kPanelRows);
    adapter_service::parallel_for_stealing(
        half_blocks,
        [&](int64_t block) {
          const at::BFloat16* gate_weight = weight + block * block_weight;
          const at::BFloat16* up_weight = weight + (block + half_blocks) * block_weight;
          for (int64_t row = first; row < last; row += kBlockM) {
            alignas(64) float gate[kBlockM * kBlockN];
            alignas(64) float up[kBlockM * kBlockN];
            const int64_t rows = std::min(kBlockM, last - row);
            const bool stream = row == first || !blocks_stay_cached;
            const at::BFloat16* rows_input = input_data + row * input_stride;
            unit_block_sums(rows_input, input_stride, gate_weight, k_steps, rows, gate,
                            stream ? reinterpret_cast<const char*>(gate_weight + ahead) : nullptr, stream ? lines : 0);
            unit_block_sums(rows_input, input_stride, up_weight, k_steps, rows, up,
                            stream ? reinterpret_cast<const char*>(up_weight + ahead) : nullptr, stream ? lines : 0);
            store_silu_mul_block(gate, up, rows, out_data + row * width + block * kBlockN, width);
          }
        },
        enter_tiles, leave_tiles);
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adapter_service, m) {
  m.def("packed_matmul_unit() -> str", [] { return std::string(unit_name()); });
  m.def("bf16_pack(Tensor weight) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.def("bf16_linear_silu_mul(Tensor x, Tensor packed, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(adapter_service, CPU, m) {
  m.impl("bf16_pack", bf16_pack);
  m.impl("bf16_linear", bf16_linear);
  m.impl("bf16_linear_silu_mul", bf16_linear_silu_mul);
}
