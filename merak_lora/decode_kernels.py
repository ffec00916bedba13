"""The Triton kernels of the fused one-token step (fused_decode.py): everything of a layer but its four products,
in four launches.

Decoding one sequence reads every weight once per token and does two flops per weight, so a token's time is its
bytes over the memory bandwidth plus, for every kernel, a launch and a tail of a few microseconds. The transformers
layer on a 4-bit base, graphed and compiled, runs ~20 kernels a layer, LoRA adding two thin products and an add
per target (bench/PERF_NOTES.md). Here the products are separate kernels (fused_decode.py says whose) and each
kernel between them does all that follows from its reads; a product's LoRA up projection comes in with its output
where the product did not add it (merak-lora's 4-bit product does):

- `residual_norm`: the residual add of the product before (with that product's LoRA up projection, B times the
  summed down-projection partials), the RMSNorm of the new residual stream, and LoRA's down projections of the
  normalized row for the targets that read it (q, k, v; gate, up). Each program of a row computes the row again
  (it reads a few KB) and one row of A's product (fewer programs, each reducing more rows one after another, ran
  slower); the first writes the row and the normalized row.
- `decode_attention`: q, k and v from the joined product with their LoRA up projections, the rotary embedding,
  the new k and v written to the static cache, the query's attention over the cache (online softmax), and the o
  projection's LoRA down projection of its head; a long cache is split among programs (`attention_splits`).
- `gated_activation`: gate and up from their joined product with their LoRA up projections, silu(gate) * up, and
  the down projection's LoRA down projection of the program's columns.

Rounding follows transformers' bf16 layer where it is visible (each linear's output, the normalized row, the
activation and the residual stream are rounded to the activation dtype where the layer rounds them); sums are
fp32. The kernels run on CUDA devices, or on the CPU under Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch

from .fused_lora import runs_on, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _lora_rows(y_ptr, t_ptr, P, b_ptr, R, scale, rows, ok, RP: tl.constexpr, PP: tl.constexpr):
        """A linear's output at `rows` of one row of x: its base product (y) plus scale * B[rows] @ t, t summed over
        its P partials, in fp32 (rounded by the caller where the layer rounds)."""
        y = tl.load(y_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        if RP > 0:
            p = tl.arange(0, PP)
            r = tl.arange(0, RP)
            t = tl.sum(tl.load(t_ptr + p[:, None] * R + r[None, :], mask=(p < P)[:, None] & (r < R)[None, :],
                               other=0.0), axis=0)
            b = tl.load(b_ptr + rows[:, None] * R + r[None, :], mask=ok[:, None] & (r < R)[None, :], other=0.0)
            y += tl.sum(b.to(tl.float32) * t[None, :], axis=1) * scale
        return y

    @triton.jit
    def _residual_norm_kernel(h_ptr, h_out_ptr, stride_h, y_ptr, stride_y, t_ptr, P, b_ptr, R, scale,
                              w_ptr, eps, x_ptr, stride_x, a_ptr, ta_ptr, RA, K,
                              BK: tl.constexpr, RP: tl.constexpr, PP: tl.constexpr, RB: tl.constexpr,
                              HAS_Y: tl.constexpr, NORM: tl.constexpr):
        """Program (m, j) of row m: h + round(y + LoRA) (program 0 writes it), its RMSNorm times w (program 0
        writes it) and rows j*RB.. of A times that (fp32)."""
        m, j = tl.program_id(0), tl.program_id(1)
        k = tl.arange(0, BK)
        ok = k < K
        h = tl.load(h_ptr + m * stride_h + k, mask=ok, other=0.0)
        dt = h.dtype
        if HAS_Y:
            y = _lora_rows(y_ptr + m * stride_y, t_ptr + m * P * R, P, b_ptr, R, scale, k, ok, RP, PP)
            h = (h.to(tl.float32) + y.to(dt).to(tl.float32)).to(dt)
        if j == 0:
            tl.store(h_out_ptr + m * stride_h + k, h, mask=ok)
        if NORM:
            hf = h.to(tl.float32)
            normed = (hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / K + eps)).to(dt)
            x = (tl.load(w_ptr + k, mask=ok, other=0.0).to(tl.float32) * normed.to(tl.float32)).to(dt)
            if j == 0:
                tl.store(x_ptr + m * stride_x + k, x, mask=ok)
            for i in tl.static_range(RB):
                r = j * RB + i
                if r < RA:
                    a = tl.load(a_ptr + r * K + k, mask=ok, other=0.0).to(tl.float32)
                    tl.store(ta_ptr + m * RA + r, tl.sum(a * x.to(tl.float32), axis=0))

    @triton.jit
    def _head_vector(y_ptr, t_ptr, b_ptr, R, scale, row0, d, HALF: tl.constexpr, RP: tl.constexpr,
                     dt: tl.constexpr):
        """The two halves of one head's vector (rows row0.. of the joined q, k, v output, LoRA added), rounded."""
        lo = _lora_rows(y_ptr, t_ptr, 1, b_ptr, R, scale, row0 + d, d < HALF, RP, 1)
        hi = _lora_rows(y_ptr, t_ptr, 1, b_ptr, R, scale, row0 + HALF + d, d < HALF, RP, 1)
        return lo.to(dt).to(tl.float32), hi.to(dt).to(tl.float32)

    @triton.jit
    def _decode_attention_kernel(y_ptr, stride_y, t_ptr, b_ptr, R, scale, cos_ptr, sin_ptr, stride_rot,
                                 kc_ptr, vc_ptr, sc_b, sc_h, sc_l, pos_ptr, bias_ptr, stride_bias, sm_scale,
                                 o_ptr, stride_o, ao_ptr, to_ptr, RO, H, KVH, part_ptr, count_ptr,
                                 D: tl.constexpr, BL: tl.constexpr, RP: tl.constexpr, ROP: tl.constexpr,
                                 SPLITS: tl.constexpr):
        """Program (m, h, s): query head h of row m attends over share s of the cache slots before this token's
        (`pos`); share 0 also over this token's own k and v, which the first query head of each key head writes
        into the cache. With SPLITS > 1 each share leaves its running maximum, sum and weighted values in `part`
        and the share that ends last (the count, which it resets) combines them in share order."""
        HALF: tl.constexpr = D // 2
        m, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kh = h // (H // KVH)
        dt = kc_ptr.dtype.element_ty
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr)
        rot = m * stride_rot + d
        cos1, cos2 = tl.load(cos_ptr + rot).to(tl.float32), tl.load(cos_ptr + rot + HALF).to(tl.float32)
        sin1, sin2 = tl.load(sin_ptr + rot).to(tl.float32), tl.load(sin_ptr + rot + HALF).to(tl.float32)
        y_row, t_row = y_ptr + m * stride_y, t_ptr + m * R
        q1, q2 = _head_vector(y_row, t_row, b_ptr, R, scale, h * D, d, HALF, RP, dt)
        q1, q2 = (q1 * cos1 - q2 * sin1).to(dt).to(tl.float32), (q2 * cos2 + q1 * sin2).to(dt).to(tl.float32)
        cache = m * sc_b + kh * sc_h
        if s == 0:
            k1, k2 = _head_vector(y_row, t_row, b_ptr, R, scale, (H + kh) * D, d, HALF, RP, dt)
            k1, k2 = (k1 * cos1 - k2 * sin1).to(dt), (k2 * cos2 + k1 * sin2).to(dt)
            v1, v2 = _head_vector(y_row, t_row, b_ptr, R, scale, (H + KVH + kh) * D, d, HALF, RP, dt)
            if h % (H // KVH) == 0:
                tl.store(kc_ptr + cache + pos * sc_l + d, k1)
                tl.store(kc_ptr + cache + pos * sc_l + HALF + d, k2)
                tl.store(vc_ptr + cache + pos * sc_l + d, v1.to(dt))
                tl.store(vc_ptr + cache + pos * sc_l + HALF + d, v2.to(dt))
            # this token's own key first: the running maximum starts finite
            best = (tl.sum(q1 * k1.to(tl.float32), 0) + tl.sum(q2 * k2.to(tl.float32), 0)) * sm_scale \
                + tl.load(bias_ptr + m * stride_bias + pos).to(tl.float32)
            total = tl.full((), 1.0, tl.float32)
            acc1, acc2 = v1, v2
        else:  # a finite floor, so a share of masked (-inf) slots only keeps a weight of 0
            best = tl.full((), -1e30, tl.float32)
            total = tl.full((), 0.0, tl.float32)
            acc1, acc2 = tl.zeros((HALF,), tl.float32), tl.zeros((HALF,), tl.float32)
        share = tl.cdiv(tl.cdiv(pos, SPLITS), BL) * BL
        first = s * share
        stop = tl.minimum(first + share, pos)
        sl = tl.arange(0, BL)
        for l0 in range(first, stop, BL):
            slots = l0 + sl
            seen = slots < stop
            at = cache + slots[:, None] * sc_l + d[None, :]
            kt1 = tl.load(kc_ptr + at, mask=seen[:, None], other=0.0).to(tl.float32)
            kt2 = tl.load(kc_ptr + at + HALF, mask=seen[:, None], other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + m * stride_bias + slots, mask=seen, other=0.0).to(tl.float32)
            sc = (tl.sum(kt1 * q1[None, :], 1) + tl.sum(kt2 * q2[None, :], 1)) * sm_scale + bias
            sc = tl.where(seen, sc, float("-inf"))
            new = tl.maximum(best, tl.max(sc, 0))
            keep = tl.exp(best - new)
            p = tl.exp(sc - new)
            vt1 = tl.load(vc_ptr + at, mask=seen[:, None], other=0.0).to(tl.float32)
            vt2 = tl.load(vc_ptr + at + HALF, mask=seen[:, None], other=0.0).to(tl.float32)
            acc1 = acc1 * keep + tl.sum(p[:, None] * vt1, 0)
            acc2 = acc2 * keep + tl.sum(p[:, None] * vt2, 0)
            total = total * keep + tl.sum(p, 0)
            best = new
        last = True
        if SPLITS > 1:
            W: tl.constexpr = D + 2
            part = part_ptr + (m * H + h) * SPLITS * W
            tl.store(part + s * W, best)
            tl.store(part + s * W + 1, total)
            tl.store(part + s * W + 2 + d, acc1)
            tl.store(part + s * W + 2 + HALF + d, acc2)
            tl.debug_barrier()  # the program's stores before its count (the release orders them for the others)
            count = count_ptr + m * H + h
            last = tl.atomic_add(count, 1, sem="acq_rel") == SPLITS - 1
            if last:
                tl.store(count, 0)  # for the next token's launch
                sp = tl.arange(0, SPLITS)
                bests = tl.load(part + sp * W, cache_modifier=".cg")
                top = tl.max(bests, 0)
                weight = tl.exp(bests - top)
                total = tl.sum(tl.load(part + sp * W + 1, cache_modifier=".cg") * weight, 0)
                values_at = part + sp[:, None] * W + 2 + d[None, :]
                acc1 = tl.sum(tl.load(values_at, cache_modifier=".cg") * weight[:, None], 0)
                acc2 = tl.sum(tl.load(values_at + HALF, cache_modifier=".cg") * weight[:, None], 0)
        if last:
            o1, o2 = (acc1 / total).to(dt), (acc2 / total).to(dt)
            tl.store(o_ptr + m * stride_o + h * D + d, o1)
            tl.store(o_ptr + m * stride_o + h * D + HALF + d, o2)
            if ROP > 0:
                r = tl.arange(0, ROP)
                a_at = r[:, None] * (H * D) + h * D + d[None, :]
                a1 = tl.load(ao_ptr + a_at, mask=(r < RO)[:, None], other=0.0).to(tl.float32)
                a2 = tl.load(ao_ptr + a_at + HALF, mask=(r < RO)[:, None], other=0.0).to(tl.float32)
                t = tl.sum(a1 * o1.to(tl.float32)[None, :], 1) + tl.sum(a2 * o2.to(tl.float32)[None, :], 1)
                tl.store(to_ptr + (m * H + h) * RO + r, t, mask=r < RO)

    @triton.jit
    def _gated_activation_kernel(y_ptr, stride_y, t_ptr, b_ptr, R, scale, act_ptr, stride_act, ad_ptr, td_ptr,
                                 RD, N, BN: tl.constexpr, RP: tl.constexpr, RDP: tl.constexpr):
        """Program (m, j): columns j*BN.. of silu(gate) * up for row m (gate: the joined output's first N, up: the
        next N, each with its LoRA), and A_down[:, those columns] @ them into td[m, j] (down's LoRA partials)."""
        m, j = tl.program_id(0), tl.program_id(1)
        cols = j * BN + tl.arange(0, BN)
        ok = cols < N
        dt = act_ptr.dtype.element_ty
        y_row, t_row = y_ptr + m * stride_y, t_ptr + m * R
        g = _lora_rows(y_row, t_row, 1, b_ptr, R, scale, cols, ok, RP, 1).to(dt).to(tl.float32)
        u = _lora_rows(y_row, t_row, 1, b_ptr, R, scale, cols + N, ok, RP, 1).to(dt).to(tl.float32)
        act = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)
        tl.store(act_ptr + m * stride_act + cols, act, mask=ok)
        if RDP > 0:
            rd = tl.arange(0, RDP)
            ad = tl.load(ad_ptr + rd[:, None] * N + cols[None, :], mask=(rd < RD)[:, None] & ok[None, :], other=0.0)
            part = tl.sum(ad.to(tl.float32) * act.to(tl.float32)[None, :], axis=1)
            tl.store(td_ptr + (m * tl.num_programs(1) + j) * RD + rd, part, mask=rd < RD)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _lora_args(lora: tuple | None, fallback: torch.Tensor) -> tuple:
    """(t, B, rank, scale) for a kernel: LoRA's down-projection output (or partials) and its B, or stand-ins."""
    if lora is None:
        return fallback, fallback, 0, 0.0
    t, b, scale = lora
    return t, b, b.shape[1], scale


def residual_norm(h: torch.Tensor, h_out: torch.Tensor, y: torch.Tensor | None = None, y_lora: tuple | None = None,
                  norm: tuple | None = None, a: torch.Tensor | None = None, t_a: torch.Tensor | None = None,
                  rows_per_program: int = 1) -> None:
    """h_out = h + round(y + scale * B @ sum(t partials)) (y_lora = (t [M, P, R], B, scale)); with norm = (weight,
    eps, x): x = RMSNorm(h_out) * weight, and t_a[m] = a @ x[m] (fp32) when a is given."""
    m, k = h.shape
    t, b, r, scale = _lora_args(y_lora, h)
    weight, eps, x = norm if norm is not None else (h, 0.0, h)
    ra = 0 if a is None else a.shape[0]
    grid = (m, max(1, -(-ra // rows_per_program)))
    _residual_norm_kernel[grid](h, h_out, h.stride(0), y if y is not None else h, y.stride(0) if y is not None else 0,
                                t, t.shape[1] if r else 0, b, r, scale, weight, eps, x, x.stride(0),
                                a if ra else h, t_a if ra else h, ra, k, BK=_pow2(k), RP=_pow2(r) if r else 0,
                                PP=_pow2(t.shape[1]) if r else 1, RB=rows_per_program, HAS_Y=y is not None,
                                NORM=norm is not None, num_warps=8 if k >= 2048 else 4)


SLOTS_A_SHARE = 128  # the fewest cache slots a program of the split attention reads: one block


def attention_splits(rows: int, heads: int, slots: int, device: torch.device) -> int:
    """How many programs `decode_attention` splits each (row, head)'s cache of `slots` among: a power of two of
    shares of at least SLOTS_A_SHARE slots, up to ~2 programs a multiprocessor. One program a head is 32 programs at
    one row of an 8B model, a quarter of an H100, each reading its key head's cache one block after another, so its
    time grows with the chat's history; at 8 rows the 256 programs already fill the GPU and splitting them further
    was slower (bench/PERF_NOTES.md). The count is fixed per request (a graph's grid is); each token's shares
    divide the slots filled so far."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    splits = 1
    while splits * 2 * SLOTS_A_SHARE <= slots and rows * heads * splits * 2 <= 2 * units:
        splits *= 2
    return splits


def attention_shares(rows: int, heads: int, splits: int, head_dim: int, device: torch.device) -> tuple | None:
    """`decode_attention`'s scratch for `splits` shares a head: each share's running maximum, sum and weighted
    values, and each head's count of shares ended (zero between tokens); None for one share."""
    if splits == 1:
        return None
    return (torch.empty(rows, heads, splits, head_dim + 2, dtype=torch.float32, device=device),
            torch.zeros(rows, heads, dtype=torch.int32, device=device))


def decode_attention(y: torch.Tensor, qkv_lora: tuple | None, cos: torch.Tensor, sin: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, sm_scale: float,
                     out: torch.Tensor, heads: int, kv_heads: int, a_o: torch.Tensor | None = None,
                     t_o: torch.Tensor | None = None, shares: tuple | None = None, block: int = 128) -> None:
    """One query per row over a static cache [M, kv_heads, L, D]. y: the joined q, k, v product [M, (heads +
    2 kv_heads) D]; qkv_lora: (t [M, 1, R], B, scale) of their adapter. Writes this token's k, v at slot `pos` (a
    device scalar) and the attention output [M, heads D]; with a_o, t_o[m, h] = a_o[:, head h] @ out[m, head h].
    shares: `attention_shares`' scratch, to split the slots among programs."""
    m = y.shape[0]
    d = keys.shape[-1]
    t, b, r, scale = _lora_args(qkv_lora, y)
    ro = 0 if a_o is None else a_o.shape[0]
    part, count = shares if shares is not None else (y, y)
    splits = 1 if shares is None else part.shape[2]
    _decode_attention_kernel[(m, heads, splits)](
        y, y.stride(0), t, b, r, scale, cos, sin, cos.stride(0), keys, values, keys.stride(0), keys.stride(1),
        keys.stride(2), pos, bias, bias.stride(0), sm_scale, out, out.stride(0), a_o if ro else y, t_o if ro else y,
        ro, heads, kv_heads, part, count, D=d, BL=block, RP=_pow2(r) if r else 0, ROP=_pow2(ro) if ro else 0,
        SPLITS=splits, num_warps=4)


GATED_COLUMNS = 512  # columns of the activation a program computes (and so down's LoRA partials: N / this)


def gated_activation(y: torch.Tensor, gate_up_lora: tuple | None, act: torch.Tensor, a_down: torch.Tensor | None,
                     t_down: torch.Tensor | None) -> None:
    """act = silu(gate) * up from the joined gate, up product y [M, 2N] (gate_up_lora: (t [M, 1, R], B, scale));
    with a_down, t_down[m, j] = a_down[:, columns j] @ act[m, columns j] ([M, cdiv(N, GATED_COLUMNS), RD])."""
    m, n = act.shape
    t, b, r, scale = _lora_args(gate_up_lora, y)
    rd = 0 if a_down is None else a_down.shape[0]
    _gated_activation_kernel[(m, triton.cdiv(n, GATED_COLUMNS))](
        y, y.stride(0), t, b, r, scale, act, act.stride(0), a_down if rd else y, t_down if rd else y, rd, n,
        BN=GATED_COLUMNS, RP=_pow2(r) if r else 0, RDP=_pow2(rd) if rd else 0, num_warps=4)


__all__ = ["GATED_COLUMNS", "SLOTS_A_SHARE", "attention_shares", "attention_splits", "decode_attention",
           "gated_activation", "residual_norm", "runs_on"]
