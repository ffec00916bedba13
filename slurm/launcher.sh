# Shared by run.sh and gen.sh (sourced, not run): start a Python entrypoint on every rank, whatever shape the
# Slurm step has, or as a one-node job outside Slurm.
#
#   one task per node (srun -N 8 -n 8):    python -m merak_lora.launch --nnodes $SLURM_NNODES --node_rank ...
#   one task per GPU  (srun -N 8 -n 32):   the entrypoint itself, RANK/WORLD_SIZE/LOCAL_RANK from Slurm
#   no Slurm:                              python -m merak_lora.launch on this machine
#
# merak_lora.launch is torchrun's static mode with the project's exit codes (2 bad input, 75 stopped after
# saving) and signal handling (docs/design.md, "Launching").
#
# Every user value is passed as its own quoted word: paths with spaces, quotes or $ are never re-parsed.

merak_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

merak_python() {
  local root; root=$(merak_root)
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x "$root/.venv/bin/python" ]]; then echo "$root/.venv/bin/python"
  else command -v python3; fi
}

# GPUs this node gives the job: Slurm's count, else CUDA_VISIBLE_DEVICES, else what nvidia-smi lists; 0 = CPU.
merak_gpus_per_node() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then echo "${SLURM_GPUS_ON_NODE%%(*}"; return; fi
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local IFS=,; local -a ids=($CUDA_VISIBLE_DEVICES); echo "${#ids[@]}"; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 0; return; fi
  echo 0
}

# The first node of the allocation, as an address the other nodes can reach.
merak_master_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  if getent hosts "$first" >/dev/null 2>&1; then echo "$first"; return; fi
  addr=$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  echo "${addr:-$first}"
}

# merak_launch ENTRY [ARGS...]
merak_launch() {
  local entry=$1; shift
  local py gpus nproc
  py=$(merak_python)
  gpus=$(merak_gpus_per_node)
  nproc=${NPROC_PER_NODE:-$gpus}
  [[ "$nproc" -gt 0 ]] || nproc=${CPU_RANKS_PER_NODE:-2}   # no GPU: gloo ranks on the CPU
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH="$(merak_root)${PYTHONPATH:+:$PYTHONPATH}"   # the launcher runs from a clone, no install
  if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NTASKS:-}" && -n "${SLURM_PROCID:-}" ]]; then
    export MASTER_ADDR=${MASTER_ADDR:-$(merak_master_addr)}
    # the same on every node, below Linux's ephemeral ports (merak_lora/slurm.py: rendezvous_port)
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if [[ "${SLURM_STEP_NUM_NODES:-$nnodes}" -lt "$nnodes" ]]; then nnodes=$SLURM_STEP_NUM_NODES; fi
    if [[ "$SLURM_NTASKS" -gt "$nnodes" ]]; then
      # one task per GPU: this task is one rank
      export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=${SLURM_LOCALID:-0}
      exec "$py" -u "$entry" "$@"
    fi
    # one task per node: the launcher starts this node's ranks
    exec "$py" -u -m merak_lora.launch --nnodes "$nnodes" --node_rank "${SLURM_NODEID:-0}" \
      --nproc_per_node "$nproc" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$entry" "$@"
  fi
  exec "$py" -u -m merak_lora.launch --nproc_per_node "$nproc" "$entry" "$@"
}
