"""Write the bundled sample dataset: coloured shapes on textured canvases, with their labels.

One zip at ROOT/datasets/{NAME}.zip (STORAGE_TYPE=local, LOCAL_STORAGE_ROOT=ROOT, DATASET_ID=NAME)
holding one top-level folder, in the layout Ultralytics reads for the task:

- detect:   data.yaml, images/{train,val}/*.jpg, labels/{train,val}/*.txt (`class cx cy w h`)
- segment:  the same, each label line a polygon (`class x1 y1 x2 y2 ...`)
- pose:     the same, squares only, each label line a box and its four corners as keypoints
            (`0 cx cy w h x1 y1 2 ...`; data.yaml adds kpt_shape, flip_idx, kpt_names, skeleton)
- classify: {train,val}/<class>/*.jpg, one shape per image

`--layout platform` writes the same scenes in the platform's own annotation format instead
(contract section 2a, the standard variant): images/*.jpg and annotations_<task>.json with
the split in `split_config`.

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
TASKS = ("detect", "segment", "pose", "classify")
LAYOUTS = ("yolo", "platform")
# Pose: a square's corners, in the order shape_polygon draws them (image y points down; the
# rotation stays under 45 degrees, so each corner keeps its name).
CORNERS = ("bottom_right", "bottom_left", "top_left", "top_right")
SKELETON = ((0, 1), (1, 2), (2, 3), (3, 0))  # 0-based: the square's sides
ANNOTATION_FILES = {"detect": "annotations_detection.json",
                    "segment": "annotations_segmentation.json",
                    "pose": "annotations_pose.json",
                    "classify": "annotations_classification.json"}
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
          only_class: int | None = None) -> tuple[Image.Image, list[tuple[int, Polygon]]]:
    """A canvas with 1..max_objects shapes that do not touch; their class ids and outlines.

    `first_class` fixes the first shape's class (classification balances its classes);
    `only_class` every shape's (pose: squares only)."""
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
            if only_class is not None:
                class_id = only_class
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
    line = f"{class_id} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"
    if task == "pose":  # pose classes: the square alone, id 0
        line = "0" + line[len(str(class_id)):] + "".join(f" {x:.6f} {y:.6f} 2" for x, y in clip)
    return line


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
    zf.writestr(zipfile.ZipInfo(name, date_time=ZIP_TIME), data)


def task_classes(task: str) -> tuple[str, ...]:
    return ("square",) if task == "pose" else CLASSES


def data_yaml(name: str, task: str = "detect") -> str:
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(task_classes(task)))
    text = (f"# {name}: the bundled sample, written by sample_data.py (deterministic).\n"
            "# Relative paths are resolved against this file's folder.\n"
            f"train: images/train\nval: images/val\nnames:\n{names}\n")
    if task == "pose":
        flip = [CORNERS.index(c.replace("left", "@").replace("right", "left")
                              .replace("@", "right")) for c in CORNERS]
        text += (f"kpt_shape: [{len(CORNERS)}, 3]\nflip_idx: {flip}\n"
                 f"kpt_names:\n  0: [{', '.join(CORNERS)}]\n"
                 f"skeleton: {[list(pair) for pair in SKELETON]}\n")
    return text


def write_archive(zf: zipfile.ZipFile, name: str, task: str, counts: dict[str, int], size: int,
                  seed: int) -> None:
    rng = random.Random(seed)
    if task != "classify":
        add(zf, f"{name}/data.yaml", data_yaml(name, task))
    for split, count in counts.items():
        for index in range(count):
            if task == "classify":
                image, placed = scene(rng, size, max_objects=1,
                                      first_class=index % len(CLASSES))
                class_name = CLASSES[placed[0][0]]
                add(zf, f"{name}/{split}/{class_name}/{split}_{index:05d}.jpg", jpeg(image))
                continue
            image, placed = scene(rng, size, max_objects=3,
                                  only_class=CLASSES.index("square") if task == "pose" else None)
            add(zf, f"{name}/images/{split}/{split}_{index:05d}.jpg", jpeg(image))
            labels = "".join(label_line(c, p, size, task) + "\n" for c, p in placed)
            add(zf, f"{name}/labels/{split}/{split}_{index:05d}.txt", labels)


def platform_annotations(task: str, size: int,
                         scenes: list[tuple[str, str, list[tuple[int, Polygon]]]]) -> dict:
    """The platform's annotation file (standard variant) for `scenes` (split, file name, shapes):
    pixel boxes [x, y, w, h], polygons, keypoints (x, y, v) and the split in split_config."""
    classes = task_classes(task)
    categories = []
    for class_id, class_name in enumerate(classes):
        category: dict = {"id": class_id + 1, "name": class_name, "supercategory": "shape"}
        if task == "pose":
            category.update(keypoints=list(CORNERS),
                            skeleton=[[a + 1, b + 1] for a, b in SKELETON])  # COCO: 1-based
        categories.append(category)
    images, annotations, splits = [], [], {}
    for image_id, (split, file_name, placed) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        splits[str(image_id)] = split
        for class_id, polygon in placed:
            category_id = (0 if task == "pose" else class_id) + 1
            annotation: dict = {"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "iscrowd": 0}
            if task != "classify":
                clip = [(min(max(x, 0.0), size), min(max(y, 0.0), size)) for x, y in polygon]
                x0, y0, x1, y1 = bounds(clip)
                annotation.update(bbox=[round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                  area=round((x1 - x0) * (y1 - y0), 2))
                if task == "segment":
                    annotation["segmentation"] = [[round(v, 2) for xy in clip for v in xy]]
                if task == "pose":
                    annotation["keypoints"] = [v for x, y in clip for v in
                                               (round(x, 2), round(y, 2), 2)]
                    annotation["num_keypoints"] = len(clip)
            annotations.append(annotation)
            if task == "classify":
                break  # one label per image
    return {"info": {"description": "sample_data.py"}, "categories": categories,
            "images": images, "annotations": annotations, "split_config": {"splits": splits}}


def write_platform_archive(zf: zipfile.ZipFile, name: str, task: str, counts: dict[str, int],
                           size: int, seed: int) -> None:
    """The same scenes as the YOLO layout, in the platform's own annotation format."""
    import json

    rng = random.Random(seed)
    scenes = []
    for split, count in counts.items():
        for index in range(count):
            if task == "classify":
                image, placed = scene(rng, size, max_objects=1, first_class=index % len(CLASSES))
            else:
                image, placed = scene(rng, size, max_objects=3, only_class=CLASSES.index(
                    "square") if task == "pose" else None)
            file_name = f"{split}_{index:05d}.jpg"
            add(zf, f"{name}/images/{file_name}", jpeg(image))
            scenes.append((split, file_name, placed))
    add(zf, f"{name}/{ANNOTATION_FILES[task]}",
        json.dumps(platform_annotations(task, size, scenes), indent=1))


def write_sample(root: Path, *, task: str = "detect", train: int = 128, val: int = 32,
                 size: int = 128, seed: int = 0, name: str = "sample",
                 layout: str = "yolo") -> Path:
    """Write ROOT/datasets/{name}.zip unless an identical archive is already there."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
    write = write_platform_archive if layout == "platform" else write_archive
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        write(zf, name, task, {"train": train, "val": val}, size, seed)
    data = buffer.getvalue()
    path = root / "datasets" / f"{name}.zip"
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that plays the bucket")
    parser.add_argument("--task", choices=TASKS, default="detect", help="the task's labels")
    parser.add_argument("--layout", choices=LAYOUTS, default="yolo",
                        help="Ultralytics' own layout, or the platform's annotations")
    parser.add_argument("--train", type=int, default=128, help="training images")
    parser.add_argument("--val", type=int, default=32, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="sample", help="dataset id (the zip's name)")
    args = parser.parse_args(argv)
    print(write_sample(args.root, task=args.task, train=args.train, val=args.val,
                       size=args.size, seed=args.seed, name=args.name, layout=args.layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
