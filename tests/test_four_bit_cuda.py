"""merak-lora's CUDA 4-bit product (four_bit_cuda.py): the byte planes its look-up reads hold the table's bf16
values, it stands aside where it does not serve, and on a CUDA machine it computes what the codes decoded in
float64 give (run by hand there: CI has no GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from merak_lora import four_bit_cuda
from merak_lora.four_bit_cuda import LAUNCH, MANY_TILES, launch_for, planes, product_for, unserved

NO_BNB = importlib.util.find_spec("bitsandbytes") is None


def test_planes_hold_each_value_rounded_to_bf16():
    table = torch.randn(16)
    words = planes(table)
    assert len(words) == 8 and all(0 <= w < 2**32 for w in words)
    for c in range(16):
        lo = (words[c // 4] >> (8 * (c % 4))) & 0xFF
        hi = (words[4 + c // 4] >> (8 * (c % 4))) & 0xFF
        value = torch.tensor([lo | hi << 8], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        assert value.item() == table[c].to(torch.bfloat16).float().item()


def test_blocks_of_eight_warps_only_past_two_waves_of_sixteen_warp_blocks():
    """At 8B on an H100 (132 multiprocessors) gate and up's 1,792 tiles of 16 rows take MANY_TILES; q, k, v's 384,
    o's and down's 256 keep LAUNCH, as does the row count just at two waves."""
    assert launch_for(2 * 14336, 132) == MANY_TILES
    assert all(launch_for(n, 132) == LAUNCH for n in (6144, 4096, 16 * 2 * LAUNCH[2] * 132))
    assert launch_for(16 * 2 * LAUNCH[2] * 132 + 1, 132) == MANY_TILES


@pytest.mark.skipif(NO_BNB, reason="needs bitsandbytes")
def test_it_stands_aside_where_it_does_not_serve(monkeypatch):
    """A plain linear, a 4-bit weight off CUDA, read in fp32, for more rows than it takes, with scale blocks that
    are not whole 64-code groups, or with scales quantized twice: the base's own product serves, and nothing is
    built for it."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)
    layer = layer.to("cpu")  # quantizes on the CPU
    assert unserved(torch.nn.Linear(64, 32), torch.bfloat16, 1) == "not a 4-bit weight"
    assert unserved(layer, torch.bfloat16, 1) == "not on a CUDA device"
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))  # as if on a GPU
    assert unserved(layer, torch.float32, 1) == "read in torch.float32, not bf16"
    assert unserved(layer, torch.bfloat16, 9) == "9 rows, more than 8"
    assert unserved(layer, torch.bfloat16, 8) is None
    state = layer.weight.quant_state
    for blocks in (32, 96):  # scale blocks of fewer than 64 codes, or of no power of two: not whole groups
        state.blocksize = blocks
        assert "not whole 64-code groups" in unserved(layer, torch.bfloat16, 1)
    state.blocksize = 256
    assert unserved(layer, torch.bfloat16, 1) is None
    state.nested = True
    assert "quantized a second time" in unserved(layer, torch.bfloat16, 1)
    monkeypatch.undo()
    monkeypatch.setattr(four_bit_cuda, "build", lambda: pytest.fail("built for a product it does not serve"))
    assert product_for(layer, torch.bfloat16, 1) is None


@pytest.mark.skipif(not torch.cuda.is_available() or NO_BNB, reason="needs a CUDA device and bitsandbytes")
@pytest.mark.parametrize("launch", [LAUNCH, MANY_TILES])
@pytest.mark.parametrize("quant_type, rows, bias, blocksize, k", [
    ("nf4", 1, False, 64, 2112), ("fp4", 3, True, 64, 2112), ("nf4", 8, True, 64, 2112), ("nf4", 2, False, 256, 2112),
    ("nf4", 1, True, 64, 2304)])  # 2112: groups a warp takes clamped to the row; 2304: four scales a load
def test_product_equals_the_codes_decoded_in_float64(quant_type, rows, bias, blocksize, k, launch, monkeypatch):
    import bitsandbytes as bnb

    from merak_lora.four_bit_cuda import extension
    assert not isinstance(extension(), str), extension()
    n = 1000  # not a multiple of the rows a block computes
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.bfloat16, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=False, blocksize=blocksize)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16))
    layer = layer.cuda()
    state = layer.weight.quant_state
    monkeypatch.setattr(four_bit_cuda, "launch_for", lambda n, multiprocessors: launch)
    product = product_for(layer, torch.bfloat16, rows)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    codes = layer.weight.data.view(-1)
    unpacked = torch.stack([codes >> 4, codes & 15], 1).view(n, k).long()
    values = state.code.float().to(torch.bfloat16).double()[unpacked]
    want = x.double() @ (values * state.absmax.double().repeat_interleave(state.blocksize).view(n, k)).T
    if bias:
        want += layer.bias.double()
    got, left = product(x)
    assert left is None and got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # the outputs are rounded to bf16 (relative 2**-9 at most), the sums are fp32
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or NO_BNB, reason="needs a CUDA device and bitsandbytes")
@pytest.mark.parametrize("rows, rank", [(1, 8), (5, 24), (8, 128)])
def test_product_adds_the_lora_up_projection_as_it_writes(rows, rank):
    """With (t, B, scale), t being [rows, partials, rank] down-projection partials: base output rounded to bf16,
    plus scale * B @ (t summed over partials), rounded again, as transformers rounds a LoRA linear's output; and
    a rank past MAX_RANK is handed back for the next kernel to add."""
    import bitsandbytes as bnb

    from merak_lora.four_bit_cuda import MAX_RANK
    n, k = 1000, 2112
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)
    layer.bias = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16))
    layer = layer.cuda()
    product = product_for(layer, torch.bfloat16, rows)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    base, left = product(x)
    assert left is None
    t = torch.randn(rows, 3, rank, device="cuda")
    b = torch.randn(n, rank, device="cuda").to(torch.bfloat16)
    got, left = product(x, (t, b, 0.25))
    want = base.double() + 0.25 * (t.double().sum(1) @ b.double().T)
    assert left is None
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-2)
    wide = (torch.randn(rows, 1, MAX_RANK + 1, device="cuda"), torch.randn(n, MAX_RANK + 1, device="cuda"), 1.0)
    got, left = product(x, wide)
    assert left is wide and torch.equal(got, base)
