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


def append_result(title: str, table: str, notes: str = "", path: str = RESULTS) -> None:
    """Add one dated section (command, device, table) to bench/RESULTS.md."""
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
