"""merak-lora: pipeline-parallel LoRA fine-tuning of Hugging Face causal LMs on Slurm clusters."""

__version__ = "0.1.0"
