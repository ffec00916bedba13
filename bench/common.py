"""Shared by the benchmark scripts: where results go and how each run is described."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def report(title: str, table: str, notes: str = "", path: str = RESULTS) -> None:
    """Print the table and add it as one dated section (command, device, table) to `path` (bench/RESULTS.md;
    "-" prints only, as CI's tiny runs do)."""
    print(table + (f"\n\n{notes}" if notes else ""))
    if path == "-":
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(RESULTS)).stdout.strip()
    stamp = datetime.date.today().isoformat()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"\n## {title}\n\n- date: {stamp}, commit {commit or '?'}\n- device: {device_name()}\n"
                 f"- command: `{command_line()}`\n\n{table}\n")
        if notes:
            fh.write(f"\n{notes}\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# models with random weights, and what a step costs

ARCHS = {
    # Llama-3-8B and Llama-3-70B shapes (random weights), and a tiny one for CPU runs in CI
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # a 250M-parameter Llama: big enough for a start-up in many shards to mean something on a CPU
    "llama-250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(arch: str):
    from transformers import LlamaConfig
    kw = dict(ARCHS[arch])
    theta = kw.pop("rope_theta", 10000.0)
    return LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)


def write_random_model(folder: str, arch: str, shard_bytes: int = 4 * 2**30, weights: bool = True) -> str:
    """A Hugging Face model folder with random bf16 weights (drawn on the GPU when there is one), written shard
    by shard, plus the tiny tokenizer (its ids are valid in any vocabulary). Reused when already there."""
    import json as _json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from merak_lora.stage import params_on_meta
    from merak_lora.tiny import make_tokenizer

    done = os.path.join(folder, "config.json")
    if os.path.isfile(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    config = llama_config(arch)
    make_tokenizer().save_pretrained(folder)
    if weights:
        with params_on_meta():
            meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        shard, size, files, weight_map = {}, 0, [], {}

        def flush():
            nonlocal shard, size
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

        for name, p in meta.named_parameters():
            shard[name] = (torch.randn(p.shape, dtype=torch.bfloat16, device=device) * 0.02).cpu()
            size += p.numel() * 2
            if size >= shard_bytes:
                flush()
        if shard:
            flush()
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            _json.dump({"metadata": {"total_size": sum(p.numel() * 2 for p in meta.parameters())},
                        "weight_map": weight_map}, fh)
    config.save_pretrained(folder)  # last: its presence marks a complete folder
    return folder


def bench_model(arch: str, model_dir: str = "", weights: bool = True) -> str:
    """`model_dir` if given, else the random-weight model of `arch` in the temp folder the benchmarks share (written
    once, reused by every script after). A folder without weights (for runs with --random_weights) has its own
    name, so a script that needs weights never finds it first."""
    return model_dir or write_random_model(bench_folder(arch, weights), arch, weights=weights)


def bench_folder(arch: str, weights: bool = True) -> str:
    import tempfile
    return os.path.join(tempfile.gettempdir(), "merak-bench", arch if weights else f"{arch}-no-weights")


def long_records(path: str, n: int, words: int = 1400) -> str:
    """Alpaca records whose answers run past --seq_length, so every training row is full (no padding)."""
    import json as _json

    from merak_lora.tiny import sample_texts
    text = " ".join(sample_texts())
    body = " ".join(text.split()[:words])
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(_json.dumps({"instruction": f"Repeat passage {i}.", "input": "", "output": body},
                                 ensure_ascii=False) + "\n")
    return path


def flops_per_token(config, seq: int, lora_r: int = 8, recompute: bool = False) -> float:
    """Training FLOPs per token with a frozen base: forward 2N and backward 2N (input gradients only; frozen
    weights need no weight gradient) for the N weights of the linears and the head, plus causal attention
    (forward 2·S·d, backward twice that, per layer), plus LoRA (6 per adapter weight). Recomputation is not
    counted as useful work."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    linear = L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * config.vocab_size
    lora = L * lora_r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    attention = L * 6 * seq * h
    return 4 * linear + attention + 6 * lora


def peak_bf16_tflops() -> float:
    """The bf16 matrix rate this GPU actually reaches (an 8192^3 product, median of 10)."""
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 ** 3 / sorted(times)[len(times) // 2] / 1e12


def run_worker(script: str, args: list[str], timeout: int = 900) -> dict | None:
    """Run `script` in a fresh process (its own CUDA context and peak-memory counters); parse its RESULT line."""
    import json as _json
    import time as _time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MERAK_BENCH_LAUNCH": repr(_time.time())}
    try:
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=root, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{' '.join(args[:2])}: timed out after {timeout}s", file=sys.stderr)
        return None
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{' '.join(args[:2])} failed:\n{(proc.stdout + proc.stderr)[-2500:]}", file=sys.stderr)
        return None
    return _json.loads(line[len("RESULT "):])


def run_ours(model_dir: str, seq: int, mb: int, gc: bool, steps: int, warmup: int, extra: list[str]) -> dict:
    """merak-lora's own entrypoint at pp=1 (this process is one rank): tokens/s averaged over the steps after
    the warm-up, peak memory, and seconds from the process launch (MERAK_BENCH_LAUNCH) to the first step."""
    import json as _json
    import tempfile as _tempfile

    from merak_lora.finetune import main

    tmp = _tempfile.mkdtemp()
    data = long_records(os.path.join(tmp, "long.jsonl"), 64)
    lora = os.path.join(tmp, "lora.json")
    with open(lora, "w") as fh:
        _json.dump({"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": TARGETS}, fh)
    code = main(["--model_path", model_dir, "--data_path", data, "--lora_config", lora, "--output_dir",
                 os.path.join(tmp, "out"), "--bf16", "true", "--seq_length", str(seq), "--pad_to_multiple_of", "64",
                 "--per_device_train_batch_size", str(mb), "--gradient_accumulation_steps", "4",
                 "--max_steps", str(warmup + steps), "--logging_steps", "1", "--save", "false",
                 "--gradient_checkpointing", str(gc).lower(), "--disable_tqdm", "true", "--report_to", "none",
                 *extra])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    rows = [_json.loads(line) for line in open(os.path.join(tmp, "out", "metrics.jsonl"))]
    after = [r for r in rows if r["step"] > warmup]
    launch = float(os.environ.get("MERAK_BENCH_LAUNCH", "nan"))
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in after) / len(after),
            "peak_gib": max(r["peak_mem_gib"] for r in rows), "first_step_s": rows[0]["time"] - launch}
