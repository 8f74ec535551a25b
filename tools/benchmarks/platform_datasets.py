"""The platform's own datasets (issue 13): staging a dataset folder of many small objects, and
converting a platform annotation file to a framework's layout.

- folder staging: `stage_dataset` of `datasets/{id}/` (N images as separate objects) in a fresh
  process (tools/benchmarks/stage_probe.py) against `aws s3 sync` of the same prefix, each a
  process, start-up included on both sides.
- annotation conversion: `read_platform_annotations` of a detection file (N images, 5 boxes
  each) plus the Ultralytics trainer's converter (`data.platform_layout`: YOLO labels, image
  links, data.yaml), against `json.load` of the same file.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.benchmarks.harness import Bench, BenchError, Row, median, paired_ratio, remove, seconds

HERE = Path(__file__).resolve().parent
STAGE_PROBE = HERE / "stage_probe.py"
BOXES = 5


def alternate(rep: int, first, second) -> tuple:
    return (first, second) if rep % 2 == 0 else (second, first)


def folder_staging(bench: Bench) -> list[Row]:
    from tools.benchmarks.measure import FIGURES, aws_cli

    size, s3 = bench.size, bench.s3
    count = size.folder_files
    rng = random.Random(0)
    prefix = "datasets/bench-folder/"
    objects = {f"{prefix}images/{i // 1000:02d}/{i:05d}.jpg": rng.randbytes(rng.randrange(2000,
                                                                                          6000))
               for i in range(count)}
    objects[f"{prefix}annotations_detection.json"] = b"{}"
    with ThreadPoolExecutor(16) as pool:  # setting up: not measured
        list(pool.map(lambda item: s3.client.put_object(Bucket=s3.bucket, Key=item[0],
                                                        Body=item[1]), objects.items()))
    megabytes = sum(map(len, objects.values())) / 2**20
    env = {**bench.base_env(), **s3.env()}
    aws_env = {**bench.base_env(), "AWS_ACCESS_KEY_ID": s3.env()["MINIO_ACCESS_KEY"],
               "AWS_SECRET_ACCESS_KEY": s3.env()["MINIO_SECRET_KEY"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    folder = bench.folder("folder-staging")
    cache, copy = folder / "cache", folder / "aws"
    ours, baseline, floor = [], [], []

    def run_ours() -> None:
        remove(cache)
        wall, done = bench.run([sys.executable, STAGE_PROBE, "bench-folder", cache], env=env,
                               what="stage_dataset (folder)")
        files = json.loads(done.stdout.strip().splitlines()[-1])["files"]
        if files != len(objects):
            raise BenchError(f"stage_dataset staged {files} files, not {len(objects)}")
        ours.append(wall)
        remove(cache)

    def run_floor() -> None:
        wall, done = bench.run([sys.executable, STAGE_PROBE, "--gets", prefix], env=env,
                               what="bare GETs")
        if json.loads(done.stdout.strip().splitlines()[-1])["objects"] != len(objects):
            raise BenchError("the bare GETs did not see every object")
        floor.append(wall)

    def run_baseline() -> None:
        remove(copy)
        wall, _ = bench.run([aws_cli(), "s3", "sync", f"s3://{s3.bucket}/{prefix}", copy,
                             "--endpoint-url", s3.endpoint, "--only-show-errors"],
                            env=aws_env, what="aws s3 sync")
        baseline.append(wall)
        remove(copy)

    for rep in range(size.repeat):
        for step in alternate(rep, run_ours, run_baseline):
            step()
        run_floor()
    ratio = paired_ratio(ours, baseline)
    scale = "" if count >= 10000 else "Scaled down from the issue's 10k images (`--size large`). "
    return [Row(f"{FIGURES['folder']} ({len(objects):,} objects, {megabytes:.0f} MB)",
                seconds(median(ours)), seconds(median(baseline)), f"{ratio:.2f}", "≤ 0.5",
                ratio <= 0.5,
                f"{scale}Ours: a fresh process running `stage_dataset` of the prefix (listing, "
                "32 objects at a time, manifest written); baseline: `aws s3 sync` of the same "
                "prefix (its defaults: 10 at a time). Both: process start-up included, the "
                "same moto server on loopback. The floor, a process that only lists the prefix "
                "and GETs every object (boto3, 32 at a time, nothing written): "
                f"{paired_ratio(floor, baseline):.2f}x.")]


def ultralytics_converter():
    """trainers/ultralytics/data.py, the converter a job runs (with the template's utils, the
    same code as the trainer's vendored copy)."""
    import importlib.util

    trainer = HERE.parents[1] / "trainers" / "ultralytics"
    if str(trainer) not in sys.path:
        sys.path.append(str(trainer))  # its `model` module; `utils` is the template's, imported
    spec = importlib.util.spec_from_file_location("bench_ultralytics_data", trainer / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module there
    spec.loader.exec_module(module)
    return module


def create_files(folder: Path, contents: list[bytes]) -> None:
    """The file system's share alone: one new file per item, written with one os.write."""
    folder.mkdir()
    for i, data in enumerate(contents):
        fd = os.open(folder / f"{i}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)


def annotation_conversion(bench: Bench) -> list[Row]:
    from tests.support import platform_data
    from tools.benchmarks.measure import FIGURES

    sys.path.insert(0, str(HERE.parents[1] / "template"))
    import utils

    converter = ultralytics_converter()
    count = bench.size.annotation_images
    root = bench.folder("annotations")
    platform_data.detection(root, images=count, boxes=BOXES, write_images=False)
    for i in range(count):
        (root / "images" / f"img_{i:05d}.png").touch()  # only their presence is checked
    file = root / "annotations_detection.json"
    ours, reading, files, baseline = [], [], [], []

    def converted() -> list[Path]:
        return list(root.parent.glob(f".{root.name}.*"))

    def run_ours() -> None:
        for folder in converted():
            remove(folder)
        started = time.perf_counter()
        dataset = utils.read_platform_annotations(root, "object_detection")
        reading.append(time.perf_counter() - started)
        out = converter.platform_layout(root, "detect", dataset)
        ours.append(time.perf_counter() - started)
        written = sum(1 for _ in (out / "labels" / "train").iterdir()) + sum(
            1 for _ in (out / "labels" / "val").iterdir())
        if written != count:
            raise BenchError(f"{written} label files written, not {count}")
        # The same files again, the file system's work alone (no reading, no formatting).
        contents = [converter.label_text("detect", image, 0) for image in dataset.images]
        scratch = root.parent / "files-alone"
        remove(scratch)
        started = time.perf_counter()
        create_files(scratch, contents)
        files.append(time.perf_counter() - started)
        remove(scratch)

    def run_baseline() -> None:
        started = time.perf_counter()
        with open(file, "rb") as f:
            json.load(f)
        baseline.append(time.perf_counter() - started)

    for rep in range(max(bench.size.repeat, 3)):
        for step in alternate(rep, run_ours, run_baseline):
            step()
    for folder in converted():
        remove(folder)
    ratio = paired_ratio(ours, baseline)
    megabytes = file.stat().st_size / 2**20
    scale = "" if count >= 10000 else "Scaled down from the issue's 10k images (`--size large`). "
    return [Row(f"{FIGURES['annotations']} ({count:,} images, {count * BOXES:,} boxes, "
                f"{megabytes:.1f} MB)", seconds(median(ours)), seconds(median(baseline)),
                f"{ratio:.1f}", "≤ 5", ratio <= 5,
                f"{scale}Ours: `read_platform_annotations` (parse, check every id, image and "
                "box, split) plus the Ultralytics trainer's converter (`data.platform_layout`: "
                "a hard link and a YOLO label file per image, data.yaml); baseline: "
                "`json.load` of the same file. In-process, interleaved. The reading alone: "
                f"{paired_ratio(reading, baseline):.1f}x; creating the {count:,} label files "
                "alone (their bytes ready, one `os.write` each, in the same scratch folder): "
                f"{paired_ratio(files, baseline):.1f}x.")]
