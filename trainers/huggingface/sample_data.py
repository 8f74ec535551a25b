"""Write the bundled sample dataset: coloured shapes on textured backgrounds, as an image-folder
zip at ROOT/datasets/sample.zip (STORAGE_TYPE=local, LOCAL_STORAGE_ROOT=ROOT, DATASET_ID=sample).

Deterministic (same bytes every run) and offline; real image content a CNN must learn (shape,
not colour, decides the class), so accuracy on it means something.
"""

from __future__ import annotations

import argparse
import io
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
    data = buffer.getvalue()
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that plays the bucket")
    parser.add_argument("--train", type=int, default=200, help="training images per class")
    parser.add_argument("--val", type=int, default=40, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_sample(args.root / "datasets" / "sample.zip",
                       {"train": args.train, "val": args.val}, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
