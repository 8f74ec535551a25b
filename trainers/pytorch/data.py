"""Image-folder datasets: `train/<class>/*`, `val/<class>/*` (`valid/`, `validation/` too).

Class order is the sorted folder names of the training split, stored in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

import utils

SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def find_split(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise utils.DatasetError(f"dataset has no {'/'.join(SPLIT_NAMES[split])} folder "
                             f"(found: {', '.join(found) or 'nothing'}); expected "
                             "train/<class>/..., val/<class>/...")


def read_class_names(split_dir: Path) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise utils.DatasetError(f"{split_dir.name}/ has no class folders")
    return names


def index_images(split_dir: Path, class_names: list[str],
                 max_bad_images: int = 0) -> list[tuple[Path, int]]:
    """Every image with its class id; an empty class fails up front, and bad images (unreadable,
    truncated, oversized) by the contract's policy: one line, or skipped up to MAX_BAD_IMAGES."""
    return without_bad_images(list_class_images(split_dir, class_names), split_dir.parent,
                              max_bad_images)


def list_class_images(split_dir: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(class_names):
        folder = split_dir / name
        images = utils.list_images(folder) if folder.is_dir() else []
        if folder.is_dir() and not images:
            raise utils.DatasetError(f"class folder {split_dir.name}/{name} has no images")
        items.extend((image, index) for image in images)
    return items


def without_bad_images(items: list[tuple[Path, int]], root: Path,
                       max_bad_images: int) -> list[tuple[Path, int]]:
    good = set(utils.check_images([image for image, _ in items], root=root,
                                  max_bad=max_bad_images))
    return [item for item in items if item[0] in good]


class ImageFolder(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform: T.Transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def build_transform(image_size: int, *, train: bool, mean=MEAN, std=STD) -> T.Transform:
    steps: list[T.Transform] = [T.ToImage(), T.Resize((image_size, image_size), antialias=True)]
    if train:
        steps += [T.RandomHorizontalFlip()]
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


@dataclass
class Splits:
    class_names: list[str]
    train: ImageFolder
    val: ImageFolder


def load_splits(root: Path, image_size: int, max_bad_images: int = 0) -> Splits:
    train_dir, val_dir = find_split(root, "train"), find_split(root, "val")
    class_names = read_class_names(train_dir)
    extra = sorted(set(read_class_names(val_dir)) - set(class_names))
    if extra:
        raise utils.DatasetError(f"{val_dir.name}/ has classes missing from train/: "
                                 f"{', '.join(extra)}")
    # Both splits in one image check: one line (or one warning) for the whole dataset.
    train, val = list_class_images(train_dir, class_names), list_class_images(val_dir, class_names)
    good = set(without_bad_images(train + val, root, max_bad_images))
    return Splits(class_names,
                  ImageFolder([item for item in train if item in good],
                              build_transform(image_size, train=True)),
                  ImageFolder([item for item in val if item in good],
                              build_transform(image_size, train=False)))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int,
                seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))
