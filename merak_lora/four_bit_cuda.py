"""A 4-bit (bitsandbytes NF4/FP4) weight times a few bf16 rows in CUDA C++, for the fused one-token step, with the
linear's LoRA added as its output is written.

bitsandbytes' own product for one to a few rows reads its packed codes at 0.9-1.3 TB/s on an H100, a third of a
device copy, and two Triton products were slower still (bench/RESULTS.md): Triton gives no say over registers, the
order of loads and the tensor cores' operand layout, which this product is built on. A warp computes 16 output rows
with the tensor cores (`mma` m16n8k16: the weight as A, up to 8 rows of x as B, fp32 sums), so the arithmetic left
to the threads is the look-up alone: the 16 table values, rounded to bf16, sit in eight registers as byte planes,
and `prmt` turns a word of 8 codes into four bf16 pairs in 16 instructions, pairs that are A's operand registers as
they stand. A dot product may take its terms in any order, so each lane takes 8 bytes of each of its two rows per
64-code group, the four lanes of a row together one group, and x is loaded to match; the four `mma` of a group then
sum codes of one scale, which multiplies their fp32 sums.

A block's warps split K and add their sums at the end. Nsight Compute found the product bound by latency, not
by the memory or the issue slots (gate, up at one row: DRAM 48% busy, 0.45 instructions a cycle a scheduler, 3.7
warps a scheduler with 1.1 ready), and the SASS showed why: ptxas interleaves the loads with the look-ups whatever
their order in the source, and each group's addresses took ~25 instructions of 64-bit arithmetic. So a warp takes 4
groups at a time whose codes, x and scales are constant offsets from the batch's first (four scales a load where
blocks are 64 codes), at 64 registers a thread: 16 warps a block, two blocks, 32 warps a multiprocessor.
That read 1.07-1.13x faster than 8 warps of 8 groups at 128 registers. What bounds it now is the look-up: its loads
alone, with its launch and addresses, take two thirds of its time (bench/four_bit_loads.py), and the ALU pipe, where
the `prmt`s, shifts and masks run, is 75% busy at gate and up. A table in shared memory (0.85x), the copy engine
bringing the codes into shared memory (a producer warp 0.67-0.76x, a ring a warp 0.85x) and other launches each cost
more than they hid (bench/PERF_NOTES.md).

The LoRA up projection (B times the down projection's fp32 partials, summed) is added to each output as the block
writes it, rounded as transformers rounds a LoRA linear's output, so the kernels after the product need not read B.
Built on first use with PyTorch's extension loader (nvcc); where that fails the step keeps bitsandbytes' product
and the log says why once.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("merak_lora")

MAX_ROWS = 8
MAX_RANK = 128  # LoRA ranks the kernel's epilogue takes (compiled in as MERAK_MAX_RANK)
LAUNCH = (16, 4, 2)  # warps a block, 64-code groups a warp loads at once, blocks a multiprocessor
# Past two waves of LAUNCH's blocks (gate and up at 8B: 1,792 tiles of 16 rows), blocks of 8 warps at four a
# multiprocessor: at K = 4096 a 16-warp block's warps each load once, so blocks come and go at a finer grain
# (bench/PERF_NOTES.md, eighth session: gate, up 1.10x; q, k, v even and o, down 0.9x, so only there).
MANY_TILES = (8, 4, 4)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cstdint>

struct Planes { uint32_t p[8]; };

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

// 8 bytes the L1 does not keep (x stays there)
__device__ __forceinline__ uint2 stream8(const uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// the four bytes of w as bf16 pairs in memory order: p[i] holds byte i's high nibble's value in its low half
__device__ __forceinline__ void lookup_pairs(uint32_t w, const Planes& t, uint32_t* p) {
  uint32_t s = w & 0x77777777u;                          // a nibble's entry among eight
  uint32_t h = ((w >> 1) & 0x44444444u) | 0x32103210u;   // which eight: byte j of the first or the second pick
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t lo = prmt(prmt(t.p[0], t.p[1], s), prmt(t.p[2], t.p[3], s), h);
    const uint32_t hi = prmt(prmt(t.p[4], t.p[5], s), prmt(t.p[6], t.p[7], s), h);
    p[2 * half] = prmt(lo, hi, 0x4051u);
    p[2 * half + 1] = prmt(lo, hi, 0x6273u);
    s >>= 16;
    h >>= 16;
  }
}

__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// U 64-code groups of a lane's two weight rows and the groups' scales (x's columns are loaded as each is summed).
// With EDGE the batch holds a row's last groups: each clamped to the row, a group past it counting 0; otherwise
// every address is a constant offset from the batch's first. With VEC blocks are 64 codes and a row's scales start
// on 16 bytes, so four groups' scales are one load; otherwise a group's scale is found for any blocksize, blocks
// free to straddle rows.
template <int U>
struct Groups {
  uint2 wg[U], wh[U];
  float sg[U], sh[U];

  // group u of the batch at `base`, as an offset from it: clamped to the row's last group with EDGE
  template <bool EDGE>
  static __device__ __forceinline__ int at(int u, int base, int groups) {
    return EDGE ? min(u, groups - 1 - base) : u;
  }

  template <bool EDGE, bool VEC>
  __device__ __forceinline__ void load(int base, int groups, const uint8_t* cg, const uint8_t* ch,
                                       const float* __restrict__ absmax, size_t sg0, size_t sh0, int block_shift) {
    cg += 32 * (size_t)base, ch += 32 * (size_t)base;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      wg[u] = stream8(cg + 32 * at<EDGE>(u, base, groups));
      wh[u] = stream8(ch + 32 * at<EDGE>(u, base, groups));
    }
    if constexpr (VEC && !EDGE && U % 4 == 0) {
      const float* ag = absmax + sg0 / 64 + base;
      const float* ah = absmax + sh0 / 64 + base;
#pragma unroll
      for (int u = 0; u < U; u += 4) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(ag + u));
        const float4 b = __ldg(reinterpret_cast<const float4*>(ah + u));
        sg[u] = a.x, sg[u + 1] = a.y, sg[u + 2] = a.z, sg[u + 3] = a.w;
        sh[u] = b.x, sh[u + 1] = b.y, sh[u + 2] = b.z, sh[u + 3] = b.w;
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + at<EDGE>(u, base, groups);
        const float past = EDGE ? static_cast<float>(base + u < groups) : 1.f;  // no branch
        sg[u] = past * __ldg(absmax + ((sg0 + 64 * j) >> block_shift));
        sh[u] = past * __ldg(absmax + ((sh0 + 64 * j) >> block_shift));
      }
    }
  }

  template <bool EDGE>
  __device__ __forceinline__ void add_to(float* acc, const Planes& t, int base, int groups,
                                         const __nv_bfloat16* xr) const {
    xr += 64 * (size_t)base;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4* xp = reinterpret_cast<const uint4*>(xr + 64 * at<EDGE>(u, base, groups));
      const uint4 xa = __ldg(xp), xb = __ldg(xp + 1);
      uint32_t pg[8], ph[8];
      lookup_pairs(wg[u].x, t, pg);
      lookup_pairs(wg[u].y, t, pg + 4);
      lookup_pairs(wh[u].x, t, ph);
      lookup_pairs(wh[u].y, t, ph + 4);
      const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t a[4] = {pg[2 * i], ph[2 * i], pg[2 * i + 1], ph[2 * i + 1]};
        mma(c, a, xw[2 * i], xw[2 * i + 1]);
      }
      acc[0] = fmaf(c[0], sg[u], acc[0]);
      acc[1] = fmaf(c[1], sg[u], acc[1]);
      acc[2] = fmaf(c[2], sh[u], acc[2]);
      acc[3] = fmaf(c[3], sh[u], acc[3]);
    }
  }
};

constexpr int MAX_RANK = MERAK_MAX_RANK;  // LoRA ranks the epilogue takes (summed partials in shared memory)

// A block computes 16 output rows for m <= 8 rows of x; its WARPS warps split K, each warp taking U 64-code
// groups at a time (U * 32 bytes of each row). In a warp, lane (g, q) holds output rows g and g + 8 and x's row g;
// of each 64-code group it reads bytes 8q..8q+7 of both weight rows, so the four mma of a group sum codes of one
// scale, which then multiplies their fp32 sums. MINB blocks fit a multiprocessor (16 warps, 2: 64 registers a
// thread). The block writes bias and, with lb, the LoRA up projection lscale * B[row] @ (lt's lp partials
// summed) onto each output.
template <int WARPS, int U, int MINB, bool VEC>
__global__ void __launch_bounds__(WARPS * 32, MINB) four_bit_mma(
    const __nv_bfloat16* __restrict__ x, int ldx, int m, const uint8_t* __restrict__ codes,
    const float* __restrict__ absmax, const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ out,
    int n, int k, int block_shift, Planes t, const float* __restrict__ lt, int lp, int lr,
    const __nv_bfloat16* __restrict__ lb, float lscale) {
  __shared__ float lora_t[8 * MAX_RANK];  // x's rows' LoRA down projections, their partials summed
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  if (lb != nullptr) {
    for (int e = threadIdx.x; e < m * lr; e += WARPS * 32) {
      float v = 0.f;
      for (int p = 0; p < lp; ++p) v += lt[((e / lr) * lp + p) * lr + e % lr];
      lora_t[e] = v;
    }
  }
  const int n0 = blockIdx.x * 16, groups = k / 64;
  const int rg = min(n0 + g, n - 1), rh = min(n0 + g + 8, n - 1);
  const uint8_t* cg = codes + (size_t)rg * (k / 2) + 8 * q;
  const uint8_t* ch = codes + (size_t)rh * (k / 2) + 8 * q;
  const size_t sg0 = (size_t)rg * k, sh0 = (size_t)rh * k;
  const __nv_bfloat16* xr = x + (size_t)min(g, m - 1) * ldx + 16 * q;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int base = warp * U;
  for (; base + U <= groups; base += WARPS * U) {
    Groups<U> now;
    now.template load<false, VEC>(base, groups, cg, ch, absmax, sg0, sh0, block_shift);
    now.template add_to<false>(acc, t, base, groups, xr);
  }
  if (base < groups) {
    Groups<U> now;
    now.template load<true, VEC>(base, groups, cg, ch, absmax, sg0, sh0, block_shift);
    now.template add_to<true>(acc, t, base, groups, xr);
  }
  // lane (g, q) holds output rows g, g + 8 for x's rows 2q, 2q + 1
  __shared__ float sums[WARPS][16 * 8];
  sums[warp][g * 8 + 2 * q] = acc[0];
  sums[warp][g * 8 + 2 * q + 1] = acc[1];
  sums[warp][(g + 8) * 8 + 2 * q] = acc[2];
  sums[warp][(g + 8) * 8 + 2 * q + 1] = acc[3];
  __syncthreads();
  for (int e = threadIdx.x; e < 16 * 8; e += WARPS * 32) {
    const int r = e / 8, i = e % 8, row = n0 + r;
    if (i < m && row < n) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v += sums[w][e];
      if (bias != nullptr) v += __bfloat162float(bias[row]);
      if (lb != nullptr) {  // as transformers rounds it: the base linear's output in bf16, plus LoRA's
        float l = 0.f;
        for (int j = 0; j < lr; ++j) l += __bfloat162float(lb[(size_t)row * lr + j]) * lora_t[i * lr + j];
        v = __bfloat162float(__float2bfloat16(v)) + l * lscale;
      }
      out[(size_t)i * n + row] = __float2bfloat16(v);
    }
  }
}

torch::Tensor rows_product(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax,
                           c10::optional<torch::Tensor> bias, int64_t n, int64_t blocksize,
                           std::vector<int64_t> planes, int64_t warps, int64_t unroll, int64_t per_sm,
                           c10::optional<torch::Tensor> lora_t, c10::optional<torch::Tensor> lora_b,
                           double lora_scale) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x: 2-D bf16 on CUDA");
  const int m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= 8 && k % 64 == 0 && x.stride(0) % 8 == 0 && (uintptr_t)x.data_ptr() % 16 == 0 &&
              (uintptr_t)codes.data_ptr() % 8 == 0, "x: 1 to 8 rows of whole 64-column groups, 16-byte aligned");
  TORCH_CHECK(codes.numel() * 2 == n * (int64_t)k && absmax.scalar_type() == at::kFloat, "codes and float32 absmax");
  TORCH_CHECK(blocksize >= 64 && (blocksize & (blocksize - 1)) == 0, "blocks of a power of two from 64 codes");
  TORCH_CHECK(lora_t.has_value() == lora_b.has_value(), "LoRA: both t and B, or neither");
  int lp = 0, lr = 0;
  if (lora_t.has_value()) {
    lp = lora_t->size(1), lr = lora_t->size(2);
    TORCH_CHECK(lora_t->scalar_type() == at::kFloat && lora_t->dim() == 3 && lora_t->size(0) == m &&
                lora_t->is_contiguous() && lr <= MAX_RANK,
                "LoRA t: [rows, partials, rank <= ", MAX_RANK, "] float32");
    TORCH_CHECK(lora_b->scalar_type() == at::kBFloat16 && lora_b->dim() == 2 && lora_b->size(0) == n &&
                lora_b->size(1) == lr && lora_b->is_contiguous(), "LoRA B: [n, rank] bf16");
  }
  Planes t;
  for (int i = 0; i < 8; ++i) t.p[i] = (uint32_t)planes[i];
  const int shift = __builtin_ctzll(blocksize);
  auto out = torch::empty({m, n}, x.options());
  dim3 grid((n + 15) / 16);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto bf16 = [](const torch::Tensor& v) {
    return reinterpret_cast<const __nv_bfloat16*>(v.data_ptr<at::BFloat16>());
  };
  const __nv_bfloat16* xp = bf16(x);
  const __nv_bfloat16* bp = bias.has_value() ? bf16(*bias) : nullptr;
  const float* tp = lora_t.has_value() ? lora_t->data_ptr<float>() : nullptr;
  const __nv_bfloat16* lbp = lora_b.has_value() ? bf16(*lora_b) : nullptr;
  auto* cp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  auto* op = reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>());
  const float* ap = absmax.data_ptr<float>();
  const int ldx = x.stride(0);
  const bool vec = blocksize == 64 && k % 256 == 0 && (uintptr_t)ap % 16 == 0;  // four scales a load
#define MERAK_LAUNCH(W, U, B)                                                                                \
  if (warps == W && unroll == U && per_sm == B) {                                                            \
    auto kernel = vec ? four_bit_mma<W, U, B, true> : four_bit_mma<W, U, B, false>;                          \
    kernel<<<grid, W * 32, 0, stream>>>(xp, ldx, m, cp, ap, bp, op, n, k, shift, t, tp, lp, lr, lbp,         \
                                        (float)lora_scale);                                                  \
  } else
  MERAK_LAUNCH(16, 4, 2) MERAK_LAUNCH(8, 8, 2) MERAK_LAUNCH(8, 4, 2) MERAK_LAUNCH(8, 4, 4)
  TORCH_CHECK(false, "no such launch: ", warps, " warps, ", unroll, " groups at once, ", per_sm,
              " blocks a multiprocessor");
#undef MERAK_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
"""

_CPP = ("torch::Tensor rows_product(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax, "
        "c10::optional<torch::Tensor> bias, int64_t n, int64_t blocksize, std::vector<int64_t> planes, "
        "int64_t warps, int64_t unroll, int64_t per_sm, c10::optional<torch::Tensor> lora_t, "
        "c10::optional<torch::Tensor> lora_b, double lora_scale);")

def build():
    """Compile the product (PyTorch caches the build on disk); raises what the compiler says."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("merak_lora_four_bit_rows", _CPP, cuda_sources=_SOURCE, functions=["rows_product"],
                       extra_cuda_cflags=["-O3", f"-DMERAK_MAX_RANK={MAX_RANK}"], verbose=False)


@functools.cache
def extension():
    """The compiled product (built once per process), or a string saying why it is not there (logged once)."""
    log.info("building merak-lora's 4-bit CUDA product (once; PyTorch keeps the build)")
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - no nvcc, another CUDA, a compiler error: bitsandbytes' product serves
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e) else ''}"
        log.warning(f"4-bit products stay bitsandbytes': merak-lora's CUDA product did not build ({why})")
        return why


def _weight(product) -> tuple | None:
    """(codes, quant state, bias) of a 4-bit base product: shared_products.Joined4bit or bitsandbytes' Linear4bit."""
    from .shared_products import Joined4bit
    if isinstance(product, Joined4bit):
        return product.codes, product.state, product.bias
    if type(product).__module__.startswith("bitsandbytes") and type(product).__name__ == "Linear4bit":
        return product.weight.data, product.weight.quant_state, product.bias
    return None


def unserved(product, dtype: torch.dtype, rows: int) -> str | None:
    """Why merak-lora's product cannot stand in for this base product, or None if it can (before building)."""
    weight = _weight(product)
    if weight is None:
        return "not a 4-bit weight"
    codes, state, _ = weight
    if codes.device.type != "cuda":
        return "not on a CUDA device"
    if dtype != torch.bfloat16:
        return f"read in {dtype}, not bf16"
    if rows > MAX_ROWS:
        return f"{rows} rows, more than {MAX_ROWS}"
    blocks = state.blocksize
    if state.nested or state.quant_type not in ("nf4", "fp4") or blocks < 64 or blocks & (blocks - 1) \
            or state.shape[1] % 64 or codes.data_ptr() % 8:
        return "its scales are quantized a second time, or its blocks are not whole 64-code groups"
    return None


def launch_for(n: int, multiprocessors: int) -> tuple:
    """(warps, groups at once, blocks a multiprocessor) for a product of n output rows: MANY_TILES past two
    waves of LAUNCH's blocks."""
    return MANY_TILES if -(-n // 16) > 2 * LAUNCH[2] * multiprocessors else LAUNCH


def product_for(product, dtype: torch.dtype, rows: int):
    """merak-lora's product in place of a 4-bit base product for `rows` rows in bf16, or None where it does not
    serve (`unserved`, or no build). It is called as the fused step calls every product: (x, lora) -> (y, the LoRA
    left to add), lora being (t [rows, partials, rank] fp32, B [n, rank], scale) or None; it adds LoRA of rank up
    to MAX_RANK itself."""
    if unserved(product, dtype, rows) is not None:
        return None
    ext = extension()
    if isinstance(ext, str):
        return None
    codes, state, bias = _weight(product)
    n = state.shape[0]
    launch = launch_for(n, torch.cuda.get_device_properties(codes.device).multi_processor_count)
    table, absmax = planes(state.code), state.absmax.float()
    bias = None if bias is None else bias.to(torch.bfloat16)

    def run(x: torch.Tensor, lora: tuple | None = None) -> tuple:
        t, b, scale = (None, None, 0.0) if lora is None or lora[1].shape[1] > MAX_RANK else lora
        y = ext.rows_product(x, codes, absmax, bias, n, state.blocksize, table, *launch, t, b, scale)
        return y, (lora if t is None else None)
    return run


def planes(table: torch.Tensor) -> list[int]:
    """The 16 values rounded to bf16 as eight 32-bit registers: low bytes of entries 0-3, 4-7, 8-11, 12-15, then
    the high bytes."""
    bits = [int(v) & 0xFFFF for v in table.float().cpu().to(torch.bfloat16).view(torch.int16).tolist()]
    return [sum(((bits[first + j] >> shift) & 0xFF) << (8 * j) for j in range(4))
            for shift in (0, 8) for first in range(0, 16, 4)]
