"""image_classification: class folders or platform annotations, `AutoModelForImageClassification`.

Datasets: image folders `train/<class>/...`, `val/<class>/...` (`valid/`, `validation/`; `test/`
optional; class order = sorted folder names) or platform annotations
(`annotations_classification.json`, read by `utils`). Models: any Hub image classifier by name
with PRETRAINED=true; offline, the names of `architectures.OFFLINE_MODELS` are built from a small
configuration of the same architecture (`SMALL_CONFIGS`), sized to train on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import utils
from architectures import OFFLINE_MODELS
from data import MEAN, STD, image_transform, read_rgb, unknown_format
from task import Splits

TASK_TYPE = "image_classification"
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
TOP_K = 5  # the contract's top-5 accuracy and per-image top-5 predictions


# -- offline models: the Hub names' architectures, small ------------------------------------------

def _vit(image_size: int):
    from transformers import ViTConfig

    # 4x4 patches or more at any IMAGE_SIZE: the largest patch of 16, 8, 4, 2, 1 that tiles it.
    patch = next(p for p in (16, 8, 4, 2, 1) if image_size % p == 0 and image_size // p >= 4)
    return ViTConfig(image_size=image_size, patch_size=patch, hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def _resnet(image_size: int):
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                        layer_type="basic")


def _convnext(image_size: int):
    from transformers import ConvNextConfig

    return ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])


# architecture (OFFLINE_MODELS' value) -> its small configuration at an image size
SMALL_CONFIGS: dict[str, Callable[[int], Any]] = {
    "ViT": _vit, "ResNet": _resnet, "ConvNeXt": _convnext}


# -- data -----------------------------------------------------------------------------------------

def find_split(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise utils.DatasetError(f"dataset has no {'/'.join(SPLIT_NAMES[split])} folder "
                             f"(found: {', '.join(found) or 'nothing'}); expected "
                             "train/<class>/..., val/<class>/...")


def read_class_names(split_dir: Path) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir()
                   if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise utils.DatasetError(f"{split_dir.name}/ has no class folders")
    return names


def list_class_images(split_dir: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(class_names):
        folder = split_dir / name
        images = utils.list_images(folder) if folder.is_dir() else []
        if folder.is_dir() and not images:
            raise utils.DatasetError(f"class folder {split_dir.name}/{name} has no images")
        items.extend((image, index) for image in images)
    return items


def folder_items(root: Path, split: str, class_names: Sequence[str] | None, *,
                 against: str = "checkpoint") -> tuple[list[str], list[tuple[Path, int]]]:
    """One split of class folders. With `class_names` (the checkpoint's, or the training
    split's: `against` names which) a folder outside them fails; a class may have no folder."""
    split_dir = find_split(root, split)
    found = read_class_names(split_dir)
    if class_names is None:
        return found, list_class_images(split_dir, found)
    extra = sorted(set(found) - set(class_names))
    if extra:
        missing = sorted(set(class_names) - set(found))
        raise utils.DatasetError(f"{split_dir.name}/ classes differ from the {against}'s: "
                                 + (f"missing {', '.join(missing)}, " if missing else "")
                                 + f"extra {', '.join(extra)}")
    return list(class_names), list_class_images(split_dir, class_names)


class ClassificationImages(Dataset):
    def __init__(self, items: Sequence[tuple[Path, int]], transform):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.items[i]
        return {"pixel_values": self.transform(read_rgb(path)), "labels": label}


# -- validation -----------------------------------------------------------------------------------

class ClassificationValidator:
    """Confusion matrix, top-5 hits and the cross-entropy over the split; with `keep_per_image`,
    each image's top-5 (ids, probabilities) in the order validated."""

    def __init__(self, class_names: Sequence[str], *, keep_per_image: bool):
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.confusion = np.zeros((n, n), dtype=np.int64)
        self.top5 = 0
        self.loss_sum = 0.0
        self.per_image: list[tuple[list[int], list[float]]] | None = [] if keep_per_image else None

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        logits = outputs.logits.detach().float().cpu()
        labels = batch["labels"].detach().cpu()
        k = min(TOP_K, len(self.class_names))
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.top5 += int((logits.topk(k, 1).indices == labels[:, None]).any(1).sum())
        np.add.at(self.confusion, (labels.numpy(), logits.argmax(1).numpy()), 1)
        if self.per_image is not None:
            confidences, ids = logits.softmax(1).topk(k, 1)
            self.per_image.extend(zip(ids.tolist(), confidences.tolist(), strict=True))

    def result(self) -> utils.ValidationResult:
        metrics, per_class = utils.classification_metrics(self.confusion, self.class_names,
                                                          self.top5)
        seen = int(self.confusion.sum())
        return utils.ValidationResult(
            task_type=TASK_TYPE, metrics=metrics, primary_metric_name="accuracy",
            primary_metric_value=metrics["accuracy"], overall_loss=self.loss_sum / max(seen, 1),
            per_class_metrics=per_class, confusion_matrix=self.confusion.tolist(),
            class_names=self.class_names)


# -- the task -------------------------------------------------------------------------------------

class ClassificationTask:
    task_type = TASK_TYPE
    primary_metric = "accuracy"
    input_mean, input_std = MEAN, STD  # what image_transform applies
    default_model = next(iter(OFFLINE_MODELS[TASK_TYPE]))

    def offline_models(self) -> dict[str, str]:
        return dict(OFFLINE_MODELS[TASK_TYPE])

    def load_splits(self, root: Path, cfg: utils.Config, *, image_size: int,
                    class_names: Sequence[str] | None = None,
                    splits: Sequence[str] = ("train", "val")) -> Splits:
        """`splits`: ("train", "val") to train; one name (val or test) to evaluate, which
        `Splits.val` then holds."""
        *train_split, eval_split = splits
        platform = utils.platform_annotations_if_any(root, TASK_TYPE,
                                                     val_fraction=cfg.val_fraction,
                                                     split_seed=cfg.split_seed)
        if platform is not None:
            class_names = list(class_names or platform.class_names)
            train = (utils.platform_items(platform, train_split[0], class_names)
                     if train_split else [])
            val = utils.platform_items(platform, eval_split, class_names)
        elif not any((root / name).is_dir() for name in SPLIT_NAMES["train"] + SPLIT_NAMES["val"]):
            raise unknown_format(root, TASK_TYPE)
        else:
            train, against = [], "checkpoint"
            if train_split:
                class_names, train = folder_items(root, train_split[0], class_names)
                against = "training split"
            class_names, val = folder_items(root, eval_split, class_names, against=against)
        # Both splits in one image check: one line (or one warning) for the whole dataset.
        good = set(utils.check_images([image for image, _ in train + val], root=root,
                                      max_bad=cfg.max_bad_images))
        train = [item for item in train if item[0] in good]
        val = [item for item in val if item[0] in good]
        return Splits(
            train=ClassificationImages(train, image_transform(image_size, train=True))
            if train_split else None,
            val=ClassificationImages(val, image_transform(image_size, train=False)),
            class_names=list(class_names), val_images=val, platform=platform)

    def create_model(self, model_name: str, class_names: Sequence[str], *, pretrained: bool,
                     image_size: int) -> Any:
        from transformers import AutoConfig, AutoModelForImageClassification

        labels = {"num_labels": len(class_names),
                  "id2label": dict(enumerate(class_names)),
                  "label2id": {name: i for i, name in enumerate(class_names)}}
        if pretrained:  # a new head when the classes differ from the Hub model's
            return AutoModelForImageClassification.from_pretrained(
                model_name, ignore_mismatched_sizes=True, **labels)
        architecture = OFFLINE_MODELS[TASK_TYPE].get(model_name)
        if architecture is not None:
            config = SMALL_CONFIGS[architecture](image_size)
        else:  # another Hub name: its full configuration, from the local cache when offline
            try:
                config = AutoConfig.from_pretrained(model_name)
            except OSError as exc:
                raise utils.ConfigError(
                    f"MODEL_NAME={model_name} is not one this trainer builds offline "
                    f"({', '.join(OFFLINE_MODELS[TASK_TYPE])}) and its configuration could not "
                    f"be loaded ({type(exc).__name__})") from None
        for key, value in labels.items():
            setattr(config, key, value)
        return AutoModelForImageClassification.from_config(config)

    def model_from_config(self, config: dict[str, Any]) -> Any:
        from transformers import CONFIG_MAPPING, AutoModelForImageClassification

        return AutoModelForImageClassification.from_config(
            CONFIG_MAPPING[config["model_type"]].from_dict(config))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long)}

    def validator(self, class_names: Sequence[str], *,
                  keep_per_image: bool) -> ClassificationValidator:
        return ClassificationValidator(class_names, keep_per_image=keep_per_image)

    def image_records(self, validator: ClassificationValidator, splits: Splits, *,
                      mask_dir: Path | None = None, limit: int | None = None
                      ) -> list[dict[str, Any]]:
        return utils.classification_image_records(splits.val_images, validator.per_image or [],
                                                  splits.class_names)

    def batch_accuracy(self, batch: dict[str, Any], outputs: Any) -> tuple[Any, int]:
        """Training accuracy of one batch: (correct, images), `correct` a tensor on the device
        (summed over the epoch without a sync per step)."""
        labels = batch["labels"]
        return (outputs.logits.detach().argmax(1) == labels).sum(), len(labels)

    def predict(self, model: Any, images: Sequence[Path], class_names: Sequence[str], *,
                image_size: int, device: Any, out_dir: Path,
                confidence: float = 0.0) -> list[dict[str, Any]]:
        """Each image's top-5 classes (predict.py keeps TOP_K of them; `confidence` is for
        tasks that drop objects)."""
        transform = image_transform(image_size, train=False)
        batch_size = 16
        k = min(TOP_K, len(class_names))
        records = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                pixels = torch.stack([transform(read_rgb(path)) for path in batch]).to(device)
                top = model(pixel_values=pixels).logits.float().softmax(1).cpu().topk(k, 1)
                for path, values, ids in zip(batch, top.values, top.indices, strict=True):
                    records.append({"image": path.name, "top_k": [
                        {"class_id": int(i), "class_name": class_names[int(i)],
                         "confidence": round(float(v), 6)}
                        for v, i in zip(values, ids, strict=True)]})
        return records


TASK = ClassificationTask()
