"""LoRA's down projection with its dropout drawn inside the product: `dropout(x) @ A.T` as one Triton kernel that
reads x once, and a backward that draws the same mask again from a saved seed.

Why not the compiler's dropout: inductor writes each target's dropped copy of its input and reads it back for the
product, and draws one Philox call per element (the dropout kernels were 11% of a compiled Llama step's GPU time,
bench/PERF_NOTES.md). Here one Philox call gives the mask of 8 consecutive elements (16 random bits each), nothing of
the size of x is written in the forward, and the backward writes only the input gradient. The mask is a function of
(seed, row, column) alone, so the forward, the backward and `dropout_mask` agree whatever their tiling.

The kernels run where Triton runs: CUDA devices, or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, how
the tests run them). Elsewhere `_lora_linear_forward` keeps the compiler's dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: the fused path is simply not used
    triton = None

BITS = 16  # random bits per element: the drop probability is rounded to a multiple of 2**-16
GROUP = 8  # elements per Philox call (4 words of 32 bits, two elements each)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: a CUDA device, or any under Triton's interpreter."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run on x's device, and x's rows split into whole Philox groups."""
    return x.shape[-1] % GROUP == 0 and runs_on(x.device)


def _threshold(p: float) -> tuple[int, float]:
    """The 16-bit threshold below which an element is dropped, and the scale that keeps the expectation exact."""
    t = round(p * (1 << BITS))
    return t, (1 << BITS) / ((1 << BITS) - t)


if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _bits(seed, rows, group0, K, BM: tl.constexpr, BK: tl.constexpr):
        """16 random bits for each element of the [BM, BK] tile whose first column is 8 * group0."""
        G: tl.constexpr = BK // 8
        offsets = rows[:, None] * (K // 8) + (group0 + tl.arange(0, G))[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, offsets)
        words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [BM, G, 2, 2]
        halves = tl.join(words & 0xFFFF, words >> 16)  # [BM, G, 2, 2, 2]
        return tl.reshape(halves, (BM, BK))

    @triton.jit
    def _mask_kernel(out_ptr, seed_ptr, M, K, threshold, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        u = _bits(tl.load(seed_ptr), rows, tl.program_id(1) * (BK // 8), K, BM, BK)
        keep = u >= threshold
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
                 mask=(rows < M)[:, None] & (cols < K)[None, :])

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, R, stride_x, stride_a, threshold, scale,
                     BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                        mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0)
            x = tl.where(_bits(seed, rows, k0 // 8, K, BM, BK) >= threshold, x, 0.0)
            a_t = tl.load(a_ptr + rr[None, :] * stride_a + cols[:, None],
                          mask=(rr < R)[None, :] & (cols < K)[:, None], other=0.0).to(x.dtype)
            acc = tl.dot(x.to(DOT), a_t.to(DOT), acc, input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * R + rr[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (rr < R)[None, :])

    @triton.jit
    def _down_backward_kernel(g_ptr, x_ptr, a_ptr, gx_ptr, ga_ptr, seed_ptr, M, K, R, stride_x, stride_a,
                              rows_per_program, threshold, scale, WANT_GX: tl.constexpr,
                              BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        """One column block of A's gradient over one slice of the rows (added atomically), and that block of
        the input gradient for those rows."""
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        rr = tl.arange(0, RP)
        seed = tl.load(seed_ptr)
        a = tl.load(a_ptr + rr[:, None] * stride_a + cols[None, :],
                    mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        ga = tl.zeros((RP, BK), dtype=tl.float32)
        first = tl.program_id(1) * rows_per_program
        for m0 in range(first, first + rows_per_program, BM):
            rows = m0 + tl.arange(0, BM)
            in_rows = (rows < M)[:, None]
            g = tl.load(g_ptr + rows[:, None] * R + rr[None, :], mask=in_rows & (rr < R)[None, :], other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=in_rows & (cols < K)[None, :],
                        other=0.0)
            keep = _bits(seed, rows, tl.program_id(0) * (BK // 8), K, BM, BK) >= threshold
            ga = tl.dot(tl.trans(g).to(DOT), tl.where(keep, x, 0.0).to(DOT), ga, input_precision=PRECISION)
            if WANT_GX:
                gx = tl.dot(g.to(DOT), a.to(DOT), input_precision=PRECISION)
                tl.store(gx_ptr + rows[:, None] * K + cols[None, :],
                         tl.where(keep, gx * scale, 0.0).to(gx_ptr.dtype.element_ty),
                         mask=in_rows & (cols < K)[None, :])
        tl.atomic_add(ga_ptr + rr[:, None] * K + cols[None, :], ga * scale, mask=(rr < R)[:, None] & (cols < K)[None, :])


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dot_options(x: torch.Tensor) -> dict:
    """How the tiles are multiplied: in x's dtype (fp32 without TF32 rounding), except under Triton's interpreter,
    whose bf16 products are wrong (triton 3.9), where they are multiplied in fp32."""
    dot = _TL_DTYPES[x.dtype] if x.is_cuda else tl.float32
    return {"PRECISION": "ieee" if dot == tl.float32 else "tf32", "DOT": dot}


def dropout_mask(seed: torch.Tensor, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The keep mask (bool, [rows, columns]) the kernels draw for `seed`: for tests and for reading."""
    m, k = shape
    threshold, _ = _threshold(p)
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    _mask_kernel[(triton.cdiv(m, 32), triton.cdiv(k, 64))](out, seed, m, k, threshold, BM=32, BK=64)
    return out.bool()


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernels' block sizes: rows and columns per tile, warps, and backward programs per multiprocessor.
    The fastest of bench/lora_dropout.py's sweep on one H100 over 6144 rows of 4096 and of 14336 columns:
    forward 41 and 123 us, backward 62 and 182 us (the first choice, 32-row tiles throughout: 44 and ~135, 75 and
    ~260)."""
    bm: int = 16
    bk: int = 256
    warps: int = 4
    back_bm: int = 16
    back_bk: int = 128
    back_warps: int = 4
    programs_per_sm: int = 8


TILES = Tiles()


def launch_down(x2: torch.Tensor, a: torch.Tensor, out: torch.Tensor, seed: torch.Tensor, p: float,
                tiles: Tiles = TILES) -> None:
    """out[M, R] = dropout(x2) @ a.T: one program per `bm` rows, looping over the columns."""
    m, k = x2.shape
    threshold, scale = _threshold(p)
    _down_kernel[(triton.cdiv(m, tiles.bm),)](
        x2, a, out, seed, m, k, a.shape[0], x2.stride(0), a.stride(0), threshold, scale, BM=tiles.bm,
        BK=tiles.bk, RP=_rank_pad(a.shape[0]), num_warps=tiles.warps, **_dot_options(x2))


def launch_down_backward(g2: torch.Tensor, x2: torch.Tensor, a: torch.Tensor, gx: torch.Tensor,
                         ga: torch.Tensor, seed: torch.Tensor, p: float, want_gx: bool,
                         tiles: Tiles = TILES) -> None:
    """ga[R, K] += the gradient for a (fp32, zeroed by the caller); gx[M, K] = the gradient for x2 if want_gx.
    Programs are column blocks times slices of the rows, enough of them to fill the GPU."""
    m, k = x2.shape
    threshold, scale = _threshold(p)
    col_blocks = triton.cdiv(k, tiles.back_bk)
    programs = (torch.cuda.get_device_properties(x2.device).multi_processor_count * tiles.programs_per_sm
                if x2.is_cuda else 4)
    splits = max(1, min(triton.cdiv(m, tiles.back_bm), programs // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(m, splits), tiles.back_bm) * tiles.back_bm
    _down_backward_kernel[(col_blocks, triton.cdiv(m, rows_per_program))](
        g2, x2, a, gx, ga, seed, m, k, a.shape[0], x2.stride(0), a.stride(0), rows_per_program, threshold, scale,
        WANT_GX=want_gx, BM=tiles.back_bm, BK=tiles.back_bk, RP=_rank_pad(a.shape[0]),
        num_warps=tiles.back_warps, **_dot_options(x2))


@torch.library.custom_op("merak_lora::dropped_down", mutates_args=())
def dropped_down(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ a.T in x's dtype, the mask drawn from `seed` (an int64 tensor of one element)."""
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], a.shape[0], dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        launch_down(x2, a, out, seed, p)
    return out.view(*x.shape[:-1], a.shape[0])


@dropped_down.register_fake
def _(x, a, seed, p):
    return x.new_empty(*x.shape[:-1], a.shape[0])


@torch.library.custom_op("merak_lora::dropped_down_backward", mutates_args=())
def dropped_down_backward(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
                          want_gx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `dropped_down` for x (empty unless want_gx) and for a, from the same mask."""
    x2 = _rows(x)
    m, k = x2.shape
    gx = torch.empty((m, k) if want_gx else (0,), dtype=x.dtype, device=x.device)
    ga = torch.zeros(a.shape[0], k, dtype=torch.float32, device=x.device)
    if m:
        launch_down_backward(g.reshape(m, a.shape[0]).contiguous(), x2, a, gx, ga, seed, p, want_gx)
    return (gx.view(x.shape) if want_gx else gx), ga.to(a.dtype)


@dropped_down_backward.register_fake
def _(g, x, a, seed, p, want_gx):
    return x.new_empty(x.shape if want_gx else (0,)), a.new_empty(a.shape)


def _setup(ctx, inputs, output):
    x, a, seed, p = inputs
    ctx.save_for_backward(x, a, seed)
    ctx.p = p


def _backward(ctx, g):
    x, a, seed = ctx.saved_tensors
    gx, ga = dropped_down_backward(g, x, a, seed, ctx.p, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None), (ga if ctx.needs_input_grad[1] else None), None, None


dropped_down.register_autograd(_backward, setup_context=_setup)


def new_seed(device: torch.device) -> torch.Tensor:
    """A mask seed drawn from the device's generator, so AdapterSwitch's streams and a resumed run's restored RNG
    state decide the masks as they decide the compiler's dropout."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def disagreement(device: torch.device, dtype: torch.dtype, rank: int, m: int = 48, k: int = 256) -> str | None:
    """Why the kernels cannot be trusted on `device` for activations of `dtype` and adapters of `rank` (they
    raise, or their forward or gradients on an [m, k] input differ from torch's with the same mask), or None. A
    Triton build that miscompiles them gives wrong adapter gradients rather than an error (bench/PERF_NOTES.md
    records such a fault in a variant of the backward, on an H100 only), so a stage checks once before it trains.
    Draws nothing from the device's generator: the masks of the run stay as they were."""
    p = 0.25  # a multiple of 2**-16: the kernels' scale is exactly 1 / (1 - p)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype).requires_grad_(True)
    a = torch.randn(rank, k, generator=gen, device=device).requires_grad_(True)
    up = torch.randn(m, rank, generator=gen, device=device).to(dtype)
    seed = torch.tensor([20261124], dtype=torch.int64, device=device)
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            out = dropped_down(x, a, seed, p)
            got = (out, *torch.autograd.grad(out, (x, a), up))
            keep = dropout_mask(seed, (m, k), p, device)
    except Exception as e:  # noqa: BLE001 - whatever Triton raises, the compiler's dropout still serves
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    x_ref, a_ref = x.detach().float().requires_grad_(True), a.detach().clone().requires_grad_(True)
    want = (x_ref * keep / (1 - p)) @ a_ref.to(dtype).float().t()
    wanted = (want, *torch.autograd.grad(want, (x_ref, a_ref), up.float()))
    for what, mine, ref in zip(("output", "input gradient", "A's gradient"), got, wanted):
        err = ((mine.float() - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:  # bf16: one rounding of the result, 2**-8
            return f"its {what} is off torch's by {err:.3g} of the largest entry"
    return None
