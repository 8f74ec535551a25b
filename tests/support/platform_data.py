"""Tiny datasets in the platform's own annotation format (contract §2a), written for tests and
benchmarks: real images (solid colours, so a tiny model can learn them), both variants."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def image_bytes(colour: tuple[int, int, int], size: int = 32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def classification(root: Path, *, per_class: int = 4, nested: bool = False,
                   split_config: bool = True, background: int = 0,
                   classes: tuple[str, ...] = ("red", "green", "blue"),
                   size: int = 32) -> dict[str, Any]:
    """A classification dataset: `per_class` images per class, every 4th one in val (through
    `split_config` or per-image `split`); `background` negative images. Returns the JSON."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    if background:
        categories.append({"id": 99, "name": "__background__"})
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    splits: dict[str, str] = {}
    next_id = 1
    for i in range(per_class):
        for cat in categories[:len(classes)]:
            name = f"{cat['name']}/{cat['name']}_{i}.png"
            (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / name).write_bytes(image_bytes(COLOURS.get(cat["name"], (9, 9, 9)),
                                                             size))
            split = "val" if i % 4 == 3 else "train"
            images.append({"id": next_id, "file_name": name, "width": size, "height": size,
                           **({} if split_config else {"split": split})})
            splits[str(next_id)] = split
            annotations.append({"id": 1000 + next_id, "image_id": next_id,
                                "category_id": cat["id"]})
            next_id += 1
    for i in range(background):
        name = f"bg_{i}.png"
        (root / "images" / name).write_bytes(image_bytes((128, 128, 128), size))
        images.append({"id": next_id, "file_name": name, "width": size, "height": size,
                       **({} if split_config else {"split": "train"})})
        splits[str(next_id)] = "train"
        annotations.append({"id": 1000 + next_id, "image_id": next_id, "category_id": 99})
        next_id += 1
    data: dict[str, Any]
    if nested:
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append(
                {"id": ann["id"], "class_id": ann["category_id"]})
        data = {"format_version": "1.0", "task_type": "image_classification",
                "classes": categories,
                "images": [{**image, "annotations": by_image.get(image["id"], [])}
                           for image in images]}
    else:
        data = {"categories": categories, "images": images, "annotations": annotations}
    if split_config:
        data["split_config"] = {"splits": splits}
    write_json(root / "annotations_classification.json", data)
    return data


def detection(root: Path, *, images: int = 6, boxes: int = 2, nested: bool = False,
              size: int = 64, keypoints: bool = False, write_images: bool = True,
              file: str = "annotations_detection.json") -> dict[str, Any]:
    """A detection (or pose) dataset: `images` images with `boxes` boxes each, per-image split."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories: list[dict[str, Any]] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    if keypoints:
        categories = [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"],
                       "skeleton": [[1, 2], [1, 3]]}]
    blob = image_bytes((200, 200, 200), size) if write_images else b""
    records, annotations = [], []
    for i in range(images):
        name = f"img_{i:05d}.png"
        if write_images:
            (root / "images" / name).write_bytes(blob)
        records.append({"id": i + 1, "file_name": name, "width": size, "height": size,
                        "split": "val" if i % 5 == 4 else "train"})
        for b in range(boxes):
            ann: dict[str, Any] = {"id": i * boxes + b + 1, "image_id": i + 1,
                                   "category_id": categories[b % len(categories)]["id"],
                                   "bbox": [4 + b, 6, 20, 16], "area": 320, "iscrowd": 0}
            if keypoints:
                ann["keypoints"] = [10, 10, 2, 8, 8, 1, 12, 8, 0]
                ann["num_keypoints"] = 2
            annotations.append(ann)
    if nested:
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append(
                {k if k != "category_id" else "class_id": v for k, v in ann.items()
                 if k != "image_id"})
        data = {"format_version": "1.0", "classes": categories,
                "images": [{**r, "annotations": by_image.get(r["id"], [])} for r in records]}
    else:
        data = {"categories": categories, "images": records, "annotations": annotations}
    write_json(root / file, data)
    return data


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def zip_folder(root: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(root).as_posix())
    return archive
