from setuptools import find_packages, setup

setup(
    name="merak-lora",
    version="0.1.0",
    description="Pipeline-parallel LoRA fine-tuning of Hugging Face causal LMs on Slurm clusters",
    packages=find_packages(include=["merak_lora", "merak_lora.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "peft>=0.21,<0.22",
        "safetensors>=0.6",
        "tokenizers>=0.22",
        "tensorboard>=2.18",
        "tqdm",
    ],
    extras_require={"slurm": ["submitit>=1.5"], "qlora": ["bitsandbytes>=0.45"],
                    "test": ["pytest>=8", "submitit>=1.5", "bitsandbytes>=0.45"]},
)
