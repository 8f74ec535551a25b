"""Semantic segmentation: platform annotations -> class-index masks, SegFormer / UperNet through
`AutoModelForSemanticSegmentation`, and the contract's metrics (`mIoU`, `pixel_accuracy`,
`mean_accuracy`; per class `iou`, `accuracy`, `support` in pixels; a pixel confusion matrix).

Masks (contract 2a): the polygons are rasterised by COCO's own polygon -> RLE code, because the
platform's format is COCO-based: a mask covers the polygon's area (a 10x10 square gives 100
pixels; PIL's `ImageDraw.polygon` also fills the boundary, 121). It is taken from
faster-coco-eval (`faster_coco_eval.core.mask`, pycocotools' API, maintained; pycocotools itself
warns on every decode under numpy 2 and is no longer maintained).
Pixels no polygon covers are `background`, class 0, first in `class_names`; the dataset's
categories follow in their order; where polygons overlap the later annotation wins.

Metrics: one pixel confusion matrix (rows: truth, columns: prediction) counted with
`torch.bincount` on the logits' device, as torchvision's segmentation reference does; every
metric is arithmetic on it. A class absent from both truth and prediction has no IoU (None in
JSON) and is left out of the means, as mmseg and torchmetrics' `nan` handling do.

Assumption the loop keeps: validation batches come in the val dataset's order (Splits.val_images),
so the n-th image the validator sees is `val_images[n]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import architectures
import utils
from data import MEAN, STD
from segmentation_sample import write_sample as write_sample  # the task's sample, re-exported
from task import Splits

BACKGROUND = "background"
TASK_TYPE = "semantic_segmentation"


# -- models ---------------------------------------------------------------------------------------

def _small_segformer(num_labels: int) -> Any:
    from transformers import SegformerConfig

    return SegformerConfig(num_labels=num_labels, hidden_sizes=[16, 32, 64, 128],
                           depths=[1, 1, 1, 1], decoder_hidden_size=64)


def _small_upernet(num_labels: int) -> Any:
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    # The auxiliary head reads the third stage (auxiliary_in_index=2): its width, 64.
    return UperNetConfig(backbone_config=backbone, num_labels=num_labels, hidden_size=64,
                         auxiliary_in_channels=64, auxiliary_channels=32,
                         use_pretrained_backbone=False)


# Hub name -> (architecture, a small configuration of it that trains on a CPU, no download).
# Mask2Former is left out: it takes per-image lists of binary masks and class labels instead of
# one label map, answers with query logits that need post-processing, and matches queries to
# masks (Hungarian) every step; it does not fit `model(**batch).loss` + `.logits` as these do.
OFFLINE_CONFIGS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "nvidia/mit-b0": ("SegFormer", _small_segformer),
    "openmmlab/upernet-convnext-tiny": ("UperNet", _small_upernet),
}


def _labels(class_names: Sequence[str]) -> dict[str, Any]:
    id2label = dict(enumerate(class_names))
    return {"num_labels": len(class_names), "id2label": id2label,
            "label2id": {name: i for i, name in id2label.items()}}


def create_model(model_name: str, class_names: Sequence[str], *, pretrained: bool,
                 image_size: int) -> Any:
    from transformers import AutoModelForSemanticSegmentation

    labels = _labels(class_names)
    if pretrained:
        try:
            return AutoModelForSemanticSegmentation.from_pretrained(
                model_name, ignore_mismatched_sizes=True, **labels)
        except OSError as exc:
            raise utils.ConfigError(
                f"MODEL_NAME={model_name}: no pretrained weights ({str(exc).splitlines()[0]}); "
                f"PRETRAINED=false builds {', '.join(OFFLINE_CONFIGS)} offline") from None
        except ValueError as exc:  # a Hub model with no semantic segmentation head
            raise utils.ConfigError(f"MODEL_NAME={model_name} is not a semantic segmentation "
                                    f"model ({str(exc).splitlines()[0]})") from None
    if model_name not in OFFLINE_CONFIGS:
        raise utils.ConfigError(f"MODEL_NAME={model_name} cannot be built offline "
                                f"(PRETRAINED=false knows {', '.join(OFFLINE_CONFIGS)})")
    config = OFFLINE_CONFIGS[model_name][1](len(class_names))
    config.update({"id2label": labels["id2label"], "label2id": labels["label2id"]})
    return AutoModelForSemanticSegmentation.from_config(config)


def model_from_config(config: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING, AutoModelForSemanticSegmentation

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise utils.CheckpointError(f"checkpoint config names model_type={model_type!r}, "
                                    "which transformers does not know")
    return AutoModelForSemanticSegmentation.from_config(
        CONFIG_MAPPING[model_type].from_dict(config))


# -- data -----------------------------------------------------------------------------------------

def rasterise(image: utils.AnnotatedImage, class_of: Sequence[int]) -> Any:
    """The image's class-index mask (height x width, uint8 or int32): 0 where no polygon lies,
    else `class_of[object.class_id]`, later annotations painted over earlier ones."""
    import numpy as np
    from faster_coco_eval.core import mask as coco_mask

    dtype = np.uint8 if max(class_of, default=0) < 256 else np.int32
    mask = np.zeros((image.height, image.width), dtype=dtype)
    for obj in image.objects:
        if not obj.polygons:
            continue
        rles = coco_mask.frPyObjects([list(p) for p in obj.polygons], image.height, image.width)
        covered = coco_mask.decode(coco_mask.merge(rles)).astype(bool)
        mask[covered] = class_of[obj.class_id]
    return mask


def _normalise(pixels: Any) -> Any:
    """uint8 HWC (numpy) -> float CHW normalised with ImageNet's mean and std."""
    import torch

    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (tensor - mean) / std


def load_pixels(path: Path, image_size: int) -> tuple[Any, tuple[int, int]]:
    """(the image as the model's input, square `image_size`, bilinear; its (width, height))."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        resized = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return _normalise(np.array(resized)), size


class MaskDataset:
    """(pixel_values [3, S, S], labels [S, S]) per annotated image: a torch map-style dataset."""

    def __init__(self, images: Sequence[utils.AnnotatedImage], class_of: Sequence[int],
                 image_size: int) -> None:
        self.images, self.class_of, self.image_size = list(images), list(class_of), image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import numpy as np
        import torch
        from PIL import Image

        image = self.images[index]
        pixels, _ = load_pixels(image.path, self.image_size)
        mask = Image.fromarray(rasterise(image, self.class_of))
        mask = mask.resize((self.image_size, self.image_size), Image.Resampling.NEAREST)
        return pixels, torch.from_numpy(np.asarray(mask).astype(np.int64))


def class_names_of(dataset: utils.PlatformDataset) -> list[str]:
    """`background` first, then the dataset's categories in their order (a category itself
    named `background` is that class)."""
    return [BACKGROUND, *(name for name in dataset.class_names if name != BACKGROUND)]


def load_splits(root: Path, cfg: utils.Config, *, image_size: int,
                class_names: Sequence[str] | None = None,
                splits: Sequence[str] = ("train", "val")) -> Splits:
    dataset = utils.platform_annotations_if_any(
        root, TASK_TYPE, val_fraction=getattr(cfg, "val_fraction", 0.2),
        split_seed=getattr(cfg, "split_seed", 42))
    if dataset is None:
        raise utils.dataset_format_error(root, [utils.platform_annotations_layout(TASK_TYPE)])
    names = list(class_names) if class_names is not None else class_names_of(dataset)
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in dataset.class_names if name not in index]
    if unknown:
        raise utils.DatasetError(f"{dataset.annotation_file.name}: classes "
                                 f"{', '.join(unknown[:5])} are not among the model's "
                                 f"({', '.join(names[:10])})")
    class_of = [index[name] for name in dataset.class_names]

    def split_of(name: str) -> MaskDataset:
        images = dataset.split(name)
        if not images:
            raise utils.DatasetError(f"{dataset.annotation_file.name}: no {name} images (split "
                                     f"from {dataset.split_source}: {dataset.split_counts()})")
        return MaskDataset(images, class_of, image_size)

    train = split_of("train") if "train" in splits else None
    validated = next((name for name in splits if name != "train"), None)
    val = split_of(validated) if validated else None
    return Splits(train=train, val=val, class_names=names,
                  val_images=list(val.images) if val else [], platform=dataset)


def collate(items: list[tuple[Any, Any]]) -> dict[str, Any]:
    import torch

    return {"pixel_values": torch.stack([pixels for pixels, _ in items]),
            "labels": torch.stack([labels for _, labels in items])}


# -- metrics --------------------------------------------------------------------------------------

def confusion(labels: Any, predicted: Any, num_classes: int) -> Any:
    """[num_classes, num_classes] pixel counts, rows truth, columns prediction; label pixels
    outside 0..num_classes-1 (an ignore index) are not counted."""
    import torch

    keep = (labels >= 0) & (labels < num_classes)
    codes = labels[keep] * num_classes + predicted[keep]
    return torch.bincount(codes, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def metrics_from_confusion(matrix: Any, class_names: Sequence[str]
                           ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """(metrics, per-class metrics) under the contract's names, from a pixel confusion matrix."""
    import numpy as np

    matrix = np.asarray(matrix, dtype=np.int64)
    hits = np.diag(matrix)
    support, predicted = matrix.sum(1), matrix.sum(0)
    union = support + predicted - hits
    ious = [float(h / u) if u else None for h, u in zip(hits, union, strict=True)]
    accuracies = [float(h / s) if s else None for h, s in zip(hits, support, strict=True)]
    total = int(support.sum())
    metrics = {"mIoU": _mean(ious), "pixel_accuracy": float(hits.sum() / total) if total else 0.0,
               "mean_accuracy": _mean(accuracies)}
    per_class = {name: {"iou": iou, "accuracy": accuracy, "support": int(count)}
                 for name, iou, accuracy, count in zip(class_names, ious, accuracies, support,
                                                       strict=True)}
    return metrics, per_class


@dataclasses.dataclass
class SegmentationValidator:
    """One validation pass: the pixel confusion matrix, the mean loss and, with
    `keep_per_image`, each image's predicted mask (at the label size) and its own matrix."""

    class_names: list[str]
    keep_per_image: bool = False
    mask_dir: Path | None = None
    matrix: Any = None
    loss_sum: float = 0.0
    loss_images: int = 0
    predictions: list[Any] = dataclasses.field(default_factory=list)
    image_matrices: list[Any] = dataclasses.field(default_factory=list)

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        import torch

        labels = batch["labels"]
        logits = torch.nn.functional.interpolate(
            outputs.logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        predicted = logits.argmax(1)
        labels = labels.to(predicted.device)
        n = len(self.class_names)
        batch_matrix = confusion(labels, predicted, n)
        self.matrix = batch_matrix if self.matrix is None else self.matrix + batch_matrix
        if getattr(outputs, "loss", None) is not None:
            self.loss_sum += float(outputs.loss) * len(labels)
            self.loss_images += len(labels)
        if self.keep_per_image:
            dtype = torch.uint8 if n <= 256 else torch.int32
            for truth, guess in zip(labels, predicted, strict=True):
                self.predictions.append(guess.to(dtype).cpu())
                self.image_matrices.append(confusion(truth, guess, n).cpu())

    def result(self) -> utils.ValidationResult:
        n = len(self.class_names)
        matrix = self.matrix.cpu().tolist() if self.matrix is not None else [[0] * n] * n
        metrics, per_class = metrics_from_confusion(matrix, self.class_names)
        return utils.ValidationResult(
            task_type=TASK_TYPE, metrics=metrics, primary_metric_name="mIoU",
            primary_metric_value=metrics["mIoU"],
            overall_loss=self.loss_sum / self.loss_images if self.loss_images else None,
            per_class_metrics=per_class, confusion_matrix=matrix,
            class_names=list(self.class_names))


def validator(class_names: Sequence[str], *, keep_per_image: bool,
              mask_dir: Path | None = None) -> SegmentationValidator:
    return SegmentationValidator(list(class_names), keep_per_image, mask_dir)


# -- mask files: per-image records and predictions -----------------------------------------------

def write_mask(path: Path, mask: Any, num_classes: int) -> Path:
    """A class-index PNG (0 = background; 8-bit, 16-bit past 256 classes), written atomically."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.asarray(mask).astype(np.uint8 if num_classes <= 256 else np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _resized(mask: Any, width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(mask)).resize((width, height),
                                                               Image.Resampling.NEAREST))


def image_records(validator: SegmentationValidator, splits: Splits, *,
                  mask_dir: Path | None = None, limit: int | None = None
                  ) -> list[dict[str, Any]]:
    """The last validation's per-image records (contract section 3): `true_mask_file` /
    `predicted_mask_file` (class-index PNGs at the image's own size, under `mask_dir`) for
    the job to upload as `true_mask_path` / `predicted_mask_path`; the image's IoU (mean over
    the classes in its truth or prediction) and pixel accuracy in `extra_data`. With `limit`,
    only the images `utils.select_image_results` would send are returned, and only their
    masks written."""
    mask_dir = mask_dir or validator.mask_dir
    records = []
    for index, (image, matrix) in enumerate(zip(splits.val_images, validator.image_matrices,
                                                strict=False)):
        metrics, _ = metrics_from_confusion(matrix, validator.class_names)
        records.append({"image_file": image.path, "image_name": image.file_name,
                        "image_index": index, "true_mask_path": None,
                        "predicted_mask_path": None,
                        "extra_data": {"iou": round(metrics["mIoU"], 4),
                                       "pixel_accuracy": round(metrics["pixel_accuracy"], 4)}})
    if limit is not None:
        records = list(utils.select_image_results(records, limit))
    if mask_dir is None:
        return records
    classes = len(validator.class_names)
    for record in records:
        image = splits.val_images[record["image_index"]]
        name = Path(image.file_name).with_suffix(".png")
        record["true_mask_file"] = write_mask(mask_dir / "true" / name,
                                              rasterise(image, splits.val.class_of), classes)
        predicted = _resized(validator.predictions[record["image_index"]].numpy(), image.width,
                             image.height)
        record["predicted_mask_file"] = write_mask(mask_dir / "predicted" / name, predicted,
                                                   classes)
    return records


def predict(model: Any, images: Sequence[Path], class_names: Sequence[str], *, image_size: int,
            device: Any, out_dir: Path, confidence: float = 0.0, batch_size: int = 8
            ) -> list[dict[str, Any]]:
    """Per image: a class-index PNG at the image's own size in `out_dir`, and a record with
    its name (`mask`, relative to `out_dir`), size and pixels per class."""
    import torch

    model.eval()
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            paths = images[start:start + batch_size]
            loaded = [load_pixels(path, image_size) for path in paths]
            logits = model(pixel_values=torch.stack([p for p, _ in loaded]).to(device)).logits
            for offset, (path, (_, (width, height)), one) in enumerate(
                    zip(paths, loaded, logits, strict=True)):
                upsampled = torch.nn.functional.interpolate(
                    one[None].float(), size=(height, width), mode="bilinear",
                    align_corners=False)
                mask = upsampled[0].argmax(0)
                counts = torch.bincount(mask.flatten(), minlength=len(class_names)).tolist()
                name = f"{path.stem}.png"
                if name in used:  # two inputs with one stem: keep both
                    name = f"{path.stem}_{start + offset}.png"
                used.add(name)
                write_mask(out_dir / name, mask.cpu().numpy(), len(class_names))
                records.append({"image": path.name, "mask": name, "width": width,
                                "height": height,
                                "class_pixels": dict(zip(class_names, counts, strict=True))})
    return records


# -- the task -------------------------------------------------------------------------------------

class SemanticSegmentation:
    task_type = TASK_TYPE
    primary_metric = "mIoU"
    input_mean, input_std = MEAN, STD  # what load_pixels applies
    default_model = architectures.default_model(TASK_TYPE)

    def offline_models(self) -> dict[str, str]:
        return dict(architectures.OFFLINE_MODELS[TASK_TYPE])  # capabilities' import-light table

    load_splits = staticmethod(load_splits)
    create_model = staticmethod(create_model)
    model_from_config = staticmethod(model_from_config)
    collate = staticmethod(collate)
    validator = staticmethod(validator)
    image_records = staticmethod(image_records)
    predict = staticmethod(predict)


TASK = SemanticSegmentation()
