#!/usr/bin/env bash
# Chat with the fine-tuned model across the pipeline, under yhrun/srun or on this machine.
#
#   yhrun -p PART -N 2 bash slurm/gen.sh --model_path M --resume_peft_from_checkpoint O/checkpoint-500
#   bash slurm/gen.sh                                  (the demo's model and its latest checkpoint)
#   bash slurm/gen.sh --prompt "你是谁？" --compare_base true
#
# Flags are those of run.sh plus --prompt, --prompts FILE, --compare_base, --max_new_tokens, --temperature,
# --top_k, --top_p, --repetition_penalty, --stop, --system; from a checkpoint of several adapters (--adapters),
# every adapter answers under its name, or those of --adapter_names a,b.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
ROOT=$(merak_root)

args=("$@")
if [[ -n "${CONFIG:-}" ]]; then args=(--config "$CONFIG" "${args[@]}"); fi
has_model=0
for a in "${args[@]}"; do [[ "$a" == --model_path* || "$a" == --config* ]] && has_model=1; done
if [[ $has_model -eq 0 ]]; then
  DEMO=${DEMO_DIR:-$ROOT/demo}
  args=(--model_path "$DEMO/tiny-llama" --output_dir "$DEMO/output" --resume_peft_from_checkpoint latest
        --max_new_tokens 48 "${args[@]}")
fi
merak_launch "$ROOT/launch/gen_text.py" "${args[@]}"
