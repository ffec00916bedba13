#!/usr/bin/env bash
# Pipeline-parallel LoRA fine-tuning under yhrun/srun or on this machine.
#
#   yhrun -p PART -N 8 bash slurm/run.sh --model_path M --data_path D --output_dir O ...   (one task per node)
#   srun -N 8 -n 32 --gpus-per-task 1 bash slurm/run.sh ...                                 (one task per GPU)
#   bash slurm/run.sh                                                                       (built-in demo)
#   CONFIG=flags.json bash slurm/run.sh                                                     (flags from a file)
#
# With no flags it trains the built-in default: a tiny Llama made locally, the bundled sample data, two
# pipeline stages (gloo on the CPU, or the GPUs when there are some).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launcher.sh"
ROOT=$(merak_root)

args=("$@")
if [[ -n "${CONFIG:-}" ]]; then args=(--config "$CONFIG" "${args[@]}"); fi
if [[ ${#args[@]} -eq 0 ]]; then
  DEMO=${DEMO_DIR:-$ROOT/demo}
  if [[ ! -f "$DEMO/tiny-llama/config.json" && "${SLURM_PROCID:-0}" == 0 ]]; then
    "$(merak_python)" -m merak_lora.tiny --model_type llama --out "$DEMO/tiny-llama"
  fi
  args=(--model_path "$DEMO/tiny-llama" --data_path "$ROOT/data/sample.json"
        --lora_config "$ROOT/configs/lora_config.json" --output_dir "$DEMO/output" --overwrite_output_dir true
        --pp 2 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --seq_length 128
        --num_train_epochs 20 --learning_rate 5e-3 --warmup_steps 10 --logging_steps 20 --save_steps 100)
fi
merak_launch "$ROOT/launch/finetune.py" "${args[@]}"
