"""Framework rows a trainer declares in its own `bench.toml`: no edit of the bench tool.

A trainer that ships `trainers/<slug>/bench.toml` gets one row, named by its slug: its epoch
time with the whole contract live (S3 dataset and checkpoint uploads, backend callbacks, the
MLflow server) against the trainer's own bare baseline of its framework on the same model and
data. The file says how:

    figure = "Hugging Face epoch time"      # the row's name in the table
    goal = 1.03                             # ours / baseline at most
    dataset_id = "bench-hf"
    sample = ["--train", "{images}", ...]   # sample_data.py's arguments (bucket first)
    baseline = ["{python}", "bench/bare.py", "{data}", "{out}", "--epochs", "{epochs}", ...]
    note = "what both sides run"
    [env]                                   # the trainer's settings for train.py
    MODEL_NAME = "..."
    [sizes.smoke]                           # per bench size: images and epochs
    images = 8
    epochs = 2

The baseline runs in the trainer's folder and prints one JSON line with `epoch_ends` (unix
times after each epoch); `{data}` is the extracted sample, `{out}` its scratch folder and
`{ours}` the work folder of the trainer's first run (so a baseline can read the very model
configuration the trainer used from its checkpoint). Both sides are timed the same way as the
built-in framework rows: the interval between epoch ends, the first epoch dropped.
"""

from __future__ import annotations

import functools
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.benchmarks.frameworks import epoch_seconds, extract, sample
from tools.benchmarks.harness import (
    TRAINERS,
    Bench,
    BenchError,
    Row,
    epoch_end_times,
    last_json,
    median,
    paired_ratio,
    remove,
    seconds,
)

CONFIG_NAME = "bench.toml"
REQUIRED = ("figure", "goal", "dataset_id", "sample", "baseline", "env", "sizes")


def discover(trainers: Path = TRAINERS) -> dict[str, Path]:
    """slug -> its bench.toml, for every trainer that has one, in name order."""
    return {path.parent.name: path for path in sorted(trainers.glob(f"*/{CONFIG_NAME}"))}


def load(path: Path) -> dict[str, Any]:
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BenchError(f"{path}: {exc}") from None
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise BenchError(f"{path}: missing {', '.join(missing)}")
    return config


def figure_name(path: Path) -> str:
    """The row's name for error rows, even when the rest of the file is unreadable."""
    try:
        return str(tomllib.loads(path.read_text(encoding="utf-8")).get("figure", path.parent.name))
    except (OSError, tomllib.TOMLDecodeError):
        return f"{path.parent.name} epoch time"


def rows() -> dict[str, Callable[[Bench], list[Row]]]:
    """Row name (the trainer's slug) -> the function measuring it."""
    return {slug: functools.partial(epoch_time, path=path) for slug, path in discover().items()}


def fill(args: list[str], **values: Any) -> list[str]:
    return [str(arg).format(**values) for arg in args]


def epoch_time(bench: Bench, *, path: Path) -> list[Row]:
    config = load(path)
    trainer, slug = path.parent, path.parent.name
    size = config["sizes"].get(bench.size.name)
    if size is None:
        raise BenchError(f"{path}: no [sizes.{bench.size.name}]")
    values = {"python": sys.executable, "images": size["images"], "epochs": size["epochs"],
              "val_images": max(size["images"] // 4, 2)}
    archive = sample(bench, slug, config["dataset_id"], *fill(config["sample"], **values))
    folder = bench.folder(f"{slug}-bench")
    data_root = extract(archive, folder / "data")
    settings = {key: str(value).format(**values) for key, value in config["env"].items()}
    settings |= {"DATASET_ID": config["dataset_id"], "EPOCHS": str(size["epochs"]),
                 "CACHE_DIR": str(folder / "cache")}
    first_run = folder / "first-run"  # kept: the baseline may read the model it trained
    ours: list[float] = []
    baseline: list[float] = []

    def run_ours() -> None:
        work = bench.folder(f"{slug}-ours")
        bench.run([sys.executable, "train.py"], env=bench.job_env(work, **settings),
                  cwd=trainer, what=f"{slug} train.py")
        ours.append(epoch_seconds(epoch_end_times(work)))
        if first_run.exists():
            remove(work)
        else:
            work.rename(first_run)

    def run_bare() -> None:
        out = bench.folder(f"{slug}-bare")
        command = fill(config["baseline"], **values, data=data_root, out=out, ours=first_run)
        _, done = bench.run(command, env=bench.base_env(), cwd=trainer,
                            what=f"{slug} baseline")
        baseline.append(epoch_seconds(last_json(done.stdout)["epoch_ends"]))
        remove(out)

    for rep in range(bench.size.repeat):  # ours first in the first pair: the baseline reads it
        for step in (run_ours, run_bare) if rep % 2 == 0 else (run_bare, run_ours):
            step()
    ratio = paired_ratio(ours, baseline)
    goal = float(config["goal"])
    note = config.get("note", "").format(**values)
    return [Row(config["figure"], seconds(median(ours)), seconds(median(baseline)),
                f"{ratio:.3f}", f"≤ {goal:g}", ratio <= goal,
                f"{note} Ours: trainers/{slug} with the S3 server, backend callbacks and the "
                f"MLflow server live; baseline: {' '.join(config['baseline'][1:2])} (declared "
                f"in trainers/{slug}/{CONFIG_NAME}). Median epoch, first epoch excluded.")]
