"""One logger and one metrics object: console lines, a progress bar with ETA, TensorBoard scalars under
<output_dir>/runs, and <output_dir>/metrics.jsonl, all written by rank 0; every rank keeps its own log file."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger("merak_lora")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int) -> None:
    """Rank 0 prints INFO to the console, other ranks only errors (every rank's log file has everything: the
    ranks run in lock-step, so their console lines would repeat rank 0's). A record logged with
    extra={"file_only": True} was already printed once and goes to the files only."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.setFormatter(logging.Formatter("[%(asctime)s rank %(rank)d] %(message)s", "%H:%M:%S"))
    console.addFilter(_RankFilter(rank))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    log.addHandler(console)


def add_log_file(rank: int, log_dir: str) -> None:
    """Every rank also keeps its whole log in log_dir/rank_XXX.log."""
    os.makedirs(log_dir, exist_ok=True)
    fh = logging.FileHandler(os.path.join(log_dir, f"rank_{rank:03d}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)


class Metrics:
    """Collects what rank 0 reports each logging step. A train line's loss is the mean over the steps since the
    previous line (the progress bar shows the same running mean); grad_norm is the last step's."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int, tensorboard: bool,
                 progress: bool):
        self.enabled = enabled
        self.total = total_steps
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(output_dir, "runs"))
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def advance(self, losses: dict[str, tuple[float, int]]) -> None:
        """One step done; `losses` holds, by adapter label ("" alone), the mean loss over the steps since its
        last log line and how many steps that is: the numbers the next log line will show, so bar and log agree."""
        if self.bar is None:
            return
        self.bar.update(1)
        if len(losses) == 1 and "" in losses:
            loss, steps = losses[""]
            self.bar.set_postfix_str(f"loss {loss:.4f} (mean of the last {steps} step{'s' * (steps > 1)})",
                                     refresh=False)
        elif losses:
            self.bar.set_postfix_str(" ".join(f"{k} {v[0]:.4f}" for k, v in losses.items()), refresh=False)

    def log(self, step: int, values: dict[str, float], prefix: str = "train", adapter: str = "",
            total: int | None = None) -> None:
        """One line of `values` at `step`; an adapter's (of several) are named `<adapter>/loss` in TensorBoard,
        `<adapter>/eval_loss` for its eval, and carry "adapter" in metrics.jsonl."""
        if not self.enabled:
            return
        total = total or self.total
        head = f"step {step}/{total}" if prefix == "train" else f"{prefix} at step {step}/{total}"
        parts = ([f"[{adapter}] {head}"] if adapter else [head]) + [f"{k} {_fmt(v)}" for k, v in values.items()]
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            log.info(line)
        if self.writer is not None:
            for k, v in values.items():
                tag = f"{prefix}/{k}" if not adapter else f"{adapter}/{k}" if prefix == "train" \
                    else f"{adapter}/{prefix}_{k}"
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()
        record = {"step": step, "split": prefix, **({"adapter": adapter} if adapter else {}), "time": time.time()}
        self.jsonl.write(json.dumps({**record, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return f"{v:.0f}"
    return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"


# Dense bf16 matrix rates (TFLOP/s) from the vendors' data sheets, by the name torch reports
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "GH200": 989.4, "B200": 2250.0}


def peak_tflops(device) -> float | None:
    """The GPU's dense bf16 rate from its name, or None (a CPU, or a GPU not in the table)."""
    import torch
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
