"""How far the 4-bit product (merak_lora/four_bit_cuda.py) is from its own loads: at a model's decode shapes and
one row, the product against a kernel that issues the product's loads alone (the same launch, addresses and
instructions: each lane's 8 bytes of rows g and g + 8 for four 64-code groups a batch, the batch's scales in two
16-byte loads) and folds them into one word, against the same bytes read in order 16 a lane, and a device copy.
What the product takes beyond its loads alone is the look-up and the products. Timed as CUDA-graph replays over
weight copies past the L2, as bench/four_bit_cuda.py does.

    python bench/four_bit_loads.py [--arch llama3-8b|llama3-70b]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, markdown_table, report  # noqa: E402
from bench.four_bit_cuda import replay_us, shapes  # noqa: E402

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdint>

__device__ __forceinline__ uint2 stream8(const uint8_t* p) {  // the product's load: 8 bytes L1 does not keep
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <int WARPS, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) product_loads(const uint8_t* __restrict__ codes,
                                                                  const float* __restrict__ absmax, int n, int k,
                                                                  uint32_t* sink) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * 16, groups = k / 64;
  const int rg = min(n0 + g, n - 1), rh = min(n0 + g + 8, n - 1);
  const uint8_t* cg = codes + (size_t)rg * (k / 2) + 8 * q;
  const uint8_t* ch = codes + (size_t)rh * (k / 2) + 8 * q;
  const float* ag = absmax + (size_t)rg * groups;
  const float* ah = absmax + (size_t)rh * groups;
  uint32_t acc = 0;
  for (int base = warp * 4; base + 4 <= groups; base += WARPS * 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint2 a = stream8(cg + 32 * (base + u)), b = stream8(ch + 32 * (base + u));
      acc ^= a.x ^ a.y ^ b.x ^ b.y;
    }
    const float4 s = __ldg(reinterpret_cast<const float4*>(ag + base));
    const float4 t = __ldg(reinterpret_cast<const float4*>(ah + base));
    acc ^= __float_as_uint(s.x + s.y + s.z + s.w + t.x + t.y + t.z + t.w);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // never true in practice; keeps the loads
}

__global__ void in_order(const uint4* __restrict__ p, size_t count, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

void loads(torch::Tensor codes, torch::Tensor absmax, int64_t n, int64_t k, int64_t warps, int64_t per_sm,
           torch::Tensor sink) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  uint32_t* sp = reinterpret_cast<uint32_t*>(sink.data_ptr<int>());
  const int tiles = (n + 15) / 16;
  if (warps == 16 && per_sm == 2) product_loads<16, 2><<<tiles, 512, 0, stream>>>(cp, ap, n, k, sp);
  else if (warps == 8 && per_sm == 4) product_loads<8, 4><<<tiles, 256, 0, stream>>>(cp, ap, n, k, sp);
  else TORCH_CHECK(false, "no such launch");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void read_in_order(torch::Tensor bytes, torch::Tensor sink) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  in_order<<<sms * 32, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(bytes.data_ptr<uint8_t>()), bytes.numel() / 16,
      reinterpret_cast<uint32_t*>(sink.data_ptr<int>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

_CPP = ("void loads(torch::Tensor codes, torch::Tensor absmax, int64_t n, int64_t k, int64_t warps, int64_t per_sm, "
        "torch::Tensor sink); void read_in_order(torch::Tensor bytes, torch::Tensor sink);")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b", choices=["llama3-8b", "llama3-70b"])
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()

    import bitsandbytes.functional as bf
    import torch
    from torch.utils.cpp_extension import load_inline

    from merak_lora.four_bit_cuda import build, launch_for, planes

    ext, probe = build(), load_inline("merak_lora_four_bit_loads", _CPP, cuda_sources=_SOURCE,
                                      functions=["loads", "read_in_order"], extra_cuda_cflags=["-O3"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in shapes(a.arch).items():
        codes, state = bf.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), blocksize=64,
                                        quant_type="nf4")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        table, launch = planes(state.code), launch_for(n, sms)
        nbytes = codes.numel() + state.absmax.numel() * 4
        copies = max(1, -(-150_000_000 // nbytes))  # three times the 50 MB L2
        many = [(codes.clone(), state.absmax.clone()) for _ in range(copies)]
        out = [torch.empty_like(c) for c, _ in many]
        runs = {
            "product": lambda c, s, o: ext.rows_product(x, c, s, None, n, 64, table, *launch, None, None, 0.0),
            "loads alone": lambda c, s, o: probe.loads(c, s, n, k, launch[0], launch[2], sink),
            "in order": lambda c, s, o: probe.read_in_order(c.view(-1), sink),
            "copy": lambda c, s, o: o.copy_(c),
        }
        us = {key: min(replay_us([lambda c=c, s=s, o=o, f=f: f(c, s, o) for (c, s), o in zip(many, out)], copies)
                       for _ in range(3)) for key, f in runs.items()}
        code_bytes = codes.numel()
        rows.append([name, f"{n} x {k}", "{} x {} x {}".format(*launch), f"{us['product']:.1f}",
                     f"{nbytes / us['product'] / 1e6:.2f}", f"{us['loads alone']:.1f}",
                     f"{nbytes / us['loads alone'] / 1e6:.2f}", f"{us['in order']:.1f}",
                     f"{code_bytes / us['in order'] / 1e6:.2f}", f"{2 * code_bytes / us['copy'] / 1e6:.2f}",
                     f"{us['product'] / us['loads alone']:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
        del many, out
    report(f"The 4-bit product against its loads alone, {a.arch} shapes, one row",
           markdown_table(["weight", "N x K", "launch", "product us", "TB/s", "its loads alone us", "TB/s",
                           "codes in order us", "TB/s", "copy TB/s (read + write)", "product / loads alone"], rows),
           "TB/s of the codes and scales the product reads (in order and copy: the codes). Microseconds a call: "
           "CUDA-graph replays of one call per weight copy, copies past the L2.", a.results)


if __name__ == "__main__":
    main()
