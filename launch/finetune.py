"""torchrun entrypoint for pipeline-parallel LoRA fine-tuning: `torchrun --nproc_per_node N launch/finetune.py
--model_path DIR --data_path FILE ...` (see README.md for the flags)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, no install

from merak_lora.entry import answer_early  # noqa: E402

if __name__ == "__main__":
    code = answer_early(sys.argv[1:], "python -m merak_lora.launch ... launch/finetune.py --flag value ...")
    if code is None:
        from merak_lora.finetune import main
        code = main()
    sys.exit(code)
