"""A tiny stand-in for apple/OpenELM's remote code: per-layer head counts and FFN widths, fused qkv_proj,
proj_1/proj_2, q/k norms, no lm_head (the output layer is the input embedding)."""

from transformers import PretrainedConfig


class OpenELMConfig(PretrainedConfig):
    model_type = "openelm"
    attribute_map = {"num_hidden_layers": "num_transformer_layers"}  # what transformers' generate() asks for

    def __init__(self, vocab_size=1024, model_dim=64, head_dim=16, num_transformer_layers=4,
                 num_query_heads=(2, 4, 4, 2), num_kv_heads=(1, 2, 2, 1), ffn_multipliers=(1.0, 2.0, 2.0, 1.0),
                 max_context_length=2048, rope_freq_constant=10000, share_input_output_layers=True,
                 initializer_range=0.2, **kwargs):
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.head_dim = head_dim
        self.num_transformer_layers = num_transformer_layers
        self.num_query_heads = list(num_query_heads)
        self.num_kv_heads = list(num_kv_heads)
        self.ffn_multipliers = list(ffn_multipliers)
        self.max_context_length = max_context_length
        self.rope_freq_constant = rope_freq_constant
        self.share_input_output_layers = share_input_output_layers
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
