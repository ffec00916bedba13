"""LoRA's two products as Triton kernels, for compiled layers.

The down projection draws its dropout inside the product: `dropout(x) @ A.T` is one kernel that reads x once, and
its backward draws the same mask again from a saved seed. Why not the compiler's dropout: inductor writes each
target's dropped copy of its input and reads it back for the product, and draws one Philox call per element (the
dropout kernels were 11% of a compiled Llama step's GPU time, bench/PERF_NOTES.md). Here one Philox call gives the
mask of 8 consecutive elements (16 random bits each), nothing of the size of x is written in the forward, and the
backward writes only the input gradient. The mask is a function of (seed, row, column) alone, so the forward, the
backward and `dropout_mask` agree whatever their tiling. Targets that read one input (q, k, v; gate, up:
`lora.SharedInput`) share one kernel, one seed each: x is read once, and the backward writes their summed input
gradient once. A gated MLP's down projection (`lora.GatedMlp`) keeps gate and up, which the activation's backward
keeps anyway, instead of its input silu(gate) * up, and its backward forms that input again from them; on an FP8
base that backward also takes the activation's gradient on to gate and up (`swiglu_down_backward`, for `fp8_mlp`).

The up projection is added to the base output in one pass, and its backward reads the output gradient once for both
B's gradient and the low-rank one. cuBLAS's addmm and its backward's two thin products of rank 8 ran at 40-44% of
the copy rate (bench/RESULTS.md).

The kernels run where Triton runs: CUDA devices, or the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, how
the tests run them). Elsewhere `_lora_linear_forward` keeps the compiler's dropout and cuBLAS's addmm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton: the fused path is simply not used
    triton = None

BITS = 16  # random bits per element: the drop probability is rounded to a multiple of 2**-16
GROUP = 8  # elements per Philox call (4 words of 32 bits, two elements each)
MAX_TARGETS = 3  # down projections one kernel computes from one input (q, k, v)


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
    def _target_down(acc, x, a_ptr, t, seed_ptr, rows, k0, cols, K, R, stride_a, threshold,
                     BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        """acc + target t's mask on the tile x, times target t's rows of A (transposed)."""
        rr = tl.arange(0, RP)
        a_t = tl.load(a_ptr + (t * R + rr)[None, :] * stride_a + cols[:, None],
                      mask=(rr < R)[None, :] & (cols < K)[:, None], other=0.0).to(x.dtype)
        keep = _bits(tl.load(seed_ptr + t), rows, k0 // 8, K, BM, BK) >= threshold
        return tl.dot(tl.where(keep, x, 0.0).to(DOT), a_t.to(DOT), acc, input_precision=PRECISION)

    @triton.jit
    def _store_low(out_ptr, acc, t, rows, M, R, T: tl.constexpr, RP: tl.constexpr):
        rr = tl.arange(0, RP)
        tl.store(out_ptr + rows[:, None] * (T * R) + (t * R + rr)[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (rr < R)[None, :])

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, R, stride_x, stride_a, threshold, scale,
                     T: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
                     DOT: tl.constexpr):
        """For each of the T (1-3) targets sharing x, rank R each: its own mask (seed t) on x and its rows of A,
        with one read of each tile of x; out holds the targets side by side."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        acc0 = tl.zeros((BM, RP), dtype=tl.float32)
        acc1 = tl.zeros((BM, RP), dtype=tl.float32)
        acc2 = tl.zeros((BM, RP), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                        mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0)
            acc0 = _target_down(acc0, x, a_ptr, 0, seed_ptr, rows, k0, cols, K, R, stride_a, threshold,
                                BM, BK, RP, PRECISION, DOT)
            if T > 1:
                acc1 = _target_down(acc1, x, a_ptr, 1, seed_ptr, rows, k0, cols, K, R, stride_a, threshold,
                                    BM, BK, RP, PRECISION, DOT)
            if T > 2:
                acc2 = _target_down(acc2, x, a_ptr, 2, seed_ptr, rows, k0, cols, K, R, stride_a, threshold,
                                    BM, BK, RP, PRECISION, DOT)
        _store_low(out_ptr, acc0 * scale, 0, rows, M, R, T, RP)
        if T > 1:
            _store_low(out_ptr, acc1 * scale, 1, rows, M, R, T, RP)
        if T > 2:
            _store_low(out_ptr, acc2 * scale, 2, rows, M, R, T, RP)

    @triton.jit
    def _target_back(ga, gx, x, g_ptr, a_t, t, seed_ptr, rows, group0, K, R, M, threshold, T: tl.constexpr,
                     WANT_GX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                     PRECISION: tl.constexpr, DOT: tl.constexpr):
        """Target t's share of one row tile: its A gradient added to ga, its input gradient (through its mask)
        to gx."""
        rr = tl.arange(0, RP)
        g = tl.load(g_ptr + rows[:, None] * (T * R) + (t * R + rr)[None, :],
                    mask=(rows < M)[:, None] & (rr < R)[None, :], other=0.0)
        keep = _bits(tl.load(seed_ptr + t), rows, group0, K, BM, BK) >= threshold
        ga = tl.dot(tl.trans(g).to(DOT), tl.where(keep, x, 0.0).to(DOT), ga, input_precision=PRECISION)
        if WANT_GX:
            gx += tl.where(keep, tl.dot(g.to(DOT), a_t.to(DOT), input_precision=PRECISION), 0.0)
        return ga, gx

    @triton.jit
    def _a_rows(a_ptr, t, cols, K, R, stride_a, dtype, RP: tl.constexpr):
        rr = tl.arange(0, RP)
        return tl.load(a_ptr + (t * R + rr)[:, None] * stride_a + cols[None, :],
                       mask=(rr < R)[:, None] & (cols < K)[None, :], other=0.0).to(dtype)

    @triton.jit
    def _add_ga(ga_ptr, ga, t, cols, K, R, RP: tl.constexpr):
        rr = tl.arange(0, RP)
        tl.atomic_add(ga_ptr + (t * R + rr)[:, None] * K + cols[None, :], ga,
                      mask=(rr < R)[:, None] & (cols < K)[None, :])

    @triton.jit
    def _swiglu_back(gx, d_ptr, gu_ptr, amax_ptr, ws_g, ws_u, gate, sig, u, rows, cols, K, M, stride_x, inside,
                     dtype):
        """The SwiGLU's backward for one tile: the activation's gradient (the LoRA part gx plus the base
        product's d) taken to gate (written over gx's place) and up, and each row's largest |gradient x weight
        scale| in this column block (ws_*: the weights' row scales, per column here), for FP8: amax_ptr points at
        this block's entries of [2, blocks, M]."""
        dact = gx + tl.load(d_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        dgate = (dact * u * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
        dup = (dact * gate * sig).to(dtype)
        tl.store(gu_ptr + rows[:, None] * K + cols[None, :], dgate, mask=inside)
        tl.store(gu_ptr + M * K + rows[:, None] * K + cols[None, :], dup, mask=inside)
        blocks = tl.num_programs(0)
        tl.store(amax_ptr + rows, tl.max(tl.abs(dgate.to(tl.float32) * ws_g), axis=1), mask=rows < M)
        tl.store(amax_ptr + blocks * M + rows, tl.max(tl.abs(dup.to(tl.float32) * ws_u), axis=1), mask=rows < M)

    @triton.jit
    def _down_backward_kernel(g_ptr, x_ptr, u_ptr, a_ptr, gx_ptr, ga_ptr, seed_ptr, d_ptr, amax_ptr, ws_ptr, M, K,
                              R, stride_x, stride_a, rows_per_program, threshold, scale, WANT_GX: tl.constexpr,
                              T: tl.constexpr, GATED: tl.constexpr, SWIGLU: tl.constexpr, BM: tl.constexpr,
                              BK: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        """One column block of A's gradient over one slice of the rows (added atomically), and that block of
        the input gradient for those rows: the sum over the T targets, each through its own mask, written once.
        GATED: the input is silu(x) * u, computed here from the tiles of x and u (same strides). SWIGLU (with
        GATED): the input gradient goes on through the activation (`_swiglu_back`): gx_ptr receives gate's
        gradient and then up's, [2, M, K], and amax_ptr their rows' maxima per column block, [2, blocks, M]."""
        cols = tl.program_id(0) * BK + tl.arange(0, BK)
        group0 = tl.program_id(0) * (BK // 8)
        dtype = x_ptr.dtype.element_ty
        a0 = _a_rows(a_ptr, 0, cols, K, R, stride_a, dtype, RP)
        a1 = a0
        a2 = a0
        if T > 1:
            a1 = _a_rows(a_ptr, 1, cols, K, R, stride_a, dtype, RP)
        if T > 2:
            a2 = _a_rows(a_ptr, 2, cols, K, R, stride_a, dtype, RP)
        ga0 = tl.zeros((RP, BK), dtype=tl.float32)
        ga1 = tl.zeros((RP, BK), dtype=tl.float32)
        ga2 = tl.zeros((RP, BK), dtype=tl.float32)
        ws_g = tl.zeros((1, BK), dtype=tl.float32)
        ws_u = ws_g
        if SWIGLU:
            ws_g = tl.load(ws_ptr + cols, mask=cols < K, other=0.0)[None, :]
            ws_u = tl.load(ws_ptr + K + cols, mask=cols < K, other=0.0)[None, :]
        first = tl.program_id(1) * rows_per_program
        for m0 in range(first, first + rows_per_program, BM):
            rows = m0 + tl.arange(0, BM)
            inside = (rows < M)[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
            gate = x.to(tl.float32)
            sig = gate
            u = gate
            if GATED:
                sig = tl.sigmoid(gate)
                u = tl.load(u_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
                x = (gate * sig * u).to(dtype)
            gx = tl.zeros((BM, BK), dtype=tl.float32)
            ga0, gx = _target_back(ga0, gx, x, g_ptr, a0, 0, seed_ptr, rows, group0, K, R, M, threshold, T,
                                   WANT_GX, BM, BK, RP, PRECISION, DOT)
            if T > 1:
                ga1, gx = _target_back(ga1, gx, x, g_ptr, a1, 1, seed_ptr, rows, group0, K, R, M, threshold, T,
                                       WANT_GX, BM, BK, RP, PRECISION, DOT)
            if T > 2:
                ga2, gx = _target_back(ga2, gx, x, g_ptr, a2, 2, seed_ptr, rows, group0, K, R, M, threshold, T,
                                       WANT_GX, BM, BK, RP, PRECISION, DOT)
            if SWIGLU:
                _swiglu_back(gx * scale, d_ptr, gx_ptr, amax_ptr + tl.program_id(0) * M, ws_g, ws_u, gate, sig, u,
                             rows, cols, K, M, stride_x, inside, dtype)
            elif WANT_GX:
                tl.store(gx_ptr + rows[:, None] * K + cols[None, :], (gx * scale).to(gx_ptr.dtype.element_ty),
                         mask=inside)
        _add_ga(ga_ptr, ga0 * scale, 0, cols, K, R, RP)
        if T > 1:
            _add_ga(ga_ptr, ga1 * scale, 1, cols, K, R, RP)
        if T > 2:
            _add_ga(ga_ptr, ga2 * scale, 2, cols, K, R, RP)


    @triton.jit
    def _up_kernel(base_ptr, low_ptr, b_ptr, out_ptr, M, N, R, stride_base, stride_b, scale,
                   BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rr = tl.arange(0, RP)
        low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=(rows < M)[:, None] & (rr < R)[None, :],
                      other=0.0)
        b_t = tl.load(b_ptr + cols[None, :] * stride_b + rr[:, None], mask=(rr < R)[:, None] & (cols < N)[None, :],
                      other=0.0).to(low.dtype)
        up = tl.dot(low.to(DOT), b_t.to(DOT), input_precision=PRECISION)
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=inside, other=0.0)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :],
                 (base.to(tl.float32) + up * scale).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _up_backward_kernel(g_ptr, low_ptr, b_ptr, glow_ptr, gb_ptr, M, N, R, stride_g, stride_b, rows_per_program,
                            scale, WANT_LOW: tl.constexpr, WANT_B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            RP: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr):
        """One column block of g over one slice of the rows, read once for both products: B's gradient for those
        columns (g.T @ low, kept in registers over the slice) and the low-rank gradient of those rows (g @ B, one
        part per column block, added atomically)."""
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        rr = tl.arange(0, RP)
        b = tl.load(b_ptr + cols[:, None] * stride_b + rr[None, :], mask=(cols < N)[:, None] & (rr < R)[None, :],
                    other=0.0).to(g_ptr.dtype.element_ty)
        gb = tl.zeros((BN, RP), dtype=tl.float32)
        first = tl.program_id(1) * rows_per_program
        for m0 in range(first, first + rows_per_program, BM):
            rows = m0 + tl.arange(0, BM)
            in_rows = (rows < M)[:, None]
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=in_rows & (cols < N)[None, :],
                        other=0.0)
            if WANT_B:
                low = tl.load(low_ptr + rows[:, None] * R + rr[None, :], mask=in_rows & (rr < R)[None, :], other=0.0)
                gb = tl.dot(tl.trans(g).to(DOT), low.to(DOT), gb, input_precision=PRECISION)
            if WANT_LOW:
                part = tl.dot(g.to(DOT), b.to(DOT), input_precision=PRECISION)
                tl.atomic_add(glow_ptr + rows[:, None] * R + rr[None, :], part * scale,
                              mask=in_rows & (rr < R)[None, :], sem="relaxed")
        if WANT_B:
            tl.atomic_add(gb_ptr + cols[:, None] * R + rr[None, :], gb * scale,
                          mask=(cols < N)[:, None] & (rr < R)[None, :], sem="relaxed")


# Triton's interpreter is chosen as the kernels are defined (tests/conftest.py), so the kind of op is chosen then too.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _op(name: str):
    """The kernels' torch operator. Where they compile for a GPU, a `triton_op`: torch.compile traces into it and
    launches the kernels from its generated code, as it does its own; an opaque custom op cost a Python dispatch and
    Triton's launcher per call, which made the compiled FP8 step slower although each kernel was twice as fast
    (bench/RESULTS.md). Under Triton's interpreter, which cannot run on the compiler's fake tensors, or without
    Triton, an opaque custom op."""
    if triton is not None and not INTERPRETED:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


def _launch(kernel, x: torch.Tensor):
    """The kernel as it must be launched for tensors like x: wrapped, while the compiler traces a triton_op's body
    (x is then a fake tensor), so that it sees the launch; the kernel itself for real tensors, where the wrapper
    would send each launch through torch's tracing machinery."""
    return torch.library.wrap_triton(kernel) if is_fake(x) else kernel


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
    The fastest of sweeps on one H100 over 6144 rows of 4096 and of 14336 columns (bench/lora_kernels.py, and
    bench/PERF_NOTES.md for the down projection of several targets): down forward 35 and 114 us, backward 57 and
    183 us, with three targets of one input `bk` halved (forward 102 us against 152, backward 141 against 171), so
    that a tile's work, targets x columns, stays the same; up (`up_*`) forward 42 and 131 us (every tile from 32 x
    64 to 128 x 256 within 10%), backward 37 and 78 us (32-row blocks: 34 and 90)."""
    bm: int = 16
    bk: int = 128
    warps: int = 4
    back_bm: int = 16
    back_bk: int = 128
    back_warps: int = 4
    programs_per_sm: int = 8
    up_bm: int = 64
    up_bn: int = 128
    up_warps: int = 4
    up_back_bm: int = 64
    up_back_bn: int = 128
    up_back_warps: int = 4
    up_programs_per_sm: int = 4
    # the down backward's SwiGLU variant (fp8_mlp) holds 168 registers a thread, so 3 programs fit a multiprocessor:
    # 6 a multiprocessor makes two nearly whole waves where 8 made 2.55 (648 against 740 us at 8192 x 14336)
    swiglu_programs_per_sm: int = 6


TILES = Tiles()


def _columns(bk: int, targets: int) -> int:
    """Columns per tile of the down kernels for `targets` sharing an input (see Tiles)."""
    return bk // 2 if targets == MAX_TARGETS else bk


def launch_down(x2: torch.Tensor, a: torch.Tensor, out: torch.Tensor, seed: torch.Tensor, p: float,
                tiles: Tiles = TILES) -> None:
    """out[M, T*R] = dropout(x2) @ a.T with one mask per seed, a's T*R rows being T targets of rank R: one program
    per `bm` rows, looping over the columns."""
    m, k = x2.shape
    targets = seed.numel()
    threshold, scale = _threshold(p)
    _launch(_down_kernel, x2)[(triton.cdiv(m, tiles.bm),)](
        x2, a, out, seed, m, k, a.shape[0] // targets, x2.stride(0), a.stride(0), threshold, scale, T=targets,
        BM=tiles.bm, BK=_columns(tiles.bk, targets), RP=_rank_pad(a.shape[0] // targets), num_warps=tiles.warps,
        **_dot_options(x2))


def _rows_per_program(device: torch.device, m: int, col_blocks: int, bm: int, per_sm: int) -> int:
    """How many of m rows each backward program takes, whole `bm` tiles, so that column blocks times row slices
    give about `per_sm` programs per multiprocessor (4 in all under the interpreter)."""
    programs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm if device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(m, bm), programs // col_blocks))
    return triton.cdiv(triton.cdiv(m, splits), bm) * bm


@dataclasses.dataclass
class SwiGlu:
    """What `launch_down_backward` needs to carry a gated input's gradient on through silu(gate) * up: the base
    product's share of that gradient (d2, gate's layout) and the FP8 row scales of gate's and up's weights ([2, K]
    fp32)."""
    d2: torch.Tensor
    weight_scales: torch.Tensor


def launch_down_backward(g2: torch.Tensor, x2: torch.Tensor, a: torch.Tensor, gx: torch.Tensor,
                         ga: torch.Tensor, seed: torch.Tensor, p: float, want_gx: bool,
                         tiles: Tiles = TILES, up2: torch.Tensor | None = None,
                         swiglu: SwiGlu | None = None) -> torch.Tensor | None:
    """ga[T*R, K] += the gradient for a (fp32, zeroed by the caller); gx[M, K] = the gradient for x2 if want_gx,
    summed over the targets. Programs are column blocks times slices of the rows, enough of them to fill the GPU.
    With up2 (x2's layout), the input is silu(x2) * up2, computed as the tiles are read; with `swiglu` as well,
    gx[2, M, K] receives the gradients for x2 (the gate) and up2 instead, and the largest |gradient x weight scale|
    of each of their rows is returned ([2, M, 1] fp32)."""
    m, k = x2.shape
    for name, other in (("up", up2), ("the base product's gradient", swiglu and swiglu.d2)):
        if other is not None and (other.shape != x2.shape or other.stride() != x2.stride()):
            raise ValueError(f"gate {tuple(x2.shape)}/{x2.stride()} and {name} {tuple(other.shape)}/"
                             f"{other.stride()} differ")
    if swiglu is not None and (up2 is None or not want_gx):
        raise ValueError("the SwiGLU's gradient needs up and the input gradient")
    targets = seed.numel()
    threshold, scale = _threshold(p)
    bk = _columns(tiles.back_bk, targets)
    col_blocks = triton.cdiv(k, bk)
    rows_per_program = _rows_per_program(x2.device, m, col_blocks, tiles.back_bm,
                                         tiles.swiglu_programs_per_sm if swiglu else tiles.programs_per_sm)
    # per column block, so that no two programs write one maximum (then the largest over the blocks); without
    # SWIGLU the kernel reads none of the three, and gets tensors it has anyway
    maxima = torch.empty(2, col_blocks, m, dtype=torch.float32, device=x2.device) if swiglu else ga
    d2, weight_scales = (swiglu.d2, swiglu.weight_scales) if swiglu else (x2, ga)
    _launch(_down_backward_kernel, x2)[(col_blocks, triton.cdiv(m, rows_per_program))](
        g2, x2, x2 if up2 is None else up2, a, gx, ga, seed, d2, maxima, weight_scales, m, k,
        a.shape[0] // targets, x2.stride(0), a.stride(0), rows_per_program, threshold, scale, WANT_GX=want_gx,
        T=targets, GATED=up2 is not None, SWIGLU=swiglu is not None, BM=tiles.back_bm, BK=bk,
        RP=_rank_pad(a.shape[0] // targets), num_warps=tiles.back_warps, **_dot_options(x2))
    return maxima.amax(dim=1).unsqueeze(-1) if swiglu else None


def launch_up(base2: torch.Tensor, low: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: float,
              tiles: Tiles = TILES) -> None:
    """out[M, N] = base2 + scale * low @ b.T: one program per tile of the output."""
    m, n = base2.shape
    _launch(_up_kernel, base2)[(triton.cdiv(m, tiles.up_bm), triton.cdiv(n, tiles.up_bn))](
        base2, low, b, out, m, n, b.shape[1], base2.stride(0), b.stride(0), scale, BM=tiles.up_bm, BN=tiles.up_bn,
        RP=_rank_pad(b.shape[1]), num_warps=tiles.up_warps, **_dot_options(base2))


def launch_up_backward(g2: torch.Tensor, low: torch.Tensor, b: torch.Tensor, glow: torch.Tensor, gb: torch.Tensor,
                       scale: float, want_low: bool, want_b: bool, tiles: Tiles = TILES) -> None:
    """glow[M, R] += scale * g2 @ b and gb[N, R] += scale * g2.T @ low (both fp32, zeroed by the caller), g2 read
    once. Programs are column blocks times slices of the rows, enough of them to fill the GPU."""
    m, n = g2.shape
    col_blocks = triton.cdiv(n, tiles.up_back_bn)
    rows_per_program = _rows_per_program(g2.device, m, col_blocks, tiles.up_back_bm, tiles.up_programs_per_sm)
    _launch(_up_backward_kernel, g2)[(col_blocks, triton.cdiv(m, rows_per_program))](
        g2, low, b, glow, gb, m, n, b.shape[1], g2.stride(0), b.stride(0), rows_per_program, scale,
        WANT_LOW=want_low, WANT_B=want_b, BM=tiles.up_back_bm, BN=tiles.up_back_bn, RP=_rank_pad(b.shape[1]),
        num_warps=tiles.up_back_warps, **_dot_options(g2))


def _dropped_down(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    if not 0 < seed.numel() <= MAX_TARGETS or a.shape[0] % seed.numel():
        raise ValueError(f"{seed.numel()} seeds for an A of {a.shape[0]} rows: 1 to {MAX_TARGETS} targets of "
                         "equal rank")
    x2 = _rows(x)
    out = torch.empty(x2.shape[0], a.shape[0], dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        launch_down(x2, a, out, seed, p)
    return out.view(*x.shape[:-1], a.shape[0])


@_op("merak_lora::dropped_down")
def dropped_down(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x, p) @ a.T in x's dtype, the mask drawn from `seed` (an int64 tensor). With several seeds (up to
    MAX_TARGETS), a's rows are the A matrices of as many targets that read x, stacked (equal ranks), and each
    target's part of the output has its own mask: x is read once for all of them."""
    return _dropped_down(x, a, seed, p)


@dropped_down.register_fake
def _(x, a, seed, p):
    return x.new_empty(*x.shape[:-1], a.shape[0])


@_op("merak_lora::gated_dropped_down")
def gated_dropped_down(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, seed: torch.Tensor,
                       p: float) -> torch.Tensor:
    """`dropped_down` of x = silu(gate) * up, a gated MLP's activation, whose backward computes x again from gate
    and up as it reads them instead of keeping x: the activation's own backward keeps gate and up anyway, so x
    (the widest tensor of a layer) need not outlive the forward."""
    if x.shape != gate.shape or x.shape != up.shape:
        raise ValueError(f"activation {tuple(x.shape)}, gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return _dropped_down(x, a, seed, p)


@gated_dropped_down.register_fake
def _(x, gate, up, a, seed, p):
    return x.new_empty(*x.shape[:-1], a.shape[0])


@_op("merak_lora::dropped_down_backward")
def dropped_down_backward(g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
                          want_gx: bool, up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `dropped_down` for x (empty unless want_gx; summed over the targets) and for a, from the
    same masks; with `up`, those of `gated_dropped_down`, x being the gate."""
    x2 = _rows(x)
    m, k = x2.shape
    gx = torch.empty((m, k) if want_gx else (0,), dtype=x.dtype, device=x.device)
    ga = torch.zeros(a.shape[0], k, dtype=torch.float32, device=x.device)
    if m:
        launch_down_backward(g.reshape(m, a.shape[0]).contiguous(), x2, a, gx, ga, seed, p, want_gx,
                             up2=None if up is None else _rows(up))
    return (gx.view(x.shape) if want_gx else gx), ga.to(a.dtype)


@dropped_down_backward.register_fake
def _(g, x, a, seed, p, want_gx, up=None):
    return x.new_empty(x.shape if want_gx else (0,)), a.new_empty(a.shape)


@_op("merak_lora::swiglu_down_backward")
def swiglu_down_backward(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d: torch.Tensor, a: torch.Tensor,
                         seed: torch.Tensor, p: float,
                         weight_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated MLP's down projection, `gated_dropped_down`'s backward carried on through the activation: the
    activation's gradient is the LoRA part (from g, through the masks) plus d (the base product's part), and it is
    taken to gate and up in the same pass over gate, up and d. Returns (gate's and up's gradients [2, *gate.shape]
    in gate's dtype, each row's largest |gradient x weight scale| for gate and up [2, rows, 1] fp32 (what the
    FP8 products of their backward quantize with; `weight_scales` [2, columns]), A's gradient)."""
    x2, u2, d2 = _rows(gate), _rows(up), _rows(d)
    m, k = x2.shape
    gu = torch.empty(2, m, k, dtype=gate.dtype, device=gate.device)
    ga = torch.zeros(a.shape[0], k, dtype=torch.float32, device=gate.device)
    if not m:
        return gu.view(2, *gate.shape), torch.zeros(2, 0, 1, dtype=torch.float32, device=gate.device), ga.to(a.dtype)
    amax = launch_down_backward(g.reshape(m, a.shape[0]).contiguous(), x2, a, gu, ga, seed, p, True, up2=u2,
                                swiglu=SwiGlu(d2, weight_scales.float().contiguous()))
    return gu.view(2, *gate.shape), amax, ga.to(a.dtype)


@swiglu_down_backward.register_fake
def _(g, gate, up, d, a, seed, p, weight_scales):
    rows = gate.numel() // gate.shape[-1]
    return (gate.new_empty(2, *gate.shape), gate.new_empty(2, rows, 1, dtype=torch.float32), a.new_empty(a.shape))


def _setup(ctx, inputs, output):
    x, a, seed, p = inputs
    ctx.save_for_backward(x, a, seed)
    ctx.p = p


def _backward(ctx, g):
    x, a, seed = ctx.saved_tensors
    gx, ga = dropped_down_backward(g, x, a, seed, ctx.p, ctx.needs_input_grad[0])
    return (gx if ctx.needs_input_grad[0] else None), (ga if ctx.needs_input_grad[1] else None), None, None


dropped_down.register_autograd(_backward, setup_context=_setup)


def _gated_setup(ctx, inputs, output):
    _, gate, up, a, seed, p = inputs
    ctx.save_for_backward(gate, up, a, seed)
    ctx.p = p


def _gated_backward(ctx, g):
    gate, up, a, seed = ctx.saved_tensors
    gx, ga = dropped_down_backward(g, gate, a, seed, ctx.p, ctx.needs_input_grad[0], up)
    # no gradient for gate and up through this op: they only rebuild x, whose own gradient autograd carries to them
    return ((gx if ctx.needs_input_grad[0] else None), None, None, (ga if ctx.needs_input_grad[3] else None),
            None, None)


gated_dropped_down.register_autograd(_gated_backward, setup_context=_gated_setup)


@_op("merak_lora::added_up")
def added_up(base: torch.Tensor, low: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * low @ b.T in base's dtype (b cast to low's dtype, as PEFT's forward casts it), one pass over
    base."""
    base2, low2 = _rows(base), low.reshape(-1, low.shape[-1]).contiguous()
    out = torch.empty(base2.shape, dtype=base.dtype, device=base.device)
    if base2.shape[0]:
        launch_up(base2, low2, b.contiguous(), out, scale)
    return out.view(base.shape)


@added_up.register_fake
def _(base, low, b, scale):
    return base.new_empty(base.shape)


@_op("merak_lora::added_up_backward")
def added_up_backward(g: torch.Tensor, low: torch.Tensor, b: torch.Tensor, scale: float, want_low: bool,
                      want_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `added_up` for low and for b (each empty unless wanted), from one read of g."""
    g2, low2 = _rows(g), low.reshape(-1, low.shape[-1]).contiguous()
    m, r = low2.shape
    glow = torch.zeros((m, r) if want_low else (0,), dtype=torch.float32, device=g.device)
    gb = torch.zeros(b.shape if want_b else (0,), dtype=torch.float32, device=g.device)
    if m:
        launch_up_backward(g2, low2, b.contiguous(), glow, gb, scale, want_low, want_b)
    return glow.to(low.dtype).view(low.shape if want_low else (0,)), gb.to(b.dtype)


@added_up_backward.register_fake
def _(g, low, b, scale, want_low, want_b):
    return low.new_empty(low.shape if want_low else (0,)), b.new_empty(b.shape if want_b else (0,))


def _up_setup(ctx, inputs, output):
    _, low, b, scale = inputs
    ctx.save_for_backward(low, b)
    ctx.scale = scale


def _up_backward(ctx, g):
    low, b = ctx.saved_tensors
    want_low, want_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    glow, gb = added_up_backward(g, low, b, ctx.scale, want_low, want_b) if want_low or want_b else (None, None)
    return (g if ctx.needs_input_grad[0] else None), (glow if want_low else None), (gb if want_b else None), None


added_up.register_autograd(_up_backward, setup_context=_up_setup)


def new_seed(device: torch.device, n: int = 1) -> torch.Tensor:
    """`n` mask seeds drawn from the device's generator, so AdapterSwitch's streams and a resumed run's restored
    RNG state decide the masks as they decide the compiler's dropout."""
    return torch.randint(0, 2**31 - 1, (n,), device=device, dtype=torch.int64)


def disagreement(device: torch.device, dtype: torch.dtype, rank: int, m: int = 48, k: int = 256) -> str | None:
    """Why the kernels cannot be trusted on `device` for activations of `dtype` and adapters of `rank` (they
    raise, or their outputs or gradients on an [m, k] problem differ from torch's with the same masks), or None: one
    target's two halves, the down projection of three targets sharing an input, A's gradient through a gated
    activation, and the gradients for gate and up through it (`swiglu_down_backward`). A Triton build that
    miscompiles them gives wrong adapter gradients rather than an error (bench/PERF_NOTES.md records such a fault
    in a variant of the backward, on an H100 only), so a stage checks once before it trains. Draws nothing from the
    device's generator: the masks of the run stay as they were."""
    p, scale = 0.25, 4.0  # p a multiple of 2**-16: the kernels' dropout scale is exactly 1 / (1 - p)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device).to(dtype).requires_grad_(True)
    a = torch.randn(MAX_TARGETS * rank, k, generator=gen, device=device).requires_grad_(True)
    b = torch.randn(k, rank, generator=gen, device=device).requires_grad_(True)
    base = torch.randn(m, k, generator=gen, device=device).to(dtype)
    up = torch.randn(m, k, generator=gen, device=device).to(dtype)
    up_low = torch.randn(m, MAX_TARGETS * rank, generator=gen, device=device).to(dtype)
    seeds = torch.arange(20261124, 20261124 + MAX_TARGETS, dtype=torch.int64, device=device)
    d = torch.randn(m, k, generator=gen, device=device).to(dtype)  # the base product's share of a gradient
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            low = dropped_down(x, a[:rank], seeds[:1], p)
            out = added_up(base, low, b, scale)
            got = (low, out, *torch.autograd.grad(out, (x, a, b), up))
            shared = dropped_down(x, a, seeds, p)
            got_shared = (shared, *torch.autograd.grad(shared, (x, a), up_low))
            keeps = [dropout_mask(seeds[t:t + 1], (m, k), p, device) for t in range(MAX_TARGETS)]
            activation = (F.silu(base.float()) * up.float()).to(dtype)  # base and up serve as gate and up
            gated = torch.autograd.grad(gated_dropped_down(activation, base, up, a[:rank], seeds[:1], p), a,
                                        up_low[:, :rank])[0]
            through, _, _ = swiglu_down_backward(up_low[:, :rank], base, up, d, a[:rank].detach(), seeds[:1], p,
                                                 torch.ones(2, k, device=device))
    except Exception as e:  # noqa: BLE001 - whatever Triton raises, the compiler's dropout still serves
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    x_ref, a_ref, b_ref = (t.detach().clone().float().requires_grad_(True) for t in (x, a, b))
    lows = [(x_ref * keep / (1 - p)) @ a_ref[t * rank:(t + 1) * rank].to(dtype).float().t()
            for t, keep in enumerate(keeps)]
    out_ref = base.float() + scale * lows[0].to(dtype).float() @ b_ref.to(dtype).float().t()
    wanted = (lows[0], out_ref,
              *torch.autograd.grad(out_ref, (x_ref, a_ref, b_ref), up.float(), retain_graph=True))
    shared_ref = torch.cat(lows, dim=-1)
    wanted_shared = (shared_ref, *torch.autograd.grad(shared_ref, (x_ref, a_ref), up_low.float()))
    gated_ref = torch.autograd.grad((activation.float() * keeps[0] / (1 - p)) @ a_ref[:rank].to(dtype).float().t(),
                                    a_ref, up_low[:, :rank].float())[0]
    gate_ref, up_ref = (t.detach().float().requires_grad_(True) for t in (base, up))
    act_ref = F.silu(gate_ref) * up_ref
    through_ref = torch.autograd.grad((((act_ref * keeps[0] / (1 - p)) @ a_ref[:rank].detach().to(dtype).float().t())
                                       * up_low[:, :rank].float()).sum() + (act_ref * d.float()).sum(),
                                      (gate_ref, up_ref))
    for what, mine, ref in zip(("low-rank output", "output", "input gradient", "A's gradient", "B's gradient",
                                "shared-input output", "shared-input input gradient", "shared-input A gradient",
                                "gated-input A gradient", "gate gradient through the SwiGLU",
                                "up gradient through the SwiGLU"),
                               got + got_shared + (gated, *through),
                               wanted + wanted_shared + (gated_ref, *through_ref)):
        err = ((mine.float() - ref).abs().max() / ref.abs().max()).item()
        if not err < 2e-2:  # bf16: a few roundings of the result, 2**-8 each
            return f"its {what} is off torch's by {err:.3g} of the largest entry"
    return None
