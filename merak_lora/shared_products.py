"""Generation's linears that read one input, run as one product: attention's q, k and v, the MLP's gate and up.

Decoding a token multiplies one row by every weight, so each linear is a thin product whose time is mostly its
launch and its tail, and with LoRA kept apart (`--compare_base`, a 4-bit base, several adapters) each target adds
its own two thin products, a cast and an add. Here the base weights of such a group are laid side by side in one
buffer, each member keeping a view of its rows (no second copy), and the first member to see an input computes
all the members' outputs for it: one base product (bitsandbytes' 4-bit or a plain linear), one down projection
through the members' A matrices stacked, one up projection through their B matrices set block-diagonally (the
zeros add exact zeros), each term in the dtype the member's own forward uses. The others take their columns. A
member without LoRA (LoRA on q and v only) joins with a zero block in the stacked adapter.

Only without gradients (generation): the stacked adapter tensors are copies taken when the group is made, which
training would leave behind. A member called with another input, with arguments, or with its adapter in a state
the group cannot serve (merged apart from the others, several adapters active) runs its own forward; linears with
a PEFT variant (DoRA) or bases that do not join (8-bit, FP8, another width or format) are not grouped.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from .lora import SHARED_INPUTS, _plain


class SharedProducts:
    """One group's side-by-side base weight, its stacked adapters, and the outputs not yet taken."""

    def __init__(self, members: list[nn.Module], base_product, names: list[str]) -> None:
        self.members = members
        self.base_product = base_product  # x -> every member's base output, side by side
        self.sizes = [m.out_features for m in members]
        self.adapters = {name: _stacked(members, name) for name in names}
        self.on = True  # bench/decode.py compares with the members' own forwards
        self.x: torch.Tensor | None = None
        self.outs: list[torch.Tensor | None] = [None] * len(members)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member i's output for x, or None when it must compute it alone."""
        if self.x is not x or self.outs[i] is None:
            adapter = self._adapter()
            if adapter is None:
                return None
            self.x, self.outs = x, list(self._all(x, adapter).split(self.sizes, dim=-1))
        out, self.outs[i] = self.outs[i], None
        if all(o is None for o in self.outs):
            self.x = None  # all taken: hold nothing past this layer
        return out

    def _adapter(self) -> str | bool | None:
        """The adapter all members add now (False: none, the base alone), or None if the group cannot serve."""
        if not self.on or torch.is_grad_enabled():
            return None
        return serving(self.members, self.adapters)

    def _all(self, x: torch.Tensor, adapter: str | bool) -> torch.Tensor:
        out = self.base_product(x)
        if adapter is False:
            return out
        a, b, scale = self.adapters[adapter]
        low = F.linear(x, a.to(x.dtype))  # as `lora._lora_linear_forward`: one addmm in x's dtype, scaled by alpha
        return torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.to(x.dtype).t(),
                           alpha=scale).view_as(out)


def serving(members: list[nn.Module], held) -> str | bool | None:
    """The one adapter the members add in their present state (False: none, the base alone), or None where they
    disagree or add something `held` (the adapter names one can compute) does not cover: merged apart from the
    others, several adapters active. Members without LoRA add nothing."""
    members = [m for m in members if isinstance(m, LoraLinear)]
    if not members:
        return False
    states = {(m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in members}
    if len(states) != 1:
        return None
    disabled, merged, active = states.pop()
    if disabled:
        return False if not merged else None  # PEFT's own forward unmerges first
    if merged:
        return False
    if len(active) != 1:
        return None
    if active[0] in held:
        return active[0]
    return False if not any(active[0] in m.lora_A for m in members) else None  # none holds it: the base


def _stacked(members: list[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Adapter `name`'s A matrices stacked, its B matrices block-diagonal, and the one scale (folded into B
    where the members' scales differ). A member without this adapter (or without LoRA) adds a zero block."""
    with torch.no_grad():
        pairs = [(m.lora_A[name].weight, m.lora_B[name].weight) if name in lora_adapters(m) else None for m in members]
        ref = next(p for p in pairs if p is not None)[0]
        ranks = [p[0].shape[0] if p else 0 for p in pairs]
        a = torch.zeros(sum(ranks), ref.shape[1], dtype=ref.dtype, device=ref.device)
        b = torch.zeros(sum(m.out_features for m in members), sum(ranks), dtype=ref.dtype, device=ref.device)
        scales = {m.scaling[name] for m in members if name in lora_adapters(m)}
        row = col = 0
        for m, p, r in zip(members, pairs, ranks):
            if p is not None:
                a[col:col + r] = p[0]
                b[row:row + m.out_features, col:col + r] = p[1] * (1.0 if len(scales) == 1 else m.scaling[name])
            row, col = row + m.out_features, col + r
    return a, b, scales.pop() if len(scales) == 1 else 1.0


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    group, i = self.shared_products
    out = None if args or kwargs else group.output(i, x)
    return self.forward_alone(x, *args, **kwargs) if out is None else out


def lora_adapters(m: nn.Module):
    """The LoRA adapters a linear holds (none for a linear LoRA left out)."""
    return m.lora_A if type(m) is LoraLinear else {}


def base_layer(m: nn.Module) -> nn.Module:
    """A LoRA linear's base layer, or a linear LoRA left out itself."""
    return m.get_base_layer() if type(m) is LoraLinear else m


def _kind(m: nn.Module) -> str | None:
    """'linear' or '4bit' for a linear, with LoRA or without, whose base the group can lay side by side, else
    None (another LoRA layer class, other modules)."""
    if isinstance(m, LoraLinear) and type(m) is not LoraLinear:
        return None
    base = type(base_layer(m))
    if base is nn.Linear:
        return "linear"
    return "4bit" if base.__module__.startswith("bitsandbytes") and base.__name__ == "Linear4bit" else None


def plain_adapters(members: list[nn.Module]) -> list[str] | None:
    """The names of the adapters the members hold, or None if any of them is not a plain A, B pair."""
    names = {n for m in members for n in lora_adapters(m)}
    if any(n in lora_adapters(m) and not _plain(m, n) for m in members for n in names):
        return None
    return sorted(names)


def _side_by_side_linear(bases: list[nn.Linear]):
    with torch.no_grad():
        weight = torch.cat([b.weight for b in bases])
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        row = 0
        for base in bases:
            n = base.out_features
            base.weight.data = weight[row:row + n]
            if bias is not None:
                base.bias.data = bias[row:row + n]
            row += n
    return lambda x: F.linear(x, weight, bias)


class Joined4bit:
    """Several 4-bit weights as one: the packed codes and their per-block scales concatenated (rows are whole
    blocks, so the flat layouts join); scales quantized a second time (double quant) are expanded to float32
    first, as the product would expand them on every call. Called, bitsandbytes' product of them all; its
    tensors also serve the fused decode step (fused_decode.py)."""

    def __init__(self, bases: list[nn.Module]):
        import bitsandbytes.functional as bf

        states = [b.weight.quant_state for b in bases]
        self.compute = bases[0].compute_dtype or states[0].dtype
        with torch.no_grad():
            scales = [expanded_scales(s) for s in states]
            self.codes, absmax = torch.cat([b.weight.data.view(-1) for b in bases]), torch.cat(scales)
            self.bias = torch.cat([b.bias for b in bases]).to(self.compute) if bases[0].bias is not None else None
            shape = torch.Size([sum(b.out_features for b in bases), bases[0].in_features])
            self.state = bf.QuantState(absmax=absmax, shape=shape, code=states[0].code,
                                       blocksize=states[0].blocksize, quant_type=states[0].quant_type,
                                       dtype=states[0].dtype)
            at = blocks = 0
            for base, state, scale in zip(bases, states, scales):
                base.weight.data = self.codes[at:at + base.weight.data.numel()].view(base.weight.data.shape)
                state.absmax = absmax[blocks:blocks + scale.numel()]
                state.nested, state.state2, state.offset = False, None, None
                at, blocks = at + base.weight.data.numel(), blocks + scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        return bnb.matmul_4bit(x.to(self.compute), self.codes, quant_state=self.state, bias=self.bias).to(x.dtype)


def expanded_scales(state) -> torch.Tensor:
    """A 4-bit weight's per-block scales in float32 (double-quantized ones expanded as bitsandbytes' product
    expands them)."""
    if not state.nested:
        return state.absmax
    import bitsandbytes.functional as bf
    return bf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset


def _joinable(kind: str, bases: list[nn.Module]) -> bool:
    first = bases[0]
    if len({b.in_features for b in bases}) != 1 or len({b.bias is None for b in bases}) != 1:
        return False
    if kind == "linear":
        return len({(b.weight.dtype, b.weight.device) for b in bases}) == 1 and all(
            b.bias is None or b.bias.dtype == first.weight.dtype for b in bases)
    states = [b.weight.quant_state for b in bases]
    same = {(s.quant_type, s.blocksize, s.dtype, b.compute_dtype, b.weight.device) for b, s in zip(bases, states)}
    # bitsandbytes repacks a 4-bit layer for AVX512-BF16 CPUs at its first forward without gradients (scales in
    # bf16, another code layout), after the group copied its codes: such layers stay apart
    repacks = first.weight.device.type == "cpu" and any(getattr(b, "support_avx512bf16_for_cpu", False) or
                                                         getattr(s, "packing_format_for_cpu", False)
                                                         for b, s in zip(bases, states))
    return len(same) == 1 and first.in_features % states[0].blocksize == 0 and not repacks


def group_for_generation(model: nn.Module) -> list[SharedProducts]:
    """Give each group of linears that one module feeds one input (`lora.SHARED_INPUTS`) a SharedProducts, where
    their bases are of one kind and join (same input width, dtype, 4-bit format, bias or none); LoRA may be on
    all of them, some (a config naming q_proj and v_proj) or none. For a process that only generates: afterwards
    the members' weights are views of their group's."""
    groups = []
    for parent in model.modules():
        for role_names in SHARED_INPUTS:
            members = [m for m in (getattr(parent, n, None) for n in role_names) if m is not None]
            kinds = {_kind(m) for m in members}
            if len(members) < 2 or len(kinds) != 1 or None in kinds:
                continue
            kind = kinds.pop()
            bases = [base_layer(m) for m in members]
            names = plain_adapters(members)
            if names is None or not _joinable(kind, bases):
                continue
            product = _side_by_side_linear(bases) if kind == "linear" else Joined4bit(bases)
            group = SharedProducts(members, product, names)
            for i, m in enumerate(members):
                m.forward_alone = m.forward
                m.shared_products = (group, i)
                m.forward = types.MethodType(_grouped_forward, m)
            groups.append(group)
    return groups
