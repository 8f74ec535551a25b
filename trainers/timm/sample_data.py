"""Write the bundled sample dataset: handwritten digits as an image-folder zip at
ROOT/datasets/sample.zip (STORAGE_TYPE=local, LOCAL_STORAGE_ROOT=ROOT, DATASET_ID=sample).

The digits are scikit-learn's bundled copy of the UCI optical-recognition set (1797 scans of
8x8 pixels, ten classes), upscaled to 32 px, dark ink on light paper in random tints, so the
class is in the shape and not in the colour. Deterministic (same bytes every run) and
offline: scikit-learn ships the data inside the package.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import zipfile
from pathlib import Path

SIZE = 32
SPLITS = ("train", "val", "test")


def digit_image(pixels, rng: random.Random):
    """An 8x8 scan (values 0-16) as a SIZE x SIZE RGB image: dark ink on light paper, each in
    a random tint."""
    import numpy as np
    from PIL import Image

    ink = np.array([rng.randint(0, 110) for _ in range(3)], dtype=np.float32)
    paper = np.array([rng.randint(150, 255) for _ in range(3)], dtype=np.float32)
    weight = (np.asarray(pixels, dtype=np.float32) / 16.0)[..., None]
    small = Image.fromarray((paper + (ink - paper) * weight).astype(np.uint8), "RGB")
    return small.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def write_sample(path: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Write the archive (one top-level folder `sample/`) unless an identical one exists.

    `per_class` maps a split to its images per class; the splits never share a scan.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(digits.target):
        by_class.setdefault(int(label), []).append(index)
    needed = sum(per_class.values())
    smallest = min(len(v) for v in by_class.values())
    if needed > smallest:
        raise SystemExit(f"{needed} images per class asked for; the digits have {smallest}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for label, indices in sorted(by_class.items()):
            rng.shuffle(indices)
            start = 0
            for split in SPLITS:
                for n, index in enumerate(indices[start:start + per_class.get(split, 0)]):
                    png = io.BytesIO()
                    digit_image(digits.images[index], rng).save(png, format="PNG")
                    info = zipfile.ZipInfo(f"sample/{split}/{label}/{label}_{n:04d}.png",
                                           date_time=(2024, 1, 1, 0, 0, 0))
                    zf.writestr(info, png.getvalue())
                start += per_class.get(split, 0)
    data = buffer.getvalue()
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder that plays the bucket")
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--val", type=int, default=30, help="validation images per class")
    parser.add_argument("--test", type=int, default=30, help="test images per class (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_sample(args.root / "datasets" / "sample.zip",
                       {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
