"""Write a bundled sample dataset at ROOT/datasets/{ID}.zip (STORAGE_TYPE=local,
LOCAL_STORAGE_ROOT=ROOT, DATASET_ID=ID) for one task (--task, default image_classification).

Classification: coloured shapes on cluttered backgrounds (shape, not colour, decides the class),
as image folders, or with `--layout platform_annotations` as the platform's own format
(annotations_classification.json beside images/, each image's split named). Object detection
and semantic segmentation: their task modules' `write_sample` (platform annotations).
Deterministic (same bytes every run) and offline, so accuracy on it means something.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle")
SIZE = 64


def draw_shape(rng: random.Random, shape: str) -> Image.Image:
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # clutter, so the class is in the shape and not in the background
        x, y = rng.randint(0, SIZE), rng.randint(0, SIZE)
        draw.line((x, y, x + rng.randint(-20, 20), y + rng.randint(-20, 20)),
                  fill=tuple(rng.randint(0, 255) for _ in range(3)), width=1)
    radius = rng.randint(12, 24)
    cx, cy = rng.randint(radius, SIZE - radius), rng.randint(radius, SIZE - radius)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                     fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def write_sample(path: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Write the archive (one top-level folder `sample/`) unless an identical one exists."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for split, count in per_class.items():
            for shape in CLASSES:
                for i in range(count):
                    png = io.BytesIO()
                    draw_shape(rng, shape).save(png, format="PNG")
                    info = zipfile.ZipInfo(f"sample/{split}/{shape}/{shape}_{i:04d}.png",
                                           date_time=(2024, 1, 1, 0, 0, 0))
                    zf.writestr(info, png.getvalue())
    return write_if_changed(path, buffer.getvalue())


def write_platform_sample(path: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """The same images in the platform's format: images/<split>/<file>, and
    annotations_classification.json (COCO-style categories, one class annotation per image)."""
    rng = random.Random(seed)
    images, annotations = [], []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for split, count in per_class.items():
            for class_id, shape in enumerate(CLASSES, start=1):
                for i in range(count):
                    png = io.BytesIO()
                    draw_shape(rng, shape).save(png, format="PNG")
                    name = f"{split}/{shape}_{i:04d}.png"
                    zf.writestr(zipfile.ZipInfo(f"images/{name}", date_time=(2024, 1, 1, 0, 0, 0)),
                                png.getvalue())
                    image_id = len(images) + 1
                    images.append({"id": image_id, "file_name": name, "width": SIZE,
                                   "height": SIZE, "split": split})
                    annotations.append({"id": image_id, "image_id": image_id,
                                        "category_id": class_id})
        document = {"categories": [{"id": i, "name": name}
                                   for i, name in enumerate(CLASSES, start=1)],
                    "images": images, "annotations": annotations}
        zf.writestr(zipfile.ZipInfo("annotations_classification.json",
                                    date_time=(2024, 1, 1, 0, 0, 0)),
                    json.dumps(document, indent=1))
    return write_if_changed(path, buffer.getvalue())


def write_if_changed(path: Path, data: bytes) -> Path:
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that plays the bucket")
    parser.add_argument("--task", default="image_classification",
                        choices=("image_classification", "object_detection",
                                 "semantic_segmentation"))
    parser.add_argument("--layout", default="image_folder",
                        choices=("image_folder", "platform_annotations"),
                        help="classification only (the other tasks: platform annotations)")
    parser.add_argument("--id", default="sample", help="dataset id: the archive's name")
    parser.add_argument("--train", type=int, default=200,
                        help="training images (per class for classification)")
    parser.add_argument("--val", type=int, default=40,
                        help="validation images (per class for classification)")
    parser.add_argument("--image-size", type=int, default=SIZE,
                        help="image side in pixels (detection, segmentation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = args.root / "datasets" / f"{args.id}.zip"
    counts = {"train": args.train, "val": args.val}
    if args.task == "object_detection":  # imported here: each pulls its task's libraries
        from detection import write_sample as write_task_sample
    elif args.task == "semantic_segmentation":
        from segmentation import write_sample as write_task_sample
    elif args.layout == "platform_annotations":
        out = write_platform_sample(path, counts, args.seed)
    else:
        out = write_sample(path, counts, args.seed)
    if args.task != "image_classification":
        out = write_task_sample(args.root, args.id, train=args.train, val=args.val,
                                image_size=args.image_size, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
