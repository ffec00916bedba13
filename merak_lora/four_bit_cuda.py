"""A 4-bit (bitsandbytes NF4/FP4) weight times a few bf16 rows in CUDA C++, for the fused one-token step.

bitsandbytes' own product for one to a few rows reads its packed codes at 0.9-1.2 TB/s on an H100, 30-40% of a
device copy, and two Triton products that look codes up differently were slower still (bench/RESULTS.md): Triton
gives no say over registers and occupancy, which this product is bound by. Here one block of 128 threads computes a
few output rows; each thread takes 16-byte pieces (32 codes, half a block of 64) of all of them at one column
range, so the 32 x values it converts to float32 serve every row. The 16 table values, rounded to bf16, sit in
eight registers as byte planes, and `prmt` looks up four codes an instruction and half-table. Each piece's sum is
scaled once by its block's absmax. Built on first use with PyTorch's extension loader (nvcc); where that fails the
step keeps bitsandbytes' product and the log says why once.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("merak_lora")

MAX_ROWS = 8

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

// the eight codes of w (nibble 0 first) as float32 table values
__device__ __forceinline__ void lookup8(uint32_t w, const Planes& t, float* f) {
  uint32_t s = w & 0x77777777u;
  uint32_t h = ((w >> 1) & 0x44444444u) | 0x32103210u;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint32_t lo = prmt(prmt(t.p[0], t.p[1], s), prmt(t.p[2], t.p[3], s), h);
    uint32_t hi = prmt(prmt(t.p[4], t.p[5], s), prmt(t.p[6], t.p[7], s), h);
    uint32_t a = prmt(lo, hi, 0x5140u), b = prmt(lo, hi, 0x7362u);
    f[4 * half + 0] = __uint_as_float(a << 16);
    f[4 * half + 1] = __uint_as_float(a & 0xffff0000u);
    f[4 * half + 2] = __uint_as_float(b << 16);
    f[4 * half + 3] = __uint_as_float(b & 0xffff0000u);
    s >>= 16;
    h >>= 16;
  }
}

template <int XR, int ROWS>
__global__ void __launch_bounds__(128) four_bit_rows(
    const __nv_bfloat16* __restrict__ x, int ldx, int m, const uint4* __restrict__ codes,
    const float* __restrict__ absmax, const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ out,
    int ldo, int n, int k, int blocksize, Planes t) {
  const int pieces = k / 32;
  const int n0 = blockIdx.x * ROWS;
  float acc[XR][ROWS];
#pragma unroll
  for (int i = 0; i < XR; ++i)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[i][r] = 0.f;
  for (int c = threadIdx.x; c < pieces; c += blockDim.x) {
    uint4 q[ROWS];
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = min(n0 + r, n - 1);
      q[r] = __ldg(codes + (size_t)row * pieces + c);
      s[r] = __ldg(absmax + ((size_t)row * k + (size_t)c * 32) / blocksize);
    }
#pragma unroll
    for (int i = 0; i < XR; ++i) {
      // xv[j] pairs with nibble j: element 2i + 1 of a byte's pair sits in nibble 2i, element 2i in nibble 2i + 1
      const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)min(i, m - 1) * ldx + (size_t)c * 32);
      float xv[32];
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint4 u = __ldg(xp + v);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          xv[8 * v + 2 * j + 1] = __uint_as_float(w[j] << 16);
          xv[8 * v + 2 * j] = __uint_as_float(w[j] & 0xffff0000u);
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t ws[4] = {q[r].x, q[r].y, q[r].z, q[r].w};
        float part = 0.f;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float f[8];
          lookup8(ws[v], t, f);
#pragma unroll
          for (int j = 0; j < 8; ++j) part = fmaf(f[j], xv[8 * v + j], part);
        }
        acc[i][r] = fmaf(part, s[r], acc[i][r]);
      }
    }
  }
  __shared__ float sums[4][XR * ROWS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < XR; ++i)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) sums[warp][i * ROWS + r] = v;
    }
  __syncthreads();
  if (threadIdx.x < XR * ROWS) {
    const int i = threadIdx.x / ROWS, r = threadIdx.x % ROWS, row = n0 + r;
    if (i < m && row < n) {
      float v = sums[0][threadIdx.x] + sums[1][threadIdx.x] + sums[2][threadIdx.x] + sums[3][threadIdx.x];
      if (bias != nullptr) v += __bfloat162float(bias[row]);
      out[(size_t)i * ldo + row] = __float2bfloat16(v);
    }
  }
}

template <int XR>
void launch_rows(int rows, dim3 grid, cudaStream_t stream, const __nv_bfloat16* x, int ldx, int m, const uint4* codes,
                 const float* absmax, const __nv_bfloat16* bias, __nv_bfloat16* out, int ldo, int n, int k, int bs,
                 Planes t) {
  if (rows == 2)
    four_bit_rows<XR, 2><<<grid, 128, 0, stream>>>(x, ldx, m, codes, absmax, bias, out, ldo, n, k, bs, t);
  else if (rows == 8)
    four_bit_rows<XR, 8><<<grid, 128, 0, stream>>>(x, ldx, m, codes, absmax, bias, out, ldo, n, k, bs, t);
  else
    four_bit_rows<XR, 4><<<grid, 128, 0, stream>>>(x, ldx, m, codes, absmax, bias, out, ldo, n, k, bs, t);
}

torch::Tensor rows_product(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax,
                           c10::optional<torch::Tensor> bias, int64_t n, int64_t blocksize,
                           std::vector<int64_t> planes, int64_t rows) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              "x: 2-D bf16 on CUDA");
  const int m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= 8 && k % 32 == 0 && x.stride(0) % 8 == 0 && (uintptr_t)x.data_ptr() % 16 == 0 &&
              (uintptr_t)codes.data_ptr() % 16 == 0, "x: 1 to 8 rows of whole 32-column pieces, 16-byte aligned");
  TORCH_CHECK(codes.numel() * 2 == n * (int64_t)k && absmax.scalar_type() == at::kFloat, "codes and float32 absmax");
  Planes t;
  for (int i = 0; i < 8; ++i) t.p[i] = (uint32_t)planes[i];
  auto out = torch::empty({m, n}, x.options());
  const int per = (rows == 2 || rows == 8) ? rows : 4;
  dim3 grid((n + per - 1) / per);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>());
  auto* cp = reinterpret_cast<const uint4*>(codes.data_ptr());
  const __nv_bfloat16* bp =
      bias.has_value() ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>());
  const float* ap = absmax.data_ptr<float>();
  const int ldx = x.stride(0), ldo = n;
  if (m == 1) launch_rows<1>(per, grid, stream, xp, ldx, m, cp, ap, bp, op, ldo, n, k, blocksize, t);
  else if (m == 2) launch_rows<2>(per, grid, stream, xp, ldx, m, cp, ap, bp, op, ldo, n, k, blocksize, t);
  else if (m <= 4) launch_rows<4>(per, grid, stream, xp, ldx, m, cp, ap, bp, op, ldo, n, k, blocksize, t);
  else launch_rows<8>(per, grid, stream, xp, ldx, m, cp, ap, bp, op, ldo, n, k, blocksize, t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
"""

_CPP = ("torch::Tensor rows_product(torch::Tensor x, torch::Tensor codes, torch::Tensor absmax, "
        "c10::optional<torch::Tensor> bias, int64_t n, int64_t blocksize, std::vector<int64_t> planes, int64_t rows);")

def build():
    """Compile the product (PyTorch caches the build on disk); raises what the compiler says."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("merak_lora_four_bit_rows", _CPP, cuda_sources=_SOURCE, functions=["rows_product"],
                       extra_cuda_cflags=["-O3"], verbose=False)


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
    if state.nested or state.quant_type not in ("nf4", "fp4") or state.blocksize % 32 or state.shape[1] % 32 \
            or codes.data_ptr() % 16:
        return "its scales are quantized a second time, or its blocks are not whole 32-code pieces"
    return None


def product_for(product, dtype: torch.dtype, rows: int):
    """merak-lora's product in place of a 4-bit base product for `rows` rows in bf16, or None where it does not
    serve (`unserved`, or no build)."""
    if unserved(product, dtype, rows) is not None:
        return None
    ext = extension()
    if isinstance(ext, str):
        return None
    codes, state, bias = _weight(product)
    n = state.shape[0]
    table, absmax = planes(state.code), state.absmax.float()
    bias = None if bias is None else bias.to(torch.bfloat16)
    per = 4 if rows > 1 else 8 if n > 16384 else 2  # rows a block: the fastest at 8B's shapes (bench/RESULTS.md)
    return lambda x: ext.rows_product(x, codes, absmax, bias, n, state.blocksize, table, per)


def planes(table: torch.Tensor) -> list[int]:
    """The 16 values rounded to bf16 as eight 32-bit registers: low bytes of entries 0-3, 4-7, 8-11, 12-15, then
    the high bytes."""
    bits = [int(v) & 0xFFFF for v in table.float().cpu().to(torch.bfloat16).view(torch.int16).tolist()]
    return [sum(((bits[first + j] >> shift) & 0xFF) << (8 * j) for j in range(4))
            for shift in (0, 8) for first in range(0, 16, 4)]
