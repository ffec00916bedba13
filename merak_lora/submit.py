"""Submit fine-tuning to Slurm with sbatch, through submitit: one task per GPU, each task one rank.

    python -m merak_lora.submit --nodes 2 --gpus_per_node 4 --partition P --time 120 \\
        [--account A --qos Q --constraint C] [--wait] -- --model_path M --data_path D --output_dir O ...

Prints the job id and where the logs are; `--wait` follows rank 0's log until the job ends. Near the time limit
Slurm signals the job (USR2, --signal_delay_s before the end): the ranks finish their step, write a checkpoint,
the job requeues itself and resumes from <output_dir>/latest when it runs again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


class Finetune:
    """The callable submitit pickles and runs on every task."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> int:
        import submitit

        from merak_lora.slurm import job_id, rendezvous_port
        own = os.environ.pop("MASTER_PORT", None)  # export() refuses to overwrite a variable
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # the user's port, else the job's: submitit's (20000-60000 by job id) can fall among ports lent to
        # outgoing connections, and then rank 0 cannot host the rendezvous
        os.environ["MASTER_PORT"] = own or str(rendezvous_port(job_id()))
        from merak_lora.finetune import main
        code = main(self.argv)
        if code == 75:  # preempted: checkpoint written and job requeued; no result, the requeued job runs again
            sys.exit(75)
        if code != 0:
            raise RuntimeError(f"rank {os.environ.get('RANK')} ended with exit code {code}; see the log above")
        return code

    def checkpoint(self):
        """Called by submitit on its preemption signal outside the training loop (e.g. while loading): run again
        as is; a restarted job resumes from the latest checkpoint by itself."""
        import submitit
        return submitit.helpers.DelayedSubmission(Finetune(self.argv))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        ours, theirs = argv[:cut], argv[cut + 1:]
    else:
        ours, theirs = argv, []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus_per_node", type=int, default=0, help="one rank per GPU")
    ap.add_argument("--cpu_ranks_per_node", type=int, default=2, help="ranks per node when there are no GPUs")
    ap.add_argument("--cpus_per_task", type=int, default=0)
    ap.add_argument("--partition", default=None)
    ap.add_argument("--time", type=int, default=120, help="minutes")
    ap.add_argument("--account", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--constraint", default=None)
    ap.add_argument("--signal_delay_s", type=int, default=120)
    ap.add_argument("--job_name", default="merak-lora")
    ap.add_argument("--log_dir", default="slurm_logs")
    ap.add_argument("--wait", action="store_true")
    return ap.parse_args(ours), theirs


def submit(args: argparse.Namespace, finetune_argv: list[str]):
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(args.log_dir, "%j"), cluster="slurm")
    tasks = args.gpus_per_node or args.cpu_ranks_per_node
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=tasks, timeout_min=args.time,
                  slurm_signal_delay_s=args.signal_delay_s, slurm_additional_parameters={"requeue": True})
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    return executor.submit(Finetune(finetune_argv))


def follow(job, poll_s: float = 2.0) -> int:
    """Print rank 0's log as it grows until the job is done; the exit status says whether it succeeded."""
    shown = 0
    while True:
        done = job.done()
        path = job.paths.stdout
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(shown)
                chunk = fh.read()
                shown += len(chunk.encode("utf-8"))
            sys.stdout.write(chunk)
            sys.stdout.flush()
        if done:
            break
        time.sleep(poll_s)
    try:
        job.results()  # one result per task; raises the first task's error
    except Exception as e:  # noqa: BLE001 - submitit re-raises the job's own error here
        print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, finetune_argv = parse(sys.argv[1:] if argv is None else argv)
    if not finetune_argv:
        print("error: give the fine-tuning flags after `--` (e.g. -- --model_path M --data_path D)", file=sys.stderr)
        return 2
    job = submit(args, finetune_argv)
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout} (rank 0), {job.paths.folder}")
    return follow(job) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
