"""The entry scripts' first step, before torch, transformers and peft are imported (about 8 s of a login node's
time, on every rank): `--help` answered and flags that are wrong on their own refused at once, with the same
one line and exit code 2 as later checks. Only the standard library and config.py are imported here."""

from __future__ import annotations

import os
import sys

from .adapters import adapter_specs
from .config import Config, ConfigError, help_text, parse_args, validate


def env_ranks() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def answer_early(argv: list[str], usage: str, config_cls: type = Config,
                 not_applicable: dict[str, str] | None = None) -> int | None:
    """The exit code when the flags alone settle the run (0 for --help, 2 for a bad flag), else None: go on.
    Notes about flags without effect are left to the run, which prints them once."""
    rank, world, _ = env_ranks()
    if "--help" in argv or "-h" in argv:
        if rank == 0:
            print(f"usage: {usage}\n\n{help_text(config_cls)}")
        return 0
    try:
        cfg = parse_args(argv, config_cls=config_cls, warn=lambda m: None, not_applicable=not_applicable)
        if config_cls is Config and not cfg.list_target_modules:  # listing needs only --model_path
            for spec in adapter_specs(cfg):
                validate(spec.cfg, world)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return None
