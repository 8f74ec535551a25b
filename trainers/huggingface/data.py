"""Image-folder datasets: `train/<class>/*`, `val/<class>/*` (`valid/`, `validation/` too).

Class order is the sorted folder names of the training split, stored in every checkpoint.
Platform annotations (`annotations_classification.json` or `annotations.json` beside `images/`,
contract §2a) are read by `utils.read_platform_annotations` into an index of (image, class id):
the images stay where they were staged, the class order is the file's, the split the file's.
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
TASK = "image_classification"
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


def unknown_format(root: Path) -> utils.DatasetError:
    from capabilities import CAPABILITIES

    return utils.dataset_format_error(root, CAPABILITIES.dataset_layouts)


def split_items(root: Path, split: str, class_names: list[str], *, max_bad_images: int = 0,
                val_fraction: float = 0.2, split_seed: int = 42) -> list[tuple[Path, int]]:
    """One split to evaluate, labelled by `class_names` (the checkpoint's), either layout."""
    platform = utils.platform_annotations_if_any(root, TASK, val_fraction=val_fraction,
                                                split_seed=split_seed)
    if platform is None:
        split_dir = find_split(root, split)
        found = read_class_names(split_dir)
        if not set(found) <= set(class_names):
            raise utils.DatasetError(
                f"{split} split classes {found} differ from the checkpoint's {class_names}")
        return index_images(split_dir, class_names, max_bad_images)
    return without_bad_images(utils.platform_items(platform, split, class_names), root,
                              max_bad_images)


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
    platform: utils.PlatformDataset | None = None  # the annotations read, when it has them


def load_splits(root: Path, image_size: int, max_bad_images: int = 0, *,
                val_fraction: float = 0.2, split_seed: int = 42) -> Splits:
    platform = utils.platform_annotations_if_any(root, TASK, val_fraction=val_fraction,
                                                split_seed=split_seed)
    if platform is not None:
        class_names = list(platform.class_names)
        train = utils.platform_items(platform, "train", class_names)
        val = utils.platform_items(platform, "val", class_names)
    elif not any((root / name).is_dir() for name in SPLIT_NAMES["train"]):
        raise unknown_format(root)
    else:
        train_dir, val_dir = find_split(root, "train"), find_split(root, "val")
        class_names = read_class_names(train_dir)
        extra = sorted(set(read_class_names(val_dir)) - set(class_names))
        if extra:
            raise utils.DatasetError(f"{val_dir.name}/ has classes missing from train/: "
                                     f"{', '.join(extra)}")
        train = list_class_images(train_dir, class_names)
        val = list_class_images(val_dir, class_names)
    # Both splits in one image check: one line (or one warning) for the whole dataset.
    good = set(without_bad_images(train + val, root, max_bad_images))
    return Splits(class_names,
                  ImageFolder([item for item in train if item in good],
                              build_transform(image_size, train=True)),
                  ImageFolder([item for item in val if item in good],
                              build_transform(image_size, train=False)), platform)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int,
                seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))
