"""Every model type transformers maps to a causal LM (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, 178 in 5.17), sorted
by what merak-lora does with it. tests/test_families.py holds each to its place; tests/family_table.py writes
docs/models.md's table from it. A type transformers adds later lands in SPLITS, so the sweep tries it."""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from merak_lora.models import NO_PIPELINE_GENERATION

# Not fine-tuned here, with why (no tiny model is built for them).
OUT_OF_SCOPE = {
    "musicgen": "its causal LM decodes several codebooks of audio tokens at once, conditioned on a text encoder",
    "musicgen_melody": "its causal LM decodes several codebooks of audio tokens at once, conditioned on a text "
                       "encoder",
    "gemma4_assistant": "a draft model for Gemma 4's speculative decoding: it reads the main model's hidden "
                        "states and KV cache, so it is not trained on its own",
    "gemma4_unified_assistant": "a draft model for speculative decoding: it reads the main model's hidden states "
                                "and KV cache, so it is not trained on its own",
    "gemma3n": "not built in the sweep: its vision tower needs timm, which the project does not install; its "
               "language model is gemma3n_text (trains with --pp 1 only, for the same reason)",
}

# Refused at every stage count from the config alone, with a phrase of the message.
REFUSED = {
    "blt": "names no layer count",           # byte patcher, local encoder, global and local decoder
    "hrm_text": "found no ModuleList",       # its two modules loop over their layers several times
    "reformer": "cannot be fine-tuned with LoRA",
}

# Refused at more than one stage from the config alone (with a phrase of the reason); exact at one stage.
PP1_ONLY = {
    "cpmant": "also read inputs computed from",              # learned position bias, computed once
    "gemma3n_text": "also read inputs computed from",        # per-layer inputs from the token ids
    "gemma4": "also read inputs computed from",
    "gemma4_text": "also read inputs computed from",
    "roformer": "also read inputs computed from",            # sinusoidal positions, computed once
    "zamba": "also read inputs computed from",               # the embeddings, concatenated in every layer
    "zamba2": "also read inputs computed from",
    "deepseek_v4": "hidden state between its layers has shape",   # hyper-connections: several streams
    "hy_v4": "hidden state between its layers has shape",
    "prophetnet": "hidden state between its layers has shape",    # main and n-gram streams
    "xlnet": "hidden state between its layers has shape",         # (tokens, batch, hidden)
    "glm_moe_dsa": "hands the next one more than its hidden state",  # the indexer's top-k, layer to layer
    "zaya": "hands the next one more than its hidden state",         # the router's hidden state
    "xlm": "parallel lists",
    "xmod": "language adapters",
    "qwen4_exp": "wide, not its hidden_size",       # hyper-connections: four residual streams side by side
    "qwen4_exp_text": "wide, not its hidden_size",
}

# The one-stage check cannot run: transformers 5.17 does not load its own tiny checkpoint back whole.
ONE_STAGE_UNCHECKED = {
    "deepseek_v4": "its checkpoint renaming turns model.norm into model.kv_norm, so from_pretrained and the "
                   "stage's loader (the same rules) both miss model.norm.weight",
}

# Pipeline generation fails or differs from generate() for these (training is checked, generation is not);
# the product refuses them at more than one stage (merak_lora.models.NO_PIPELINE_GENERATION).
NO_GENERATION = NO_PIPELINE_GENERATION

# Adapters PEFT gives no gradient either on this input (module names), so the check skips them.
IDLE = {
    "doge": ("dt_proj",),                    # feeds a dynamic mask that applies past 2048 tokens (keep_window_size)
    "zaya": ("q_proj", "k_proj"),
    "gemma3n_text": ("per_layer_input_gate", "per_layer_projection"),
}

SPLITS = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(OUT_OF_SCOPE) - set(REFUSED) - set(PP1_ONLY))

# The default run's families, one for each path of the split not tests/test_models.py's: BLOOM (layers
# returning tuples, ALiBi, a norm before the layers, no pipeline plan, targets from PEFT's mapping), CTRL
# (all-linear targets named by two names, inputs_embeds scaled in place), Mllama (layers its loop skips), and
# Gemma 4 at one stage (the per-layer inputs refusal).
FAST = {"bloom", "ctrl", "mllama", "gemma4_text"}
