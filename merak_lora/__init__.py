"""merak-lora: pipeline-parallel LoRA fine-tuning of Hugging Face causal LMs on Slurm clusters."""

import logging

# bitsandbytes warns as it is imported, on CPUs with AVX512-BF16, that an optional package for its CPU 4-bit kernel
# is missing; nothing here needs that kernel, and the warning would come before every one-line error of a run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
