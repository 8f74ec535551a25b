"""Write the bundled sample dataset: coloured shapes on textured canvases, with their labels.

One zip at ROOT/datasets/{NAME}.zip (STORAGE_TYPE=local, LOCAL_STORAGE_ROOT=ROOT, DATASET_ID=NAME)
holding one top-level folder, in the layout Ultralytics reads for the task:

- detect:   data.yaml, images/{train,val}/*.jpg, labels/{train,val}/*.txt (`class cx cy w h`)
- segment:  the same, each label line a polygon (`class x1 y1 x2 y2 ...`)
- classify: {train,val}/<class>/*.jpg, one shape per image

Deterministic (the same bytes on every run) and offline. The images are real content a detector
must learn, and learnable from scratch on a CPU in a few minutes: one to three large circles,
squares and triangles (a fifth to half of the image side) in bright random colours on a dark,
lightly noisy background, so the class is in the shape, never in the colour or the position.
(Small shapes on a cluttered background kept YOLO11n at mAP 0 after 30 epochs from scratch.)
"""

from __future__ import annotations

import argparse
import io
import math
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle")
TASKS = ("detect", "segment", "classify")
ZIP_TIME = (2024, 1, 1, 0, 0, 0)

Polygon = list[tuple[float, float]]


def dark_canvas(rng: random.Random, size: int) -> Image.Image:
    """A dark, smoothly varying background with a little grain: no edges a shape could hide in."""
    noise = np.random.default_rng(rng.getrandbits(32))
    coarse = noise.integers(0, 48, size=(4, 4, 3), dtype=np.uint8)
    canvas = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    grain = noise.normal(0, 4, size=(size, size, 3))
    pixels = np.clip(np.asarray(canvas, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def bright_colour(rng: random.Random) -> tuple[int, int, int]:
    """A saturated or light colour, far from the dark background whatever its hue."""
    channels = [rng.randint(150, 255), rng.randint(60, 255), rng.randint(0, 255)]
    rng.shuffle(channels)
    return channels[0], channels[1], channels[2]


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> Polygon:
    """The outline of a shape centred on (cx, cy), rotated by `angle` radians."""
    if shape == "circle":
        corners, start = 24, 0.0
    elif shape == "square":
        corners, start = 4, math.pi / 4 + angle
    else:
        corners, start = 3, -math.pi / 2 + angle
    return [(cx + radius * math.cos(start + 2 * math.pi * i / corners),
             cy + radius * math.sin(start + 2 * math.pi * i / corners)) for i in range(corners)]


def bounds(polygon: Polygon) -> tuple[float, float, float, float]:
    xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
    return min(xs), min(ys), max(xs), max(ys)


def overlaps(box: tuple[float, ...], others: list[tuple[float, ...]], margin: float) -> bool:
    return any(box[0] < o[2] + margin and o[0] < box[2] + margin and
               box[1] < o[3] + margin and o[1] < box[3] + margin for o in others)


def scene(rng: random.Random, size: int, max_objects: int, first_class: int | None = None,
          ) -> tuple[Image.Image, list[tuple[int, Polygon]]]:
    """A canvas with 1..max_objects shapes that do not touch; their class ids and outlines.

    `first_class` fixes the first shape's class (classification balances its classes)."""
    image = dark_canvas(rng, size)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[int, Polygon]] = []
    boxes: list[tuple[float, ...]] = []
    for number in range(rng.randint(1, max_objects)):
        for _attempt in range(20):
            radius = rng.uniform(size * 0.1, size * 0.25)  # 1/5 to 1/2 of the side across
            cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
            class_id = rng.randrange(len(CLASSES))
            if number == 0 and first_class is not None:
                class_id = first_class
            polygon = shape_polygon(CLASSES[class_id], cx, cy, radius, rng.uniform(-0.4, 0.4))
            box = bounds(polygon)
            if not overlaps(box, boxes, size * 0.02):
                draw.polygon(polygon, fill=bright_colour(rng))
                placed.append((class_id, polygon))
                boxes.append(box)
                break
    blurred = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.5)))
    return blurred, placed


def label_line(class_id: int, polygon: Polygon, size: int, task: str) -> str:
    """One YOLO label line, coordinates normalised to 0..1 and clipped to the image."""
    clip = [(min(max(x / size, 0.0), 1.0), min(max(y / size, 0.0), 1.0)) for x, y in polygon]
    if task == "segment":
        return " ".join([str(class_id), *(f"{x:.6f} {y:.6f}" for x, y in clip)])
    x0, y0, x1, y1 = bounds(clip)
    return f"{class_id} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
    zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_TIME), data)


def data_yaml(name: str) -> str:
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(CLASSES))
    return (f"# {name}: the bundled sample, written by sample_data.py (deterministic).\n"
            "# Relative paths are resolved against this file's folder.\n"
            f"train: images/train\nval: images/val\nnames:\n{names}\n")


def write_archive(zf: zipfile.ZipFile, name: str, task: str, counts: dict[str, int], size: int,
                  seed: int) -> None:
    rng = random.Random(seed)
    if task != "classify":
        add(zf, f"{name}/data.yaml", data_yaml(name))
    for split, count in counts.items():
        for index in range(count):
            if task == "classify":
                image, placed = scene(rng, size, max_objects=1,
                                      first_class=index % len(CLASSES))
                class_name = CLASSES[placed[0][0]]
                add(zf, f"{name}/{split}/{class_name}/{split}_{index:05d}.jpg", jpeg(image))
                continue
            image, placed = scene(rng, size, max_objects=3)
            add(zf, f"{name}/images/{split}/{split}_{index:05d}.jpg", jpeg(image))
            labels = "".join(label_line(c, p, size, task) + "\n" for c, p in placed)
            add(zf, f"{name}/labels/{split}/{split}_{index:05d}.txt", labels)


def write_sample(root: Path, *, task: str = "detect", train: int = 128, val: int = 32,
                 size: int = 128, seed: int = 0, name: str = "sample") -> Path:
    """Write ROOT/datasets/{name}.zip unless an identical archive is already there."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        write_archive(zf, name, task, {"train": train, "val": val}, size, seed)
    data = buffer.getvalue()
    path = root / "datasets" / f"{name}.zip"
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that plays the bucket")
    parser.add_argument("--task", choices=TASKS, default="detect", help="dataset layout")
    parser.add_argument("--train", type=int, default=128, help="training images")
    parser.add_argument("--val", type=int, default=32, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="sample", help="dataset id (the zip's name)")
    args = parser.parse_args(argv)
    print(write_sample(args.root, task=args.task, train=args.train, val=args.val,
                       size=args.size, seed=args.seed, name=args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
