"""Decode speed: merak-lora's pipeline generation (prefill, then a token at a time, each stage with its own KV cache),
with the static cache and CUDA-graph steps (decode.py) and without, against transformers' generate() on the same
model, greedy, same prompts; the time to the first token for a long prompt, and the memory bound on the GPU.

    python bench/decode.py --arch llama3-8b [--batch 8 --prompt_len 128 --new 128 --repeats 5]
    python bench/decode.py --arch llama3-70b --load_in_4bit true --random_weights true   # 70B on one GPU
    torchrun --nproc_per_node 2 bench/decode.py --arch llama3-8b --pp 2      # stages on 2 GPUs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import RESULTS, TARGETS, markdown_table, report, bench_model  # noqa: E402


def timed(fn) -> float:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def spread(values: list[float]) -> str:
    """The median, and with more than one value their range: a ratio between rows means something only past it."""
    median = f"{statistics.median(values):,.0f}"
    return median if len(values) == 1 else f"{median} ({min(values):,.0f}-{max(values):,.0f})"


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """How many answers are token for token the same, and where the others part."""
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
    differ = sorted(f for f in firsts if f is not None)
    return f"{len(firsts) - len(differ)} of {len(firsts)} prompts" + \
        ("" if not differ else f" (the others part at tokens {differ})")


def graph_check(gen, prompts, adapters) -> list[str]:
    """Greedy tokens of CUDA-graph replay against the same static cache run eagerly, per adapter setting."""
    from merak_lora.generate import Sampling
    notes = []
    for adapter in adapters:
        gen.static, gen.graphs = True, False
        eager = gen.generate(prompts, Sampling(max_new_tokens=32), adapter=adapter)
        gen.graphs = True
        graphed = gen.generate(prompts, Sampling(max_new_tokens=32), adapter=adapter)
        notes.append(f"Adapter {'on' if adapter else 'off'}: CUDA-graph replay and the same static cache run "
                     f"eagerly give the same 32 greedy tokens for {agreement(graphed, eager)}.")
    return notes


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write), the memory bound's measure."""
    import torch
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: [dst.copy_(src) for _ in range(10)]) / 10
    return 2 * src.numel() / seconds


def show_profile(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    print(f"===== {label}")
    import torch
    key = "self_cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=55))
    if torch.cuda.is_available():
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        print(f"{len(kernels)} kernels, {sum(e.device_time_total for e in kernels) / 1e3:.1f} ms of GPU time")


def transformers_model(model_dir: str, four_bit: bool, dtype, device: str, meta: dict | None):
    """The model as a transformers + PEFT user loads it: from the folder, NF4 through transformers' own bitsandbytes
    loading, the same shape of adapter through PEFT (as `PeftModel.generate` runs a fine-tune)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if four_bit:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": 0},
                                                     quantization_config=BitsAndBytesConfig(
                                                         load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if meta:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(**meta["lora"]))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama3-8b")
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--lora", default="true", help="decode with a LoRA adapter on every linear")
    ap.add_argument("--compile", default="false",
                    help="add rows with each stage's one-token step compiled (gen.sh --compile true)")
    ap.add_argument("--load_in_4bit", default="false", help="the base in 4 bits (bitsandbytes NF4), as gen.sh")
    ap.add_argument("--fused", default="true",
                    help="add a row with merak-lora's fused one-token step (fused_decode.py; gen.sh's default where "
                         "the model allows it; the other rows run the transformers layers)")
    ap.add_argument("--ahead", default="true",
                    help="add a fused row whose host reads each step's tokens before queuing the next (the GPU "
                         "then waits on the host between tokens; the other rows queue a step ahead)")
    ap.add_argument("--apart", default="false",
                    help="add rows with the linears that read one input run one by one (shared_products.py off)")
    ap.add_argument("--ttft_len", type=int, default=1000, help="prompt length for the time to the first token")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each of merak-lora's rows this many times: the median, and the range beside it")
    ap.add_argument("--random_weights", default="false",
                    help="draw the base on the GPU instead of reading a written model (a 70B model's 140 GB do not fit "
                         "the disk); generate() (pp=1 only) then runs on the stage's own model")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--profile", action="store_true", help="print where 16 decode steps of each spend time")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from merak_lora.chat import GenConfig, _pipeline_generator
    from merak_lora.generate import Sampling, left_pad
    from merak_lora.entry import env_ranks
    from merak_lora.lora import merge_for_generation

    rank, world, _ = env_ranks()
    drawn = a.random_weights == "true"
    model_dir = bench_model(a.arch, a.model_dir, weights=not drawn)
    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (a.prompt_len - 8 * (i % 4),), generator=g).tolist() for i in range(a.batch)]
    bf16 = torch.cuda.is_available()
    # --compare_base true keeps the adapter apart from the base; the merged case (gen.sh without it) is a row below
    four_bit = a.load_in_4bit == "true"
    cfg = GenConfig(model_path=model_dir, pp=a.pp, bf16=bf16, compare_base=True, load_in_4bit=four_bit,
                    random_weights=drawn)
    # --lora true: a random adapter on every linear (B not zero, so it changes the answers), as gen.sh runs one
    meta = {"lora": {"r": 8, "lora_alpha": 32, "target_modules": TARGETS, "init_lora_weights": False}} \
        if a.lora == "true" else None
    gen, _, layout = _pipeline_generator(cfg, tok, None, meta, world)
    if meta and not any(".lora_B." in n for st in gen.stages for n, _ in st.model.named_parameters()):
        raise SystemExit("the stages carry no LoRA adapter: the 'LoRA r=8' rows would measure the base alone")
    if layout.rank != 0:
        gen.serve()
        return
    gen.eos_ids = set()  # random weights: never stop early, both sides generate exactly --new tokens
    rows, answers, notes = [], {}, []
    fast = gen.static
    graphs = ", CUDA graphs" if torch.cuda.is_available() else ""
    compiled = [False, True] if a.compile == "true" else [False]
    joined = [True, False] if a.apart == "true" else [True]
    fused_rows = fast and a.fused == "true" and torch.cuda.is_available()  # its kernels run on CUDA
    fused_label, graphed_label = f"static cache{graphs}, fused step", f"static cache{graphs}"
    behind = ", host reads each token before queuing the next"
    variants = [(fused_label, True, False, False, True, True)] if fused_rows else []
    variants += [(fused_label + behind, True, False, False, True, True)] if fused_rows and a.ahead == "true" else []
    theirs = ", bitsandbytes' 4-bit products"  # the other fused rows take merak-lora's (four_bit_cuda.py)
    variants += [(fused_label + theirs, True, False, False, True, True)] if fused_rows and four_bit else []
    variants += [(graphed_label, True, False, c, j, False) for c in compiled for j in joined] if fast else []
    variants.append(("growing cache, no graphs", False, False, False, True, False))
    if meta and fast and not four_bit:  # a quantized base is never merged (lora.merge_for_generation)
        variants += [(f"static cache{graphs}, adapter merged into the base", True, True, c, j, False)
                     for c in compiled for j in joined]
        if fused_rows:
            variants.append((f"static cache{graphs}, adapter merged into the base, fused step", True, True, False,
                             True, True))
    groups = [m.shared_products[0] for st in gen.stages for m in st.model.modules() if hasattr(m, "shared_products")]
    for label, static, merge, compile_step, join, fused in variants:
        if merge and not gen.merged:
            gen.merged = sum(merge_for_generation(st.model) for st in gen.stages) > 0
        gen.static, gen.graphs, gen.compiled = static, static and torch.cuda.is_available(), compile_step
        gen.fused, gen.ahead, gen.own_4bit = fused, not label.endswith(behind), not label.endswith(theirs)
        for group in groups:
            group.on = join
        label += (", one-token step compiled" if compile_step else "") + ("" if join else ", linears apart")
        # warm-up over the whole length: cuDNN builds an attention plan per new key length, once per process;
        # the compiled step compiles here (its time is noted)
        warm = timed(lambda: gen.generate(prompts, Sampling(max_new_tokens=a.new)))
        whole, steady = [], []
        for _ in range(a.repeats):
            whole.append(timed(lambda: answers.__setitem__(label, gen.generate(prompts,
                                                                                Sampling(max_new_tokens=a.new)))))
            # the tokens past the first quarter alone: what a request's set-up (prompt, cache, graph capture) leaves
            short_s = timed(lambda: gen.generate(prompts, Sampling(max_new_tokens=a.new // 4)))
            steady.append(a.batch * (a.new - a.new // 4) / (whole[-1] - short_s))
        ours_s = statistics.median(whole)
        if fused and gen.fused_notes:
            raise SystemExit(f"the fused row ran the transformers layers: {sorted(gen.fused_notes)}")
        if compile_step:  # then a request of other lengths: whether the compiled step is used as it is
            other = timed(lambda: gen.generate([p[:-16] for p in prompts], Sampling(max_new_tokens=a.new - 16)))
            notes.append(f"First request of the compiled row '{label}' (compiling included): {warm:.1f} s. "
                         f"Then a request of other lengths: {other:.1f} s.")
        long_prompt = [torch.randint(3, 1000, (a.ttft_len,), generator=g).tolist()]
        gen.generate(long_prompt, Sampling(max_new_tokens=1))  # its shapes' first time (kernel plans, compiling)
        ttft = timed(lambda: gen.generate(long_prompt, Sampling(max_new_tokens=1)))
        if a.profile:
            show_profile(lambda: gen.generate(prompts, Sampling(max_new_tokens=16)), f"merak-lora pipeline, {label}")
        rows.append([f"merak-lora pipeline, pp={a.pp}, {label}{', 4-bit base' if four_bit else ''}"
                     f"{', LoRA r=8' if meta else ''}", a.batch, a.new, f"{ours_s:.2f}",
                     f"{a.batch * a.new / ours_s:,.0f}", spread(steady), f"{ttft:.3f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)  # a run cut short keeps the rows it made
        if compile_step and join:
            plain = answers[label.removesuffix(", one-token step compiled")]
            notes.append(f"'{label}': the same {a.new} greedy tokens as without compiling for "
                         f"{agreement(answers[label], plain)}.")
        if not join:
            notes.append(f"'{label}': the same {a.new} greedy tokens as with the linears joined for "
                         f"{agreement(answers[label], answers[label.removesuffix(', linears apart')])}.")
        once = gen.ahead and gen.own_4bit  # rows differing only in the host's order or the product: checked once
        if static and not merge and not compile_step and join and once and torch.cuda.is_available():
            notes += [f"'{label}': {n}" for n in graph_check(gen, prompts, (True, False) if meta else (True,))]
    if fused_label in answers and graphed_label in answers:
        notes.append(f"'{fused_label}': the same {a.new} greedy tokens as the transformers layers' graphed step for "
                     f"{agreement(answers[fused_label], answers[graphed_label])}.")
    if fused_label + theirs in answers:
        notes.append(f"'{fused_label}': the same {a.new} greedy tokens as with bitsandbytes' 4-bit products for "
                     f"{agreement(answers[fused_label], answers[fused_label + theirs])}.")
    if fused_label + behind in answers:
        notes.append(f"'{fused_label}': the same {a.new} greedy tokens as with the host reading each token first "
                     f"for {agreement(answers[fused_label], answers[fused_label + behind])}.")
    gen.close()
    if torch.cuda.is_available():
        notes.append(f"Peak GPU memory through merak-lora's rows: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                     f"allocated, {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved.")
        # the input embedding gives one row per token; every other weight (a tied head included) is read whole
        skip = {id(e.weight) for st in gen.stages for e in [st.base_lm().get_input_embeddings()]
                if e is not None and e.weight is not getattr(st.base_lm().get_output_embeddings(), "weight", None)}
        weights = sum(p.numel() * p.element_size() for st in gen.stages for p in st.model.parameters()
                      if id(p) not in skip)
        bandwidth = copy_bandwidth()
        notes.append(f"Bound for one sequence: every weight but the input embedding read once per token, "
                     f"{weights / 2**30:.1f} GiB on this "
                     f"rank at {bandwidth / 1e12:.2f} TB/s (a device copy measured here): "
                     f"{bandwidth / weights:,.0f} tokens/s.")
    if a.pp == 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if bf16 else torch.float32
        if drawn:  # the one stage's model, its linears each run alone again: the same weights, adapter included
            for group in groups:
                group.on = False
            model = gen.stages[0].model
        del gen
        if not drawn:
            model = transformers_model(model_dir, four_bit, dtype, device, meta)
        model = model.eval()
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        run = lambda n: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # noqa
                                       do_sample=False, pad_token_id=tok.pad_token_id)
        run(a.new)  # the same full-length warm-up
        generated = []
        hf_s = timed(lambda: generated.append(run(a.new)))
        theirs, ours = generated[0][:, ids.shape[1]:].tolist(), answers[next(iter(answers))]
        if a.profile:
            show_profile(lambda: run(16), "transformers generate()")
        on_stage = ", on the pipeline stage's model" if drawn else ""
        rows.append([f"transformers generate(), one process{', 4-bit base' if four_bit else ''}"
                     f"{', PEFT LoRA r=8' if meta else ''}{on_stage}",
                     a.batch, a.new, f"{hf_s:.2f}", f"{a.batch * a.new / hf_s:,.0f}", "-", "-"])
        if drawn:  # one model in memory: the answers can be compared adapter and all
            notes.append(f"generate() on the stage's model gives the same {a.new} greedy tokens as merak-lora's first "
                         f"row for {agreement(theirs, ours)}.")
        elif not meta:  # with an adapter the two hold different random LoRA weights
            same = sum(x == y for x, y in zip(theirs, ours))
            notes.append(f"Greedy answers identical to generate()'s for {same} of {a.batch} prompts (random weights "
                         "in bf16: near-ties between logits can go either way when kernels differ).")
    past = f"tokens/s past the first {a.new // 4}" + (f", median of {a.repeats} (range)" if a.repeats > 1 else "")
    table = markdown_table(["generator", "batch", "new tokens", "seconds", "decode tokens/s", past,
                            f"first token, {a.ttft_len}-token prompt (s)"], rows)
    report(f"Decode, {a.arch}, prompts of ~{a.prompt_len} tokens, greedy", table, " ".join(notes), a.results)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
