"""A tiny stand-in for IndexTeam/Index-1.9B-Chat's remote code: Llama-shaped names, a normalised output head."""

from transformers import PretrainedConfig


class IndexConfig(PretrainedConfig):
    model_type = "index"

    def __init__(self, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                 norm_head=True, initializer_range=0.2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.norm_head = norm_head
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
