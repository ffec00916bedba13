"""Typed run configuration and the one parser for Merak/HF-style `--flag value` command lines.

Everything that can be checked without loading a model is checked here, so a bad command line fails in
a second on the login node instead of after the job has waited in the queue.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints

if TYPE_CHECKING:
    from .generate import Sampling


class ConfigError(ValueError):
    """A problem with the user's flags or files; the message says what to change."""


SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "interleaved_zb", "zbv", "dualpipev")
MULTI_STAGE_SCHEDULES = ("interleaved1f1b", "interleaved_zb", "zbv", "dualpipev")
V_SCHEDULES = ("zbv", "dualpipev")
# Zero-bubble schedules: a stage's backward runs as two passes (inputs' gradients, then weights').
SPLIT_BACKWARD_SCHEDULES = ("interleaved_zb", "zbv", "dualpipev")
PARTITION_METHODS = ("uniform", "uniform_floor", "parameters")
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class Config:
    # --- model -------------------------------------------------------------------------------------
    model_path: str = _help("Hugging Face model folder (config, tokenizer, safetensors).", default="")
    resume_from_checkpoint: str = _help(
        "Folder holding the base weights as safetensors (Merak's meaning); defaults to --model_path.", default="")
    trust_remote_code: bool = _help("Allow the model folder's own Python code to run.", default=False)
    attn_implementation: str = _help("sdpa, eager or flash_attention_2.", default="sdpa")
    lora_config: str = _help("PEFT-style LoRA config JSON (r, lora_alpha, target_modules, ...).",
                             default="configs/lora_config.json")
    adapters: str = _help("JSON file of several adapters to train over one copy of the base, each with its own LoRA "
                          "config, data, learning rate, batch and seed ({\"adapters\": [{\"name\": ..., "
                          "\"lora_config\": ..., \"data_path\": ...}, ...]}); the flags are their defaults.",
                          default="")
    list_target_modules: bool = _help("Print the model's linear module names and exit.", default=False)
    random_weights: bool = _help("Benchmarks: random base weights drawn on the device, no safetensors read "
                                 "(only config.json and the tokenizer are needed).", default=False)
    # --- data --------------------------------------------------------------------------------------
    data_path: str = _help("Instruction data: JSON array, JSON lines, or a folder of them.", default="")
    seq_length: int = _help("Tokens per sequence after truncation.", default=1024)
    system: str = _help("System prompt for records that carry none.", default="")
    template: str = _help("Prompt template when the tokenizer has no chat template: deepseek, llama2, llama3, "
                          "qwen, index, plain.", default="")
    data_format: str = _help("auto, alpaca, sharegpt or messages.", default="auto")
    field_map: str = _help("Record keys under other names, e.g. instruction=en_instruction,output=en_output.",
                           default="")
    skip_bad_records: bool = _help("Skip malformed records (counted in the log) instead of stopping.",
                                   default=False)
    packing: bool = _help("Pack several short records into one sequence (attention stays per record).",
                          default=False)
    eval_data_path: str = _help("Held-out records for an eval loss.", default="")
    eval_ratio: float = _help("Hold out this fraction of --data_path for the eval loss.", default=0.0)
    eval_steps: int = _help("Eval loss every N steps (and at the end); 0 means every --save_steps.", default=0)
    data_cache_dir: str = _help("Where tokenized data is cached; default <output_dir>/data_cache.", default="")
    pad_to_multiple_of: int = _help("Round each step's padded length up to this.", default=8)
    # --- batch and schedule --------------------------------------------------------------------------
    per_device_train_batch_size: int = _help("Sequences per microbatch.", default=1)
    gradient_accumulation_steps: int = _help("Microbatches per optimizer step (per pipeline replica).", default=8)
    pp: int = _help("Pipeline stages (ranks per pipeline); world size / pp replicas train data-parallel. "
                    "0 means the whole world is one pipeline.", default=0)
    partition_method: str = _help("parameters (balance each stage's matmul work, the head included), uniform, "
                                  "uniform_floor, or layer counts like 3,3,2,2.", default="parameters")
    pipeline_schedule: str = _help("gpipe, 1f1b, interleaved1f1b, interleaved_zb, zbv, dualpipev.", default="1f1b")
    stages_per_rank: int = _help("Model chunks per rank for interleaved schedules (zbv/dualpipev need 2).",
                                 default=0)
    no_tie_modules: bool = _help("Give first and last stage separate copies of tied embeddings.", default=False)
    split_method: str = _help("How the model is cut (Merak flag); only layer_split applies.", default="layer_split")
    gradient_checkpointing: bool = _help("Recompute each decoder layer in backward to save memory.", default=False)
    compile: bool = _help("torch.compile each decoder layer (fuses norms, rotary, activations, LoRA adds); "
                          "generating, each stage's one-token step.",
                          default=False)
    # --- optimisation ------------------------------------------------------------------------------
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Clip the global gradient norm (all stages) to this; 0 disables.", default=1.0)
    lr_scheduler_type: str = _help("transformers' schedule: linear, cosine, cosine_with_restarts, polynomial, "
                                   "constant, constant_with_warmup, inverse_sqrt, cosine_with_min_lr, "
                                   "warmup_stable_decay, ...", default="linear")
    lr_scheduler_kwargs: str = _help("JSON object of the schedule's own arguments, e.g. '{\"min_lr_rate\": 0.1}'.",
                                     default="")
    warmup_steps: int = _help("Warm-up steps (overrides --warmup_ratio).", default=0)
    warmup_ratio: float = _help("Warm-up as a fraction of all steps.", default=0.0)
    num_train_epochs: float = _help("Passes over the data.", default=1.0)
    max_steps: int = _help("Optimizer steps; overrides --num_train_epochs when > 0.", default=-1)
    seed: int = _help("Seed for data order, LoRA init and dropout.", default=42)
    bf16: bool = _help("bfloat16 base weights and compute.", default=False)
    fp16: bool = _help("float16 base weights with a loss scaler.", default=False)
    max_skipped_steps: int = _help("Stop after this many consecutive non-finite steps.", default=5)
    optim: str = _help("adamw_torch, or from bitsandbytes: paged_adamw_32bit, adamw_8bit, paged_adamw_8bit.",
                       default="adamw_torch")
    # --- QLoRA ----------------------------------------------------------------------------------------
    load_in_4bit: bool = _help("4-bit base weights (bitsandbytes), quantized as each stage loads them.",
                               default=False)
    load_in_8bit: bool = _help("8-bit base weights (bitsandbytes LLM.int8).", default=False)
    bnb_4bit_quant_type: str = _help("nf4 or fp4.", default="nf4")
    bnb_4bit_use_double_quant: bool = _help("Quantize the 4-bit quantization constants too.", default=False)
    bnb_4bit_compute_dtype: str = _help("float32, bfloat16 or float16; default: the training dtype.", default="")
    fp8: bool = _help("FP8 (e4m3) base linears, forward and input gradient on the FP8 units (Hopper/Ada GPUs); "
                      "block-scaled FP8 checkpoints load as they are.", default=False)
    # --- output ------------------------------------------------------------------------------------
    output_dir: str = _help("Where checkpoints, logs and TensorBoard runs go.", default="output")
    overwrite_output_dir: bool = _help("Allow training into an output_dir that holds another run.", default=False)
    logging_steps: int = _help("Log every N optimizer steps.", default=10)
    save: bool = _help("Write checkpoints (Merak flag).", default=True)
    save_steps: int = _help("Checkpoint every N steps (and at the end).", default=500)
    save_total_limit: int = _help("Keep only the newest N checkpoints; 0 keeps all.", default=0)
    resume_peft_from_checkpoint: str = _help("Checkpoint folder or 'latest' to resume LoRA training from.",
                                             default="")
    ignore_data_skip: bool = _help("On resume with other data: start it from its first sample (step count and "
                                   "learning-rate schedule carry on) instead of refusing.", default=False)
    wall_clock_breakdown: bool = _help("Log time spent in data, pipeline, optimizer and checkpoint.", default=False)
    report_to: str = _help("tensorboard (or all) or none.", default="tensorboard")
    # --- runtime -----------------------------------------------------------------------------------
    device: str = _help("auto, cpu or cuda.", default="auto")
    dist_timeout: int = _help("Seconds a collective may wait before the job fails.", default=300)
    disable_tqdm: bool = _help("No progress bar.", default=False)

    # --- derived helpers ---------------------------------------------------------------------------
    @property
    def weights_path(self) -> str:
        return self.resume_from_checkpoint or self.model_path

    @property
    def microbatches(self) -> int:
        return self.gradient_accumulation_steps

    def scheduler_kwargs(self) -> dict:
        if not self.lr_scheduler_kwargs:
            return {}
        try:
            value = json.loads(self.lr_scheduler_kwargs)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lr_scheduler_kwargs is not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise ConfigError("--lr_scheduler_kwargs must be a JSON object, e.g. '{\"num_cycles\": 2}'")
        return value

    def chunks_per_rank(self) -> int:
        if self.pipeline_schedule in V_SCHEDULES:
            return 2
        if self.pipeline_schedule in MULTI_STAGE_SCHEDULES:
            return self.stages_per_rank or 2
        return 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Flags from Merak or Hugging Face TrainingArguments that users bring along but that mean nothing here.
# Each says why, so nobody wonders whether it was honoured.
NOT_APPLICABLE = {
    "dataloader_num_workers": "data is tokenized once up front; there is no loader worker pool",
    "remove_unused_columns": "records are turned into token ids here; there are no dataset columns",
    "cache_dir": "models load from --model_path only; nothing is downloaded",
    "do_train": "launch/finetune.py always trains",
    "half_precision_backend": "use --bf16 or --fp16",
    "ddp_find_unused_parameters": "data parallelism here all-reduces LoRA gradients directly, not through DDP",
    "shard_count": "pipeline cuts are given by --partition_method",
    "return_logits": "only meaningful for launch/gen_text.py",
    "text_generation": "only meaningful for launch/gen_text.py",
    "input_names": "the first stage always receives the token ids (and, with --packing, their positions); each "
                   "model builds its own attention mask",
}
# Merak's gen_text.py flags: reported once, as every flag without an effect is
NOT_APPLICABLE_HERE = {**NOT_APPLICABLE, "return_logits": "answers are decoded to text; no logits are returned",
                       "text_generation": "launch/gen_text.py always generates text"}


@dataclass
class GenConfig(Config):
    """The fine-tuning flags (so gen.sh can reuse run.sh's) plus the generation ones."""

    prompt: str = _help("Answer this one prompt and exit (no chat).", default="")
    prompts: str = _help("Answer a file of prompts (one per line, or JSON lines with prompt/instruction/text) in "
                         "batches, into --output_file.", default="")
    output_file: str = _help("Where --prompts answers go as JSON lines; default: <output_dir>/generations.jsonl.",
                             default="")
    max_new_tokens: int = _help("Longest answer, in tokens.", default=256)
    temperature: float = _help("0 decodes greedily; above 0 samples (with --seed).", default=0.0)
    top_k: int = _help("Sample from the k likeliest tokens; 0: all.", default=0)
    top_p: float = _help("Sample from the smallest set of tokens of this total probability; 1: all.", default=1.0)
    repetition_penalty: float = _help("Above 1 makes tokens already in the text less likely.", default=1.0)
    stop: list = _help("End an answer at any of these strings (--stop A B ...).", default=None)
    gen_batch_size: int = _help("Prompts of a --prompts file decoded together (at least the stage count keeps "
                                "every stage busy).", default=8)
    compare_base: bool = _help("Show the base model's answer beside the fine-tuned one (the adapter then stays "
                               "apart from the base weights instead of merged).", default=False)
    fused_decode: bool = _help("Decode each token with merak-lora's own kernels between the products where the "
                               "model allows (Llama, Mistral and Qwen2 layers, on CUDA); false keeps the "
                               "transformers layers for every token.", default=True)
    adapter_path: str = _help("An exported PEFT adapter folder to answer with (one process).", default="")
    adapter_names: str = _help("A checkpoint of several adapters: answer with these (a,b), not all.", default="")

    def sampling(self) -> "Sampling":
        from .generate import Sampling  # torch and transformers: kept out of this module, which the entry reads
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                        self.seed, list(self.stop or []))


# Passed by launchers rather than users (torch.distributed.launch's --local_rank): the rank comes from the
# environment, so these are taken without a word.
FROM_LAUNCHERS = {"local_rank", "local-rank"}
RENAMED = {
    "activation_checkpointing": "gradient_checkpointing",
    "model_name_or_path": "model_path",
    "pipeline_model_parallel_size": "pp",
    "train_schedule": "pipeline_schedule",
    "lr": "learning_rate",
    "torch_compile": "compile",
}


def _to_bool(flag: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{flag} takes true or false, got {text!r}")


def _convert(flag: str, kind: Any, values: list[str]) -> Any:
    if kind is list:
        return list(values)
    if len(values) != 1:
        raise ConfigError(f"--{flag} takes one value, got {len(values)}: {' '.join(values)}")
    text = values[0]
    if kind is bool:
        return _to_bool(flag, text)
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{flag} takes {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return text


def _split_argv(argv: list[str]) -> list[tuple[str, list[str]]]:
    """Group `--name v1 v2` and `--name=v` tokens; a bare `--flag` has no values."""
    groups: list[tuple[str, list[str]]] = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, val = tok[2:].partition("=")
            groups.append((name.replace("-", "_"), [val] if eq else []))
        elif groups:
            groups[-1][1].append(tok)
        else:
            raise ConfigError(f"unexpected argument {tok!r}; flags are written --name value")
    return groups


def parse_args(argv: list[str], *, config_cls: type = Config, warn=print,
               not_applicable: dict[str, str] | None = None) -> Any:
    """Parse Merak/HF-style flags (`--fp16 false --save true`, `--flag=value`) into a config dataclass.

    A JSON file given as `--config FILE` supplies defaults that later flags override. Flags in `not_applicable`
    (default NOT_APPLICABLE) are reported through `warn`, once each, and otherwise ignored.
    """
    not_applicable = NOT_APPLICABLE if not_applicable is None else not_applicable
    hints = get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    noted: set[str] = set()
    for name, vals in _split_argv(argv):
        if name == "config":
            values.update(_read_config_file(vals, fields))
            continue
        if name in RENAMED and RENAMED[name] in fields:
            name = RENAMED[name]
        if name in FROM_LAUNCHERS:
            continue
        if name in not_applicable and name not in fields:
            if name not in noted:
                warn(f"note: --{name} is accepted but has no effect: {not_applicable[name]}")
                noted.add(name)
            continue
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown flag --{name}{hint}; `--help` lists every flag")
        kind = hints[name]
        kind = {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(kind, kind) \
            if isinstance(kind, str) else kind
        if kind is bool and not vals:
            values[name] = True
        elif not vals:
            raise ConfigError(f"--{name} needs a value")
        else:
            values[name] = _convert(name, kind, vals)
    return config_cls(**values)


def read_json_file(path: str, flag: str) -> Any:
    """A JSON file a flag names, with a one-line error naming the flag for a missing file or bad JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--{flag} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--{flag} {path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_config_file(vals: list[str], fields: dict) -> dict:
    if len(vals) != 1:
        raise ConfigError("--config takes one JSON file")
    path = vals[0]
    data = read_json_file(path, "config")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}")
    return data


def help_text(config_cls: type = Config) -> str:
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<30} {f.metadata.get('help', '')} [default: {default}]")
    return "\n".join(lines)


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need only the flags and the world size, and nothing but the standard library: the entry
    scripts run them before torch is imported (entry.py). The schedule's name is checked with transformers'
    list in progress.schedule_factor; model-dependent checks live in checks.py."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(bool(cfg.model_path or cfg.resume_from_checkpoint),
         "no model: pass --model_path DIR (a Hugging Face folder with config.json and safetensors)")
    need(bool(cfg.data_path), "no data: pass --data_path FILE_OR_FOLDER (JSON array or JSON lines records)")
    need(not (cfg.bf16 and cfg.fp16), "--bf16 and --fp16 are both true; choose one")
    need(cfg.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1")
    need(cfg.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps (microbatches per step) must be >= 1")
    need(cfg.seq_length >= 8, f"--seq_length {cfg.seq_length} is too short; use at least 8 tokens")
    need(cfg.pad_to_multiple_of >= 1, "--pad_to_multiple_of must be at least 1")
    need(cfg.learning_rate > 0, "--learning_rate must be positive")
    need(cfg.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0 disables clipping)")
    need(cfg.logging_steps >= 1, "--logging_steps must be at least 1")
    need(cfg.save_steps >= 1, "--save_steps must be at least 1")
    need(cfg.save_total_limit >= 0, "--save_total_limit must be >= 0 (0 keeps all)")
    need(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "set --max_steps > 0 or --num_train_epochs > 0")
    need(0.0 <= cfg.warmup_ratio < 1.0, "--warmup_ratio must be in [0, 1)")
    need(0.0 <= cfg.eval_ratio < 1.0, "--eval_ratio must be in [0, 1)")
    need(not (cfg.eval_ratio and cfg.eval_data_path), "give --eval_data_path or --eval_ratio, not both")
    need(cfg.eval_steps >= 0, "--eval_steps must be >= 0")
    need(cfg.warmup_steps >= 0, "--warmup_steps must be >= 0")
    need(cfg.dist_timeout > 0, "--dist_timeout must be a positive number of seconds")
    need(cfg.max_skipped_steps >= 0, "--max_skipped_steps must be >= 0")
    cfg.scheduler_kwargs()
    need(cfg.pipeline_schedule in SCHEDULES,
         f"--pipeline_schedule {cfg.pipeline_schedule!r} is not one of {', '.join(SCHEDULES)}")
    need(cfg.report_to in ("tensorboard", "all", "none"),
         f"--report_to {cfg.report_to}: merak-lora writes TensorBoard event files (and metrics.jsonl); use "
         "--report_to tensorboard or none")
    need(not (cfg.load_in_4bit and cfg.load_in_8bit), "--load_in_4bit and --load_in_8bit are both true; choose one")
    for bits in ("4", "8"):
        need(not (cfg.fp8 and getattr(cfg, f"load_in_{bits}bit")),
             f"--fp8 and --load_in_{bits}bit are both true; choose one way to quantize the base")
    need(cfg.bnb_4bit_quant_type in ("nf4", "fp4"), "--bnb_4bit_quant_type is nf4 or fp4")
    need(cfg.optim in OPTIMIZERS, f"--optim {cfg.optim!r} is not one of {', '.join(OPTIMIZERS)}")
    need(cfg.device in ("auto", "cpu", "cuda"), "--device is auto, cpu or cuda")
    need(cfg.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
         "--attn_implementation is sdpa, eager or flash_attention_2")
    need(cfg.split_method == "layer_split",
         f"--split_method {cfg.split_method!r}: merak-lora cuts the model between decoder layers only; "
         "use --split_method layer_split (Merak's graph-tracing split methods do not apply to LoRA stages)")
    if cfg.pipeline_schedule in V_SCHEDULES:
        need(cfg.stages_per_rank in (0, 2),
             f"--pipeline_schedule {cfg.pipeline_schedule} places exactly 2 stages per rank; drop --stages_per_rank")
    elif cfg.pipeline_schedule not in MULTI_STAGE_SCHEDULES:
        need(cfg.stages_per_rank in (0, 1),
             f"--stages_per_rank {cfg.stages_per_rank} needs an interleaved schedule "
             "(--pipeline_schedule interleaved1f1b, interleaved_zb, zbv or dualpipev)")
    else:
        need(cfg.stages_per_rank in (0,) or cfg.stages_per_rank >= 2,
             "--stages_per_rank must be at least 2 for interleaved schedules")
    need(not (cfg.compile and cfg.pipeline_schedule in SPLIT_BACKWARD_SCHEDULES),
         f"--compile true cannot run with --pipeline_schedule {cfg.pipeline_schedule}: its split backward needs "
         "each operation's own autograd node, and a compiled layer is one (torch 2.11 fails on it; elsewhere the "
         "layer's backward would run twice). Use --pipeline_schedule 1f1b or interleaved1f1b with --compile "
         "(faster for LoRA anyway: bench/RESULTS.md), or --compile false")
    pp = cfg.pp or world_size
    need(cfg.pp >= 0, "--pp must be positive")
    need(world_size % pp == 0,
         f"world size {world_size} is not divisible by --pp {pp}; launch a multiple of {pp} ranks or change --pp")
    stages = pp * cfg.chunks_per_rank()
    if cfg.pipeline_schedule not in ("gpipe", "1f1b") and stages > 1:
        need(cfg.microbatches >= pp,
             f"--gradient_accumulation_steps {cfg.microbatches} is fewer than the {pp} pipeline ranks; "
             f"{cfg.pipeline_schedule} needs at least {pp} microbatches per step: raise --gradient_accumulation_steps "
             f"to {pp} or more (4 x {pp} keeps the pipeline busy), or use --pipeline_schedule 1f1b")
    if cfg.pipeline_schedule in ("interleaved1f1b", "interleaved_zb") and cfg.microbatches > pp:
        need(cfg.microbatches % pp == 0,
             f"--gradient_accumulation_steps {cfg.microbatches} must be a multiple of --pp {pp} "
             f"for {cfg.pipeline_schedule}")
    if cfg.pipeline_schedule == "dualpipev":
        need(cfg.microbatches >= stages,
             f"dualpipev needs at least {stages} microbatches (2 per stage rank); "
             f"raise --gradient_accumulation_steps")
    if cfg.partition_method not in PARTITION_METHODS:
        parts = cfg.partition_method.split(",")
        need(all(p.strip().isdigit() for p in parts),
             f"--partition_method {cfg.partition_method!r} is not uniform, uniform_floor, parameters "
             "or a comma list of layer counts such as 4,4,4,4")
        need(len(parts) == stages,
             f"--partition_method lists {len(parts)} stages but the pipeline has {stages} "
             f"(pp={pp} x {cfg.chunks_per_rank()} per rank)")
    need(os.path.isdir(cfg.weights_path) or not cfg.weights_path,
         f"model folder {cfg.weights_path!r} does not exist")
