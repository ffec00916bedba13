"""Tiny Index-shaped model (see configuration_index.py): layers return tensors, the head normalises its rows."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_index import IndexConfig


class IndexRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class NormHead(nn.Module):
    def __init__(self, hidden, vocab):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))


def rotate(x, positions, base):
    half = x.shape[-1] // 2
    inv = 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=x.device) / half))
    angles = positions[:, None, :, None].float() * inv
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1)


class IndexAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.heads = layer_idx, config.num_attention_heads
        self.head_dim, self.base = config.hidden_size // config.num_attention_heads, config.rope_theta
        h = config.hidden_size
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)

    def forward(self, x, mask, positions, cache):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, positions, self.base), rotate(k, positions, self.base)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class IndexMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class IndexDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = IndexRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = IndexAttention(config, layer_idx)
        self.post_attention_layernorm = IndexRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = IndexMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask,
                                                       position_ids, past_key_values)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class IndexPreTrainedModel(PreTrainedModel):
    config_class = IndexConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding, NormHead)):
            module.weight.data.normal_(0.0, self.config.initializer_range)


class IndexModel(IndexPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(IndexDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = IndexRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device)[None].expand(b, -1)
        mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)[None, None].expand(b, 1, s, -1)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=position_ids,
                      past_key_values=past_key_values if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class IndexForCausalLM(IndexPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = IndexModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)
