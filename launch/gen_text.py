"""Generation entrypoint: `torchrun --nproc_per_node N launch/gen_text.py --model_path DIR
--resume_peft_from_checkpoint CKPT` chats across the pipeline; `python launch/gen_text.py ...` runs in one
process (also with --adapter_path for an exported PEFT adapter, or a merged model as --model_path)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, no install

from merak_lora.config import NOT_APPLICABLE_HERE, GenConfig  # noqa: E402
from merak_lora.entry import answer_early  # noqa: E402

if __name__ == "__main__":
    code = answer_early(sys.argv[1:], "[python -m merak_lora.launch ...] launch/gen_text.py --model_path DIR "
                        "[--resume_peft_from_checkpoint CKPT] ...", GenConfig, NOT_APPLICABLE_HERE)
    if code is None:
        from merak_lora.chat import main
        code = main()
    sys.exit(code)
