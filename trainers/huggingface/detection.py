"""Object detection (DETR family: RT-DETR v2, D-FINE, Conditional DETR) for the one training loop.

Data: the platform's own annotations (contract §2a, both variants), read by `utils`. Each image
is resized to a square `image_size` as 0..1 RGB pixels (the model normalises them as its
processor would: detection_models.py); its target is what transformers' DETR-family losses take,
{"class_labels": LongTensor[n], "boxes": FloatTensor[n, 4] normalised (cx, cy, w, h)}, plus the
two keys transformers' own image processors add to a target and the losses ignore: "image_id"
(the image's index in its split) and "orig_size" ((height, width) of the annotated image), which
the validator needs to put boxes back into pixels. A batch is {"pixel_values", "labels"}, so
`model(**batch)` takes it as it is. Negative images (`__background__`) are images with no boxes.
The validated split is exactly the file's (split_config, else each image's split, else the
seeded split), in the file's order.

Metrics: detection_metrics.py. A sample dataset: detection_sample.py (`write_sample`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import detection_models
import utils
from detection_metrics import (
    PRIMARY_METRIC,
    SHOWN_CONFIDENCE,
    TASK_TYPE,
    DetectionValidator,
    post_process,
)
from detection_sample import write_sample
from task import Splits

log = logging.getLogger(f"trainer.{__name__}")

PREDICT_BATCH = 8


def load_pixels(path: Path, image_size: int) -> Any:
    """The image as a [3, S, S] float tensor of 0..1 RGB pixels."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as image:
        square = image.convert("RGB").resize((image_size, image_size),
                                             Image.Resampling.BILINEAR)
    return F.to_dtype(F.pil_to_tensor(square), torch.float32, scale=True)


class DetectionDataset:
    """A split's images and their boxes, as the model takes them (a torch map-style dataset)."""

    def __init__(self, images: Sequence[utils.AnnotatedImage], class_ids: Sequence[int], *,
                 image_size: int, train: bool):
        self.images = list(images)
        self.class_ids = list(class_ids)  # the dataset's class id -> the model's
        self.image_size = image_size
        self.train = train  # random horizontal flips

    def __len__(self) -> int:
        return len(self.images)

    def target(self, index: int) -> dict[str, Any]:
        import torch

        image = self.images[index]
        boxes = torch.tensor([[(x + w / 2) / image.width, (y + h / 2) / image.height,
                               w / image.width, h / image.height]
                              for x, y, w, h in (obj.bbox for obj in image.objects)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.class_ids[obj.class_id] for obj in image.objects],
                              dtype=torch.long)
        return {"class_labels": labels, "boxes": boxes, "image_id": torch.tensor(index),
                "orig_size": torch.tensor([image.height, image.width])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        pixels = load_pixels(self.images[index].path, self.image_size)
        target = self.target(index)
        if self.train and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
            target["boxes"][:, 0] = 1 - target["boxes"][:, 0]
        return {"pixel_values": pixels, "labels": target}


def class_mapping(dataset: utils.PlatformDataset, class_names: Sequence[str] | None,
                  used: Sequence[utils.AnnotatedImage]) -> tuple[list[str], list[int]]:
    """The model's class names and, per dataset class, its id among them (-1: not a class of
    the model's, which fails if one of `used` has such a box)."""
    if class_names is None:
        return list(dataset.class_names), list(range(len(dataset.class_names)))
    index = {name: i for i, name in enumerate(class_names)}
    ids = [index.get(name, -1) for name in dataset.class_names]
    unknown = sorted({dataset.class_names[obj.class_id] for image in used
                      for obj in image.objects if ids[obj.class_id] < 0})
    if unknown:
        raise utils.DatasetError(f"{dataset.annotation_file.name}: classes "
                                 f"{', '.join(unknown[:5])} are not among the model's "
                                 f"({', '.join(list(class_names)[:10])})")
    return list(class_names), ids


class DetectionTask:
    task_type = TASK_TYPE
    primary_metric = PRIMARY_METRIC
    # 0..1 pixels: an architecture that wants ImageNet statistics applies them inside the model
    input_mean, input_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    default_model = detection_models.DEFAULT_MODEL

    def offline_models(self) -> dict[str, str]:
        return detection_models.offline_models()

    def load_splits(self, root: Path, cfg: utils.Config, *, image_size: int,
                    class_names: Sequence[str] | None = None,
                    splits: Sequence[str] = ("train", "val")) -> Splits:
        """`train` from the "train" split when asked for; `val` from the other split asked for
        ("val" or "test"), exactly the file's images of it, in the file's order."""
        dataset = utils.platform_annotations_if_any(
            root, TASK_TYPE, val_fraction=cfg.get("VAL_FRACTION"),
            split_seed=cfg.get("SPLIT_SEED"))
        if dataset is None:
            raise utils.dataset_format_error(root, [utils.platform_annotations_layout(TASK_TYPE)])
        chosen = {name: self._split_images(dataset, name) for name in splits}
        # The bad-image policy over every image used, as one set (MAX_BAD_IMAGES in all).
        good = set(utils.check_images([i.path for images in chosen.values() for i in images],
                                      root=root, max_bad=cfg.get("MAX_BAD_IMAGES") or 0))
        chosen = {name: [i for i in images if i.path in good] for name, images in chosen.items()}
        names, class_ids = class_mapping(dataset, class_names,
                                         [i for images in chosen.values() for i in images])
        held_out = next((name for name in splits if name != "train"), None)
        train = (DetectionDataset(chosen["train"], class_ids, image_size=image_size, train=True)
                 if "train" in chosen else None)
        val_images = chosen[held_out] if held_out else []
        val = (DetectionDataset(val_images, class_ids, image_size=image_size, train=False)
               if held_out else None)
        return Splits(train=train, val=val, class_names=names, val_images=list(val_images),
                      platform=dataset)

    @staticmethod
    def _split_images(dataset: utils.PlatformDataset, split: str) -> list[utils.AnnotatedImage]:
        images = dataset.split(split)
        if not images:
            raise utils.DatasetError(f"{dataset.annotation_file.name}: no {split} images (split "
                                     f"from {dataset.split_source}: {dataset.split_counts()})")
        return images

    def create_model(self, model_name: str, class_names: Sequence[str], *, pretrained: bool,
                     image_size: int) -> Any:
        return detection_models.create_model(model_name, class_names, pretrained=pretrained)

    def model_from_config(self, config: dict[str, Any]) -> Any:
        return detection_models.model_from_config(config)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
                "labels": [item["labels"] for item in items]}

    def validator(self, class_names: Sequence[str], *, keep_per_image: bool
                  ) -> DetectionValidator:
        return DetectionValidator(class_names, keep_per_image=keep_per_image)

    def image_records(self, validator: DetectionValidator, splits: Splits, *,
                      mask_dir: Path | None = None, limit: int | None = None
                      ) -> list[dict[str, Any]]:
        """One record per validated image (boxes at SHOWN_CONFIDENCE and above), named by its
        path under images/ and indexed by its place in the split."""
        records = []
        for result in validator.per_image:
            image = splits.val_images[result.image_id]
            records.append(utils.detection_image_record(
                result.image_id, image.path, image.file_name, result.true_boxes,
                result.predicted_boxes, splits.class_names))
        return records

    def predict(self, model: Any, images: Sequence[Path], class_names: Sequence[str], *,
                image_size: int, device: Any, out_dir: Path,
                confidence: float = SHOWN_CONFIDENCE) -> list[dict[str, Any]]:
        """Per image: its size and its boxes at `confidence` and above, best first, as pixel
        `box_xyxy` with class id, name and confidence. Writes nothing (`out_dir` is for
        masks)."""
        import torch
        from PIL import Image

        model.eval()
        records = []
        for start in range(0, len(images), PREDICT_BATCH):
            batch = list(images[start:start + PREDICT_BATCH])
            sizes = []
            for path in batch:
                with Image.open(path) as image:
                    sizes.append((image.height, image.width))
            pixels = torch.stack([load_pixels(path, image_size) for path in batch]).to(device)
            with torch.inference_mode():
                outputs = model(pixel_values=pixels)
            for path, (height, width), found in zip(
                    batch, sizes, post_process(outputs, sizes, threshold=confidence),
                    strict=True):
                records.append({"image": path.name, "width": width, "height": height,
                                "detections": [
                    {"class_id": int(c), "class_name": class_names[int(c)],
                     "confidence": round(float(s), 6),
                     "box_xyxy": [round(float(v), 2) for v in box]}
                    for c, s, box in zip(found["labels"], found["scores"], found["boxes"],
                                         strict=True)]})
        return records


TASK = DetectionTask()
offline_models = TASK.offline_models

__all__ = ["TASK", "DetectionDataset", "offline_models", "write_sample"]
