"""The framework rows: a trainer with the whole contract live vs the bare framework.

Ours runs the trainer as the platform does (a subprocess configured by environment variables),
with the dataset on the S3 server, checkpoints uploaded there, every callback sent to the
backend and metrics to the MLflow server. Both sides are timed the same way: the interval between
consecutive epoch ends (ours: the training-metrics events in the job's callbacks.jsonl; the
baseline: a timestamp at the same point of its loop), so start-up, staging and the final
evaluation are outside the figure and the first epoch (warm-up) is dropped.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from tools.benchmarks.harness import (
    TRAINERS,
    Bench,
    BenchError,
    Row,
    epoch_end_times,
    intervals,
    last_json,
    median,
    paired_ratio,
    remove,
    seconds,
    trainer_ready,
)

HERE = Path(__file__).resolve().parent


def missing(figure: str, goal: str, trainer: str) -> list[Row]:
    return [Row(figure, "-", "-", "-", goal, None,
                f"trainer missing: trainers/{trainer} does not train with its framework yet")]


def sample(bench: Bench, trainer: str, dataset_id: str, *args: str) -> Path:
    """Write the trainer's own sample dataset, put it on the S3 server; the local zip."""
    bucket = bench.folder(f"{trainer}-sample")
    bench.run([sys.executable, TRAINERS / trainer / "sample_data.py", bucket, *args],
              env=bench.base_env(), what=f"{trainer} sample_data.py")
    archive = next((bucket / "datasets").glob("*.zip"))
    bench.upload_once(f"datasets/{dataset_id}.zip", archive)
    return archive


def extract(archive: Path, dest: Path) -> Path:
    """The archive's dataset root (its single top-level folder unwrapped), for a baseline."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def epoch_seconds(ends: list[float]) -> float:
    """Median epoch length, the first epoch (warm-up) excluded."""
    lengths = intervals(ends)
    if not lengths:
        raise BenchError("need at least two epochs to time one")
    return median(lengths)


def checkpoint_footprint(bench: Bench, work: Path, label: str, epochs: int) -> Row:
    """A finished job's checkpoints in the bucket against that many weights-only files."""
    prefix = f"checkpoints/job-{work.name}/"
    pages = bench.s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=bench.s3.bucket, Prefix=prefix)
    sizes = {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}
    weights = sizes.get(f"epoch-{epochs}.pt")
    resumable = work / "checkpoints" / "last.pt"  # the job's local, resumable last.pt
    if not weights or not resumable.is_file():
        raise BenchError(f"{label}: no epoch-{epochs}.pt in the bucket or no local last.pt")
    full = resumable.stat().st_size
    total, bound = sum(sizes.values()), len(sizes) * weights
    ratio = total / bound
    return Row(f"finished job's checkpoint bytes: {label}", f"{total / 2**20:.1f} MB",
               f"{bound / 2**20:.1f} MB", f"{ratio:.2f}", "≤ 1.1", ratio <= 1.1,
               f"{len(sizes)} files after {epochs} epochs (CHECKPOINT_EVERY=1) against as many "
               f"weights-only files ({weights / 2**20:.1f} MB each). The resumable last.pt "
               f"uploaded every epoch is {full / 2**20:.1f} MB ({full / weights:.1f} x the "
               "weights): what every epoch-N.pt was before. Bytes uploaded per epoch, last.pt "
               f"and epoch-N.pt against last.pt alone before: {(full + weights) / full:.2f} x.")


# -- YOLO ------------------------------------------------------------------------------------

def yolo_epoch_time(bench: Bench) -> list[Row]:
    figure, goal = "YOLO epoch time", "≤ 1.02"
    if not trainer_ready("ultralytics", "ultralytics"):
        return missing(figure, goal, "ultralytics")
    size = bench.size
    trainer = TRAINERS / "ultralytics"
    images = size.yolo_images
    sample(bench, "ultralytics", "bench-yolo", "--task", "detect", "--train", str(images),
           "--val", str(max(images // 4, 4)), "--size", "160", "--name", "bench-yolo")
    folder = bench.folder("yolo")
    cache, args_yaml = folder / "cache", folder / "args.yaml"
    settings = {"DATASET_ID": "bench-yolo", "MODEL_NAME": "yolo11n", "PRETRAINED": "false",
                "EPOCHS": str(size.yolo_epochs), "BATCH_SIZE": "16", "IMAGE_SIZE": "160",
                "CACHE_DIR": str(cache)}
    ours: list[float] = []
    baseline: list[float] = []
    footprint: list[Row] = []

    def run_ours() -> None:
        work = bench.folder("yolo-ours")
        bench.run([sys.executable, "train.py"], env=bench.job_env(work, **settings),
                  cwd=trainer, what="ultralytics train.py")
        ours.append(epoch_seconds(epoch_end_times(work)))
        if not footprint:
            footprint.append(checkpoint_footprint(bench, work, "YOLO", size.yolo_epochs))
        if not args_yaml.exists():  # the baseline repeats exactly these arguments
            used = yaml.safe_load((work / "ultralytics" / "train" / "args.yaml").read_text())
            shutil.copyfile(used["data"], folder / "data.yaml")
            used["data"] = str(folder / "data.yaml")
            args_yaml.write_text(yaml.safe_dump(used))
        remove(work)

    def run_bare() -> None:
        out = bench.folder("yolo-bare")
        _, done = bench.run([sys.executable, HERE / "bare_yolo.py", args_yaml, out],
                            env=bench.base_env(), what="bare Ultralytics")
        baseline.append(epoch_seconds(last_json(done.stdout)["epoch_ends"]))
        remove(out)

    for rep in range(size.repeat):  # ours first in the first pair: it writes args.yaml
        for step in (run_ours, run_bare) if rep % 2 == 0 else (run_bare, run_ours):
            step()
    ratio = paired_ratio(ours, baseline)
    return [Row(figure, seconds(median(ours)), seconds(median(baseline)), f"{ratio:.3f}", goal,
                ratio <= 1.02,
                f"yolo11n.yaml from scratch, {images} training images at 160 px, batch 16, "
                f"{size.yolo_epochs} epochs, CPU. Ours: trainers/ultralytics with the S3 "
                "server (dataset, last/epoch-N/best uploads every epoch), backend callbacks and "
                "the MLflow server live; baseline: `YOLO(...).train(...)` with the same "
                "arguments (its args.yaml). Median epoch, first epoch excluded.")] + footprint


# -- timm ------------------------------------------------------------------------------------

def timm_throughput(bench: Bench) -> list[Row]:
    figure, goal = "timm throughput (img/s)", "≥ 0.97"
    if not trainer_ready("timm", "timm"):
        return missing(figure, goal, "timm")
    size = bench.size
    per_class = size.timm_images  # per class: the sample has ten classes (digits)
    archive = sample(bench, "timm", "bench-timm", "--train", str(per_class), "--val",
                         str(max(per_class // 4, 2)), "--test", "0")
    folder = bench.folder("timm")
    data_root = extract(archive, folder / "data")
    train_images = sum(1 for p in (data_root / "train").rglob("*") if p.is_file())
    model, image_size, batch = "resnet18", 64, 32
    settings = {"DATASET_ID": "bench-timm", "MODEL_NAME": model, "PRETRAINED": "false",
                "EPOCHS": str(size.timm_epochs), "BATCH_SIZE": str(batch),
                "IMAGE_SIZE": str(image_size), "CACHE_DIR": str(folder / "cache")}
    ours: list[float] = []
    baseline: list[float] = []
    footprint: list[Row] = []

    def run_ours() -> None:
        work = bench.folder("timm-ours")
        bench.run([sys.executable, "train.py"], env=bench.job_env(work, **settings),
                  cwd=TRAINERS / "timm", what="timm train.py")
        ours.append(train_images / epoch_seconds(epoch_end_times(work)))
        if not footprint:
            footprint.append(checkpoint_footprint(bench, work, f"timm {model}",
                                                  size.timm_epochs))
        remove(work)

    def run_bare() -> None:
        out = bench.folder("timm-bare")
        _, done = bench.run([sys.executable, HERE / "bare_timm.py", data_root, out, "--model",
                             model, "--image-size", str(image_size), "--batch-size", str(batch),
                             "--epochs", str(size.timm_epochs)],
                            env=bench.base_env(), what="bare timm loop")
        baseline.append(train_images / epoch_seconds(last_json(done.stdout)["epoch_ends"]))
        remove(out)

    for rep in range(size.repeat):
        for step in (run_ours, run_bare) if rep % 2 == 0 else (run_bare, run_ours):
            step()
    ratio = paired_ratio(ours, baseline)
    return [Row(figure, f"{median(ours):.1f}", f"{median(baseline):.1f}", f"{ratio:.3f}", goal,
                ratio >= 0.97,
                f"{model} from scratch, {train_images} training images at {image_size} px, "
                f"batch {batch}, {size.timm_epochs} epochs, CPU; training images per second of "
                "epoch (train + validate + checkpoint), first epoch excluded. Ours: "
                "trainers/timm with S3, backend and MLflow live; baseline: a plain loop of "
                "timm's parts with the trainer's recipe (tools/benchmarks/bare_timm.py).")] + (
                    footprint)
