"""A sample object-detection dataset in the platform's own annotation format (contract §2a, the
standard COCO-based variant): `{root}/datasets/{dataset_id}.zip` holding one top-level folder with
`annotations_detection.json` and `images/`, the split in `split_config`.

One to three filled circles, squares and triangles in bright colours on a dark, smooth background
(a fifth to a half of the image across, never touching), so that the class is in the shape and a
tiny detector learns something on a CPU in minutes; every eighth image is a negative (only a
`__background__` annotation), kept as an image with no objects. Images are 4:3, not square, so
the resize to the model's square input and back is exercised. Deterministic: the same bytes for
the same arguments.
"""

from __future__ import annotations

import io
import json
import math
import random
import zipfile
from pathlib import Path
from typing import Any

CLASSES = ("circle", "square", "triangle")
NEGATIVE_EVERY = 8
ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def shape_outline(shape: str, cx: float, cy: float, radius: float, angle: float
                  ) -> list[tuple[float, float]]:
    corners, start = {"circle": (24, 0.0), "square": (4, math.pi / 4 + angle),
                      "triangle": (3, -math.pi / 2 + angle)}[shape]
    return [(cx + radius * math.cos(start + 2 * math.pi * i / corners),
             cy + radius * math.sin(start + 2 * math.pi * i / corners)) for i in range(corners)]


def scene(rng: random.Random, width: int, height: int, negative: bool
          ) -> tuple[bytes, list[tuple[int, tuple[float, float, float, float]]]]:
    """A JPEG and its shapes as (class id, (x, y, w, h) in pixels)."""
    from PIL import Image, ImageDraw

    base = [rng.randint(0, 40) for _ in range(12)]  # a dark 2x2 gradient, no edges to hide in
    canvas = Image.frombytes("RGB", (2, 2), bytes(base)).resize((width, height),
                                                              Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[int, tuple[float, float, float, float]]] = []
    side = min(width, height)
    for _ in range(0 if negative else rng.randint(1, 3)):
        for _attempt in range(20):
            radius = rng.uniform(side * 0.1, side * 0.25)
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            class_id = rng.randrange(len(CLASSES))
            outline = shape_outline(CLASSES[class_id], cx, cy, radius, rng.uniform(-0.4, 0.4))
            xs, ys = [x for x, _ in outline], [y for _, y in outline]
            box = (max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), width),
                   min(max(ys), height))
            if any(box[0] < o[0] + o[2] + 2 and o[0] < box[2] + 2 and box[1] < o[1] + o[3] + 2
                   and o[1] < box[3] + 2 for _, o in placed):
                continue
            colour = [rng.randint(150, 255), rng.randint(60, 255), rng.randint(0, 255)]
            rng.shuffle(colour)
            draw.polygon(outline, fill=tuple(colour))
            placed.append((class_id, (box[0], box[1], box[2] - box[0], box[3] - box[1])))
            break
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue(), placed


def annotations(scenes: list[tuple[str, str, list[tuple[int, tuple[float, ...]]]]],
                width: int, height: int) -> dict[str, Any]:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    background_id = len(CLASSES) + 1
    categories.append({"id": background_id, "name": "__background__"})
    images, annotation_list, splits = [], [], {}
    for image_id, (split, file_name, placed) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        splits[str(image_id)] = split
        for class_id, box in placed or [(None, None)]:
            entry: dict[str, Any] = {"id": len(annotation_list) + 1, "image_id": image_id,
                                     "iscrowd": 0}
            if class_id is None:  # a negative image says so with the background category
                entry["category_id"] = background_id
            else:
                entry.update(category_id=class_id + 1, bbox=[round(v, 2) for v in box],
                             area=round(box[2] * box[3], 2))
            annotation_list.append(entry)
    return {"info": {"description": "detection_sample.py"}, "categories": categories,
            "images": images, "annotations": annotation_list,
            "split_config": {"splits": splits}}


def write_sample(root: Path, dataset_id: str, *, train: int, val: int, image_size: int,
                 seed: int) -> Path:
    """Write `{root}/datasets/{dataset_id}.zip` (unless identical bytes are there); its path."""
    rng = random.Random(seed)
    width, height = image_size, max(round(image_size * 3 / 4), 1)
    buffer = io.BytesIO()
    scenes = []
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for split, count in (("train", train), ("val", val)):
            for index in range(count):
                data, placed = scene(rng, width, height, negative=index % NEGATIVE_EVERY
                                     == NEGATIVE_EVERY - 1)
                file_name = f"{split}/{split}_{index:05d}.jpg"
                zf.writestr(zipfile.ZipInfo(f"{dataset_id}/images/{file_name}",
                                            date_time=ZIP_TIME), data)
                scenes.append((split, file_name, placed))
        zf.writestr(zipfile.ZipInfo(f"{dataset_id}/annotations_detection.json",
                                    date_time=ZIP_TIME),
                    json.dumps(annotations(scenes, width, height), indent=1))
    path = root / "datasets" / f"{dataset_id}.zip"
    if not (path.is_file() and path.read_bytes() == buffer.getvalue()):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return path
