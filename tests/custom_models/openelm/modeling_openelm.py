"""Tiny OpenELM-shaped model (see configuration_openelm.py). Layers return tuples, as older remote code does."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_openelm import OpenELMConfig


class OpenELMRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, positions, base):
    half = x.shape[-1] // 2
    inv = 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=x.device) / half))
    angles = positions[:, None, :, None].float() * inv  # batch, 1, seq, half
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class OpenELMMultiHeadCausalAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.q_heads = config.num_query_heads[layer_idx]
        self.k_heads = config.num_kv_heads[layer_idx]
        self.head_dim = config.head_dim
        self.base = config.rope_freq_constant
        self.qkv_proj = nn.Linear(config.model_dim, (self.q_heads + 2 * self.k_heads) * self.head_dim, bias=False)
        self.q_norm = OpenELMRMSNorm(self.head_dim)
        self.k_norm = OpenELMRMSNorm(self.head_dim)
        self.out_proj = nn.Linear(self.q_heads * self.head_dim, config.model_dim, bias=False)

    def forward(self, hidden_states, attention_mask, position_ids, past_key_value=None, use_cache=False):
        b, s, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, s, self.q_heads + 2 * self.k_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.k_heads, self.k_heads], dim=1)
        q, k = rotary(self.q_norm(q), position_ids, self.base), rotary(self.k_norm(k), position_ids, self.base)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx)
        rep = self.q_heads // self.k_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1)), None, past_key_value


class OpenELMFeedForwardNetwork(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        inner = int(config.ffn_multipliers[layer_idx] * config.model_dim)
        self.proj_1 = nn.Linear(config.model_dim, 2 * inner, bias=False)
        self.proj_2 = nn.Linear(inner, config.model_dim, bias=False)

    def forward(self, x):
        gate, up = self.proj_1(x).chunk(2, dim=-1)
        return self.proj_2(F.silu(gate) * up)


class OpenELMDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = OpenELMRMSNorm(config.model_dim)
        self.attn = OpenELMMultiHeadCausalAttention(config, layer_idx)
        self.ffn_norm = OpenELMRMSNorm(config.model_dim)
        self.ffn = OpenELMFeedForwardNetwork(config, layer_idx)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, use_cache=False):
        attn, _, present = self.attn(self.attn_norm(hidden_states), attention_mask, position_ids, past_key_value,
                                     use_cache)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.ffn(self.ffn_norm(hidden_states))
        return (hidden_states, None, present)


class OpenELMPreTrainedModel(PreTrainedModel):
    config_class = OpenELMConfig
    base_model_prefix = "transformer"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)


class OpenELMModel(OpenELMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(OpenELMDecoderLayer(config, i) for i in range(config.num_transformer_layers))
        self.norm = OpenELMRMSNorm(config.model_dim)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, inputs_embeds=None,
                position_ids=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.token_embeddings(input_ids)
        b, s, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, -1)
        causal = torch.ones(s, past + s, dtype=torch.bool, device=inputs_embeds.device).tril(past)
        mask = causal[None, None].expand(b, 1, s, past + s)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        hidden = inputs_embeds
        for layer in self.layers:
            outputs = layer(hidden, attention_mask=mask, position_ids=position_ids,
                            past_key_value=past_key_values if use_cache else None, use_cache=use_cache)
            hidden = outputs[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class OpenELMForCausalLM(OpenELMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = OpenELMModel(config)
        self.lm_head = None if config.share_input_output_layers else nn.Linear(config.model_dim, config.vocab_size,
                                                                              bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.token_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, inputs_embeds=None,
                position_ids=None, use_cache=None, labels=None, **kwargs):
        out = self.transformer(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                               inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache)
        hidden = out.last_hidden_state
        if self.lm_head is None:
            logits = F.linear(hidden, self.transformer.token_embeddings.weight)
        else:
            logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)
