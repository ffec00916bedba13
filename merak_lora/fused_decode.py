"""A stage's one-token step with merak-lora's own kernels between the products: Llama-family layers, LoRA kept
apart or merged, any base the transformers layers take.

The transformers layer, graphed and compiled, decodes a 4-bit 8B model at a fifth of what reading its weights
allows: besides the products, each layer runs ~20 kernels (norms, rotary, cache writes, attention, residual adds,
and for each target of LoRA two thin products and an add) whose launches and tails add up to more than the
weights' time. Here a layer is four products and four kernels (decode_kernels.py): the residual add of the last
product with its LoRA, the norm and q, k, v's LoRA down projections; the q, k, v product; LoRA's up projections,
rotary, cache write, attention and o's down projection; the o product; the residual add, norm and gate's and up's
down projections; the gate and up product; their up projections, SiLU and down's down projection; the down
product, whose residual add opens the next layer. The products are the bases' own (the joined q, k, v and gate, up
of shared_products.py; o's and down's base layers): cuBLAS for 16-bit, and for 4-bit merak-lora's CUDA product
(four_bit_cuda.py) where it builds and serves, else bitsandbytes'. merak-lora's product adds the linear's LoRA up
projection as it writes its output; after the others the kernel that reads the output adds it. The step reads
the stage's tensors in place, writes the static cache transformers' layers read at the prompt and advances its
lengths, so prompt and tokens may come from either path. On CUDA it is replayed as a CUDA graph
(decode.GraphedStep) like the step it replaces.

Where it serves (`FusedStep.build` says why not, and the stage keeps the transformers step): model types whose
decoder layer is Llama's (Llama, Mistral, Qwen2: RMSNorm, rotary attention with a static cache, a SiLU-gated MLP),
q, k, v and gate, up joined (shared_products.py: bases of one kind, with LoRA on any of them or none), one adapter
(or none) answering, on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import StaticCache

from . import decode_kernels as kernels
from . import four_bit_cuda
from .shared_products import base_layer, lora_adapters, plain_adapters, serving

LAYERS = {"llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


@dataclass
class Lora:
    """An adapter on a weight: A (for the kernel before the product), B and the scale (for the kernel after)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class LayerWeights:
    norm1: nn.Module
    norm2: nn.Module
    attn: nn.Module
    qkv_group: object
    gate_up_group: object
    o_proj: nn.Module
    down_proj: nn.Module
    layer_idx: int

    def products(self):
        """The four base products, each x -> x @ W.T (+ bias) in x's dtype."""
        return (self.qkv_group.base_product, base_layer(self.o_proj), self.gate_up_group.base_product,
                base_layer(self.down_proj))


def _layer(layer: nn.Module, i: int) -> LayerWeights | str:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    q = getattr(attn, "q_proj", None)
    gate = getattr(mlp, "gate_proj", None)
    if not (hasattr(q, "shared_products") and hasattr(gate, "shared_products")):
        return "q, k, v or gate, up are not joined (their bases differ in kind, width or format)"
    qkv_group, gate_up_group = q.shared_products[0], gate.shared_products[0]
    if qkv_group.members != [attn.q_proj, attn.k_proj, attn.v_proj] or \
            gate_up_group.members != [mlp.gate_proj, mlp.up_proj]:
        return "its joined linears are not q, k, v and gate, up in that order"
    if attn.head_dim & (attn.head_dim - 1):
        return f"head size {attn.head_dim} is not a power of two"
    return LayerWeights(layer.input_layernorm, layer.post_attention_layernorm, attn, qkv_group, gate_up_group,
                        attn.o_proj, mlp.down_proj, i)


def stage_weights(stage) -> list[LayerWeights] | str:
    """The stage's layers as the fused step reads them, or why it cannot (found once per stage and kept)."""
    cached = getattr(stage, "fused_weights", None)
    if cached is not None:
        return cached
    config = stage.base_lm().config
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYERS:
        why = f"model type {model_type!r} is not one whose layers it computes ({', '.join(LAYERS)})"
    elif getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1 \
            or getattr(config, "mlp_bias", False):
        why = "the MLP is not a plain SiLU-gated one"
    else:
        layers = stage.layers()
        owned = range(stage.spec.start, stage.spec.stop)
        found = [_layer(layers[i], i) if type(layers[i]).__name__ == LAYERS[model_type]
                 else "a layer of another class" for i in owned]
        why = next((f for f in found if isinstance(f, str)), None)
    stage.fused_weights = why or found
    return stage.fused_weights


def _adapter(layer: LayerWeights) -> str | bool | None:
    """The one adapter the layer's linears add now (False: none), or None. A linear LoRA leaves out, or that does
    not hold that adapter, adds nothing."""
    found = {serving(layer.qkv_group.members, layer.qkv_group.adapters),
             serving(layer.gate_up_group.members, layer.gate_up_group.adapters)}
    for single in (layer.o_proj, layer.down_proj):
        names = plain_adapters([single])
        found.add(None if names is None else serving([single], names))
    names = found - {False}
    if None in found or len(names) > 1:
        return None
    return names.pop() if names else False


def _single_lora(linear: nn.Module, name: str | bool, dtype: torch.dtype) -> Lora | None:
    if name not in lora_adapters(linear):
        return None
    return Lora(linear.lora_A[name].weight.to(dtype), linear.lora_B[name].weight.to(dtype).contiguous(),
                linear.scaling[name])


def _group_lora(group, name: str | bool, dtype: torch.dtype) -> Lora | None:
    if name not in group.adapters:
        return None
    a, b, scale = group.adapters[name]
    return Lora(a.to(dtype), b.to(dtype).contiguous(), scale)


def _leaves_lora(product):
    """A base product called as the step calls merak-lora's 4-bit product: (x, lora) -> (y, the LoRA left to add)."""
    return lambda x, lora=None: (product(x), lora)


class FusedStep:
    """One stage's one-token forward for one request (a batch of M rows and its static cache)."""

    def __init__(self, stage, cache: StaticCache, layers: list[LayerWeights], adapter: str | bool, rows: int,
                 dtype: torch.dtype, own_4bit: bool):
        lm = stage.base_lm()
        self.cache, self.rows, self.layers = cache, rows, layers
        self.decoder = lm.get_decoder()
        self.embed = lm.get_input_embeddings() if stage.spec.is_first else None
        self.head = lm.get_output_embeddings() if stage.spec.is_last else None
        attn = layers[0].attn
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.scaling = attn.scaling
        # merak-lora's 4-bit product where it serves (four_bit_cuda.py), else the base's own
        own = (lambda p: four_bit_cuda.product_for(p, dtype, rows)) if own_4bit else (lambda p: None)
        self.products = [tuple(own(p) or _leaves_lora(p) for p in w.products()) for w in layers]
        self.lora = [(_group_lora(w.qkv_group, adapter, dtype), _single_lora(w.o_proj, adapter, dtype),
                      _group_lora(w.gate_up_group, adapter, dtype), _single_lora(w.down_proj, adapter, dtype))
                     for w in layers]
        hidden = attn.config.hidden_size
        device = layers[0].norm1.weight.device
        intermediate = sum(m.out_features for m in layers[0].gate_up_group.members) // 2
        new = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
        self.h = [new(rows, hidden), new(rows, hidden)]  # the residual stream, read from one and written to the other
        self.x, self.o, self.act = new(rows, hidden), new(rows, self.heads * attn.head_dim), new(rows, intermediate)
        ranks = [next((lo.a.shape[0] for lo in (per[i] for per in self.lora) if lo is not None), 1) for i in range(4)]
        self.t_qkv = new(rows, 1, ranks[0], dt=torch.float32)
        self.t_o = new(rows, self.heads, ranks[1], dt=torch.float32)
        self.t_gu = new(rows, 1, ranks[2], dt=torch.float32)
        self.t_down = new(rows, -(-intermediate // kernels.GATED_COLUMNS), ranks[3], dt=torch.float32)
        keys = cache.layers[layers[0].layer_idx].keys  # [rows, kv heads, slots, head size]
        splits = kernels.attention_splits(rows, self.heads, keys.shape[2], device)
        self.shares = kernels.attention_shares(rows, self.heads, splits, keys.shape[3], device)

    @classmethod
    def build(cls, stage, cache, rows: int, dtype: torch.dtype, own_4bit: bool = True) -> "FusedStep | str":
        """The step for this request, or why the stage keeps the transformers step. `own_4bit`: 4-bit products
        by merak-lora's CUDA product where it serves, else bitsandbytes'."""
        if not isinstance(cache, StaticCache):
            return "the model decodes with a growing cache"
        layers = stage_weights(stage)
        if isinstance(layers, str):
            return layers
        if not layers:
            return "the stage holds no layers"
        if not kernels.runs_on(layers[0].norm1.weight.device):
            return "its kernels need a CUDA device"
        adapters = {_adapter(w) for w in layers}
        if len(adapters) != 1 or None in adapters:
            return "the linears do not all add one adapter (merged, several active, or disabled apart)"
        owned = [cache.layers[w.layer_idx] for w in layers]
        if not all(layer.is_initialized and layer.keys.dtype == dtype for layer in owned):
            return "the cache holds no prompt yet"
        step = cls(stage, cache, layers, adapters.pop(), rows, dtype, own_4bit)
        if any(len({lo.a.shape[0] for lo in (per[i] for per in step.lora) if lo is not None}) > 1 for i in range(4)):
            return "the adapter's rank differs from layer to layer"
        return step

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows, h = self.rows, self.h
        h[0].copy_((self.embed(x) if self.embed is not None else x).view(rows, -1))
        cos, sin = self.decoder.rotary_emb(h[0].view(rows, 1, -1), positions)
        cos, sin = cos.view(rows, -1), sin.view(rows, -1)
        bias = mask.view(rows, -1)
        lengths = [self.cache.layers[w.layer_idx].cumulative_length for w in self.layers]
        last: tuple = (None, None)  # the down product of the layer before, and its LoRA left to add
        for w, (qkv_p, o_p, gu_p, down_p), (qkv, o, gate_up, down) in zip(self.layers, self.products, self.lora):
            layer = self.cache.layers[w.layer_idx]
            kernels.residual_norm(h[0], h[1], *last, norm=_norm(w.norm1, self.x), a=_a(qkv), t_a=self.t_qkv)
            kernels.decode_attention(*qkv_p(self.x, _up(qkv, self.t_qkv)), cos, sin, layer.keys, layer.values,
                                     layer.cumulative_length, bias, self.scaling, self.o, self.heads, self.kv_heads,
                                     a_o=_a(o), t_o=self.t_o, shares=self.shares)
            kernels.residual_norm(h[1], h[0], *o_p(self.o, _up(o, self.t_o)), norm=_norm(w.norm2, self.x),
                                  a=_a(gate_up), t_a=self.t_gu)
            kernels.gated_activation(*gu_p(self.x, _up(gate_up, self.t_gu)), self.act, _a(down), self.t_down)
            last = down_p(self.act, _up(down, self.t_down))
        torch._foreach_add_(lengths, 1)
        norm = self.decoder.norm
        kernels.residual_norm(h[0], h[1], *last, norm=None if self.head is None else _norm(norm, self.x))
        if self.head is None:
            return h[1].view(rows, 1, -1)
        return self.head(self.x.view(rows, 1, -1))[:, -1, :].float()


def _norm(norm: nn.Module, x: torch.Tensor) -> tuple:
    return norm.weight, norm.variance_epsilon, x


def _a(lora: Lora | None) -> torch.Tensor | None:
    return None if lora is None else lora.a


def _up(lora: Lora | None, t: torch.Tensor) -> tuple | None:
    return None if lora is None else (t, lora.b, lora.scale)
