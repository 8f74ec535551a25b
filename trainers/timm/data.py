"""Image-folder datasets: `train/<class>/*`, `val/<class>/*` (`valid/`, `validation/` too),
optional `test/`. Class order is the sorted folder names of `train/`, stored in every checkpoint.

Platform annotations (`annotations_classification.json` or `annotations.json` beside `images/`,
contract §2a) are read by `utils.read_platform_annotations` into an index of (image, class id):
the images stay where they were staged, the class order is the file's, the split the file's.

Preprocessing is timm's own: `resolve_data_config` gives the model's input size, interpolation,
mean, std and crop; `create_transform` turns it into training (random-resized crop, flip, colour
jitter, optional RandAugment) and evaluation (resize + centre crop) transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import utils
from distributed import Dist, ShardSampler

SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
TASK = "image_classification"
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


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


def check_same_classes(split_dir: Path, class_names: list[str], expected_from: str) -> None:
    """A split must have exactly the expected classes: a silent difference shifts every label."""
    found = read_class_names(split_dir)
    if found == list(class_names):
        return
    missing = sorted(set(class_names) - set(found))
    extra = sorted(set(found) - set(class_names))
    raise utils.DatasetError(
        f"{split_dir.name}/ classes differ from {expected_from}: "
        f"missing {_few(missing)}, extra {_few(extra)}")


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def index_images(split_dir: Path, class_names: list[str], *,
                 max_bad_images: int = 0) -> list[tuple[Path, int]]:
    """Every image with its class id; an empty class fails up front, and bad images (unreadable,
    truncated, oversized) by the contract's policy: one line, or skipped up to MAX_BAD_IMAGES
    (the verdict is cached with the staged dataset, so a second check costs a listing)."""
    return without_bad_images(list_class_images(split_dir, class_names), split_dir.parent,
                              max_bad_images)


def list_class_images(split_dir: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(class_names):
        folder = split_dir / name
        images = utils.list_images(folder)
        if not images:
            raise utils.DatasetError(f"class folder {split_dir.name}/{name} has no images")
        items.extend((image, index) for image in images)
    return items


def without_bad_images(items: list[tuple[Path, int]], root: Path,
                       max_bad_images: int) -> list[tuple[Path, int]]:
    good = set(utils.check_images([image for image, _ in items], root=root,
                                  max_bad=max_bad_images))
    return [item for item in items if item[0] in good]


@dataclass
class Splits:
    class_names: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    platform: utils.PlatformDataset | None = None  # the annotations read, when it has them


def load_splits(root: Path, *, max_bad_images: int = 0, val_fraction: float = 0.2,
                split_seed: int = 42) -> Splits:
    """train/ and val/ indexed and checked: same classes, no empty class, every image readable;
    from the platform's annotations when the dataset has them."""
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
        check_same_classes(val_dir, class_names, "train/")
        train = list_class_images(train_dir, class_names)
        val = list_class_images(val_dir, class_names)
    # Both splits in one image check: one line (or one warning) for the whole dataset.
    good = set(without_bad_images(train + val, root, max_bad_images))
    return Splits(class_names, [item for item in train if item in good],
                  [item for item in val if item in good], platform)


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
        check_same_classes(split_dir, class_names, "the checkpoint's")
        return index_images(split_dir, class_names, max_bad_images=max_bad_images)
    return without_bad_images(utils.platform_items(platform, split, class_names), root,
                              max_bad_images)


class ImageFolder(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform: Any):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


# -- preprocessing ----------------------------------------------------------------------------

def data_config_for(model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    """timm's resolved preprocessing for the model, at IMAGE_SIZE when one is set.

    Stored in every checkpoint as plain lists, so evaluate.py and predict.py rebuild the exact
    evaluation transform without timm's model registry.
    """
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return plain_data_config(resolve_data_config(args, model=model))


def plain_data_config(config: dict[str, Any], image_size: int | None = None) -> dict[str, Any]:
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
             if k in DATA_CONFIG_KEYS}
    if image_size:
        plain["input_size"] = [3, image_size, image_size]
    return plain


def eval_transform(data_config: dict[str, Any]):
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return create_transform(**config, is_training=False)


def train_transform(data_config: dict[str, Any], *, hflip: float, crop_scale: float,
                    auto_augment: str | None, **options: Any):
    """`options`: more create_transform keywords (EXTRA_ARGS' augmentation, options.py)."""
    return create_transform(
        input_size=tuple(data_config["input_size"]), is_training=True,
        interpolation=data_config["interpolation"], mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]), scale=(crop_scale, 1.0), hflip=hflip,
        auto_augment=auto_augment or None, **options)


# -- loaders ----------------------------------------------------------------------------------

def train_loader(dataset: Dataset, batch_size: int, *, workers: int, seed: int,
                 dist: Dist) -> DataLoader:
    """Shuffled per epoch (call `loader.sampler.set_epoch(epoch)`), sharded across ranks.

    Full batches only, unless one process has fewer images than a batch: a last batch of one
    image would break BatchNorm, and Mixup needs even batches.
    """
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                 shuffle=True, seed=seed)
    per_rank = math.ceil(len(dataset) / dist.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=per_rank >= batch_size, persistent_workers=workers > 0,
                      pin_memory=dist.device.type == "cuda")


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int,
                dist: Dist | None = None) -> DataLoader:
    """In order; sharded without padding across ranks, so every image counts exactly once."""
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size) if dist else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
