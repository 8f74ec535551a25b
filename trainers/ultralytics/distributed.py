"""Multi-GPU training (DEVICE=0,1,...): train.py under torchrun, one process per GPU.

Left to itself, Ultralytics trains on several GPUs by writing a temporary script and re-launching
training in subprocesses that only carry what can be pickled: the job's callbacks client, upload
queue and MLflow run stay behind in the parent. So train.py launches itself instead:
`python -m torch.distributed.run --standalone --nproc_per_node N train.py ARGS`. Every rank runs
the whole script; torchrun sets RANK/LOCAL_RANK/WORLD_SIZE, and

- utils.Job makes rank 0 the only one that reports, uploads and logs to MLflow (others no-op);
- Ultralytics sees LOCAL_RANK and joins the process group in-process instead of spawning, with
  the same trainer class and callbacks as a single-GPU run (only rank 0 registers the reporter);
- staging (dataset, checkpoint, weights) happens on rank 0 first, the others wait for its marker
  and reuse the result (`rank_zero_first`), so they never download into the same files at once;
- a SIGTERM reaches torchrun, which forwards it to every rank; rank 0 reports `cancelled`. A rank
  that fails makes torchrun stop the others.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import utils

log = logging.getLogger(f"trainer.{__name__}")


def gpu_count(device: str | None) -> int:
    """How many GPUs DEVICE names: `0,1` -> 2, `cuda:0,1` -> 2, `0` / `cuda` / `cpu` -> <= 1."""
    wanted = (device or "").strip().lower()
    if wanted in ("", "auto", "cpu"):
        return 0
    return len([part for part in wanted.removeprefix("cuda").lstrip(":").split(",")
                if part.strip()]) or 1


def processes_to_launch(settings: Sequence[utils.Setting], argv: Sequence[str] | None, *,
                        prog: str, description: str | None = None,
                        environ: Mapping[str, str] | None = None) -> int:
    """How many torchrun workers to relaunch as: DEVICE's GPU count when it names several and
    this process is not a torchrun worker already; else 0. Settings that do not parse are left
    to `run_job`, which reports them."""
    environ = os.environ if environ is None else environ
    if utils.outside_env("LOCAL_RANK", environ) is not None:
        return 0
    try:
        cfg = utils.parse_settings(utils.merge_settings(utils.PLATFORM_SETTINGS, settings), argv,
                                   environ, prog=prog, description=description)
    except utils.ConfigError:
        return 0
    count = gpu_count(cfg.device)
    return count if count > 1 else 0


def launch_command(script: Path, argv: Sequence[str], processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", str(script), *argv]


def relaunch_under_torchrun(script: Path, argv: Sequence[str], processes: int) -> None:
    """Replace this process with torchrun running `script` once per GPU (never returns)."""
    command = launch_command(script, argv, processes)
    if not utils.get_env_str("JOB_ID"):  # a local run: its processes must share one id
        os.environ["JOB_ID"] = utils.local_job_id()
    log.info("DEVICE names %d GPUs: relaunching under torchrun (%s)", processes,
             " ".join(command[1:5]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def rank_zero_first(job: utils.Job, name: str, produce: Callable[[], str], *,
                    environ: Mapping[str, str] | None = None, timeout: float = 3600.0) -> str:
    """Run `produce` on rank 0 only; the other ranks wait for its result (a string, e.g. a path).

    The result travels through a marker file in the shared work dir, named for this torchrun
    launch (TORCHELASTIC_RUN_ID) so a marker left by an earlier launch is never mistaken for it.
    """
    if job.world_size <= 1:
        return produce()
    run_id = utils.outside_env("TORCHELASTIC_RUN_ID", environ) or "run"
    marker = job.work_dir / f".rank0-{name}-{run_id}.json"
    if job.is_main:
        value = produce()
        with utils.atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"value": value}))
        return value
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise utils.StorageError(f"rank {job.rank}: rank 0 did not finish {name} within "
                                     f"{timeout:.0f} s")
        time.sleep(0.5)
    return json.loads(marker.read_text())["value"]
