// GhostServe erasure-codec kernels (loaded by ghostserve/kernels/cuda_backend.py through CuPy RawModule;
// compiled stand-alone by scripts/compile_cuda.sh for the resource report).
//
// Memory-bound by design:
//  * 16-byte (uint4) loads and stores through the read-only path, grid-stride loops, up to two vectors per
//    thread per iteration plus a prefetch of the next source, so several loads are in flight per thread.
//  * GF(2^8) multiply (poly 0x11D) without log/exp tables: a byte x is sum_b bit_b(x) * 2^b, so
//    c * x = XOR_b bit_b(x) * (c * 2^b). Four bytes of a word are handled at once: the bit planes
//    (w >> b) & 0x01010101 hold 0/1 per byte, and multiplying a plane by the byte (c * 2^b) cannot carry
//    across bytes. The eight products c * 2^b per coefficient are staged in shared memory per block
//    (uniform addresses: broadcast, no bank conflicts); nothing but the inputs is read from global memory.
//  * Fused gather: the encode kernels can read shard vector i of every rank straight from the rank's KV
//    pool (layout [plane][slot][row]) through the chunk's slot list, so no packed shard copy exists.
//
// Every pointer array and table is a small device array prepared by the host. Output buffers never alias
// inputs within one launch.

#if defined(__CUDACC_RTC__)
// NVRTC (CuPy's RawModule) does not always ship the C++ standard headers.
typedef unsigned char uint8_t;
typedef unsigned int uint32_t;
#else
#include <cstdint>
#endif

namespace {

constexpr int kMaxSources = 256;
constexpr int kMaxRows = 8;

__device__ __forceinline__ uint4 load16(const uint8_t* base, unsigned long long i) {
  return __ldg(reinterpret_cast<const uint4*>(base) + i);
}

// Shard vector index -> vector index inside a rank's pool. Shard order is [plane][token][row]; the pool
// is [plane][slot][row]. 32-bit divisions: shards are far below 2^32 vectors (64 GiB).
struct Gather {
  unsigned int row_vecs;    // row_bytes / 16
  unsigned int tokens;      // tokens in the chunk
  unsigned long long pool_slots;
  const long long* slots;   // device array, `tokens` entries

  __device__ __forceinline__ unsigned long long operator()(unsigned long long i) const {
    const unsigned int g = static_cast<unsigned int>(i / row_vecs);
    const unsigned int col = static_cast<unsigned int>(i - static_cast<unsigned long long>(g) * row_vecs);
    const unsigned int plane = g / tokens;
    const unsigned int t = g - plane * tokens;
    const unsigned long long pool_row = plane * pool_slots + static_cast<unsigned long long>(slots[t]);
    return pool_row * row_vecs + col;
  }
};

// acc[r] ^= coef[r] * v for the four words of v; tbl holds coef[r] * 2^b at [r * 8 + b] (stride `step`).
template <int R>
__device__ __forceinline__ void gf_madd(uint32_t (&acc)[R][4], const uint4& v, const uint8_t* tbl, int step) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    uint32_t plane[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) plane[q] = (w[q] >> b) & 0x01010101u;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t t = tbl[r * step + b];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[r][q] ^= plane[q] * t;
    }
  }
}

__device__ __forceinline__ uint8_t gf_mul_byte(uint8_t x, const uint8_t* t8) {
  uint32_t out = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) out ^= ((x >> b) & 1u) * t8[b];
  return static_cast<uint8_t>(out);
}

// outs[r] = XOR_j coef[r][j] * srcs[j] (XOR_MODE: outs[0] = XOR_j srcs[j]). With GATHER the sources are
// pools and vector i of source j is read at gather(i). `aligned` says every pointer is 16-byte aligned; the
// last n % 16 bytes (or everything when unaligned) go byte by byte.
template <int R, bool XOR_MODE, bool GATHER>
__device__ __forceinline__ void encode_body(const uint8_t* const* __restrict__ srcs, int k,
                                            uint8_t* const* __restrict__ outs,
                                            const uint8_t* __restrict__ tbl, unsigned long long n,
                                            int aligned, const Gather& gather) {
  extern __shared__ uint8_t s_tbl[];  // R * k * 8 products, [r][j][b]
  __shared__ const uint8_t* s_src[kMaxSources];
  __shared__ uint8_t* s_out[kMaxRows];
  if (!XOR_MODE) {
    for (int t = threadIdx.x; t < R * k * 8; t += blockDim.x) s_tbl[t] = tbl[t];
  }
  for (int t = threadIdx.x; t < k; t += blockDim.x) s_src[t] = srcs[t];
  for (int t = threadIdx.x; t < R; t += blockDim.x) s_out[t] = outs[t];
  __syncthreads();

  const unsigned long long tid = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  const int step = k * 8;
  unsigned long long done = 0;
  if (aligned) {
    // U vectors per thread per iteration (fewer when many rows need registers for accumulators).
    constexpr int U = R <= 2 ? 2 : 1;
    const unsigned long long nv = n >> 4;
    for (unsigned long long i = tid; i < nv; i += U * stride) {
      unsigned long long at[U];
      bool live[U];
      uint32_t acc[U][R][4] = {};
      uint4 next[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const unsigned long long iu = i + u * stride;
        live[u] = iu < nv;
        at[u] = live[u] ? (GATHER ? gather(iu) : iu) : 0;
        next[u] = live[u] ? load16(s_src[0], at[u]) : make_uint4(0, 0, 0, 0);
      }
      for (int j = 0; j < k; ++j) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          v[u] = next[u];
          // Prefetch the next source while this one is combined: U loads stay in flight.
          if (j + 1 < k && live[u]) next[u] = load16(s_src[j + 1], at[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (XOR_MODE) {
            acc[u][0][0] ^= v[u].x;
            acc[u][0][1] ^= v[u].y;
            acc[u][0][2] ^= v[u].z;
            acc[u][0][3] ^= v[u].w;
          } else {
            gf_madd<R>(acc[u], v[u], s_tbl + j * 8, step);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!live[u]) continue;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          reinterpret_cast<uint4*>(s_out[r])[i + u * stride] =
              make_uint4(acc[u][r][0], acc[u][r][1], acc[u][r][2], acc[u][r][3]);
        }
      }
    }
    done = nv << 4;
  }
  // With GATHER the host only fuses when rows are whole vectors: no bytes are left over.
  if constexpr (!GATHER) {
    for (unsigned long long i = done + tid; i < n; i += stride) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        uint8_t acc = 0;
        for (int j = 0; j < k; ++j) {
          acc ^= XOR_MODE ? s_src[j][i] : gf_mul_byte(s_src[j][i], s_tbl + r * step + j * 8);
        }
        s_out[r][i] = acc;
      }
    }
  }
}

}  // namespace

// out = XOR of nsrc sources (also every step of an RDP schedule).
extern "C" __global__ void __launch_bounds__(256, 2)
    gs_xor(const uint8_t* const* srcs, int nsrc, uint8_t* const* outs, unsigned long long n, int aligned) {
  encode_body<1, true, false>(srcs, nsrc, outs, nullptr, n, aligned, Gather{1, 1, 0, nullptr});
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gs_xor_gather(const uint8_t* const* pools, int nsrc, uint8_t* const* outs, unsigned long long n,
                  unsigned int row_vecs, unsigned int tokens, unsigned long long pool_slots,
                  const long long* slots) {
  encode_body<1, true, true>(pools, nsrc, outs, nullptr, n, 1, Gather{row_vecs, tokens, pool_slots, slots});
}

#define GS_DEFINE_GF(R)                                                                                 \
  extern "C" __global__ void __launch_bounds__(256, 2)                                                   \
      gs_gf_##R(const uint8_t* const* srcs, int k, uint8_t* const* outs, const uint8_t* tbl,          \
                unsigned long long n, int aligned) {                                                  \
    encode_body<R, false, false>(srcs, k, outs, tbl, n, aligned, Gather{1, 1, 0, nullptr});          \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(256, 2)                                                   \
      gs_gf_gather_##R(const uint8_t* const* pools, int k, uint8_t* const* outs, const uint8_t* tbl,  \
                       unsigned long long n, unsigned int row_vecs, unsigned int tokens,              \
                       unsigned long long pool_slots, const long long* slots) {                        \
    encode_body<R, false, true>(pools, k, outs, tbl, n, 1, Gather{row_vecs, tokens, pool_slots, slots}); \
  }

GS_DEFINE_GF(1)
GS_DEFINE_GF(2)
GS_DEFINE_GF(3)
GS_DEFINE_GF(4)
GS_DEFINE_GF(5)
GS_DEFINE_GF(6)
GS_DEFINE_GF(7)
GS_DEFINE_GF(8)
