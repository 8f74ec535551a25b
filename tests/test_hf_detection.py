"""The Hugging Face trainer's object-detection task (trainers/huggingface/detection.py), in process:
its sample in the platform's own annotation format, the splits it reads from it, each offline
architecture trained a few steps with a plain loop, the validator's contract names and COCO
metrics, the per-image records, predict, and a checkpoint's rebuild from its configuration.

No network: the models are built from their configuration classes (HF_HUB_OFFLINE=1, and every
socket connection fails while they are built and trained).
"""

from __future__ import annotations

import importlib
import json
import math
import socket
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import import_by_path
from tests.support.servers import REPO

TRAINER = REPO / "trainers" / "huggingface"
OWN_MODULES = ("task", "architectures", "data", "detection", "detection_models",
               "detection_metrics", "detection_sample")
IMAGE_SIZE = 96  # the model's square input; the sample's images are 96 x 72
DATASET = "shapes"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf() -> Iterator[SimpleNamespace]:
    """The trainer's own modules, imported with its utils.py and taken away afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TRAINER))
        mp.setenv("HF_HUB_OFFLINE", "1")
        utils = import_by_path(TRAINER / "utils.py")
        mp.setitem(sys.modules, "utils", utils)
        for name in OWN_MODULES:
            mp.delitem(sys.modules, name, raising=False)
        detection = importlib.import_module("detection")
        yield SimpleNamespace(utils=utils, detection=detection, task=detection.TASK,
                              metrics=importlib.import_module("detection_metrics"),
                              models=importlib.import_module("detection_models"))
        for name in OWN_MODULES:
            sys.modules.pop(name, None)
        sys.modules.pop(utils.__name__, None)


@pytest.fixture(scope="module")
def sample(hf, tmp_path_factory) -> SimpleNamespace:
    """The sample written into a bucket folder, extracted as a job stages it, and its splits."""
    bucket = tmp_path_factory.mktemp("bucket")
    archive = hf.detection.write_sample(bucket, DATASET, train=16, val=8, image_size=IMAGE_SIZE,
                                        seed=0)
    hf.utils.extract_archive(archive, bucket / "staged", label=DATASET)
    root = hf.utils.dataset_root(bucket / "staged")
    cfg = hf.utils.parse_settings(hf.utils.TRAIN_SETTINGS, [], {"DATASET_ID": DATASET})
    splits = hf.task.load_splits(root, cfg, image_size=IMAGE_SIZE)
    data = json.loads((root / "annotations_detection.json").read_text(encoding="utf-8"))
    return SimpleNamespace(archive=archive, root=root, splits=splits, json=data, cfg=cfg)


@pytest.fixture
def no_network(monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("the test's network is unplugged")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def file_split(data: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [image for image in data["images"]
            if data["split_config"]["splits"][str(image["id"])] == split]


def file_boxes(data: dict[str, Any], image_id: int) -> list[tuple[str, list[float]]]:
    """(class name, [x1, y1, x2, y2]) of the image's objects, as the file has them."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    return sorted((names[a["category_id"]], [a["bbox"][0], a["bbox"][1],
                                             a["bbox"][0] + a["bbox"][2],
                                             a["bbox"][1] + a["bbox"][3]])
                  for a in data["annotations"]
                  if a["image_id"] == image_id and names[a["category_id"]] != "__background__")


def loader(hf, dataset, batch_size: int = 8) -> Any:
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       collate_fn=hf.task.collate)


def test_the_sample_is_a_deterministic_platform_dataset(hf, sample, tmp_path) -> None:
    again = hf.detection.write_sample(tmp_path, DATASET, train=16, val=8,
                                      image_size=IMAGE_SIZE, seed=0)
    assert again.read_bytes() == sample.archive.read_bytes()
    assert sample.archive == sample.archive.parent.parent / "datasets" / f"{DATASET}.zip"
    with zipfile.ZipFile(sample.archive) as zf:
        names = zf.namelist()
    assert f"{DATASET}/annotations_detection.json" in names
    assert sum(n.startswith(f"{DATASET}/images/") for n in names) == 24
    data = sample.json
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle",
                                                       "__background__"]
    assert len(file_split(data, "train")) == 16 and len(file_split(data, "val")) == 8
    assert all((image["width"], image["height"]) == (96, 72) for image in data["images"])
    negatives = [i for i in data["images"] if not file_boxes(data, i["id"])]
    assert len(negatives) == 3  # every eighth image: 2 of 16 train, 1 of 8 val


def test_splits_are_the_files_with_its_classes_and_boxes(hf, sample) -> None:
    splits, data = sample.splits, sample.json
    assert splits.class_names == ["circle", "square", "triangle"]
    assert [i.file_name for i in splits.val_images] == [i["file_name"]
                                                        for i in file_split(data, "val")]
    assert [i.file_name for i in splits.train.images] == [i["file_name"]
                                                          for i in file_split(data, "train")]
    assert len(splits.val) == 8 and splits.val.train is False
    item = splits.val[0]
    assert tuple(item["pixel_values"].shape) == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    target = item["labels"]
    assert target["orig_size"].tolist() == [72, 96] and int(target["image_id"]) == 0
    # normalised (cx, cy, w, h) back in the file's pixels: the file's boxes
    back = hf.metrics.target_boxes(target).tolist()
    expected = file_boxes(data, file_split(data, "val")[0]["id"])
    got = sorted((splits.class_names[c], box)
                 for c, box in zip(target["class_labels"].tolist(), back, strict=True))
    assert [name for name, _ in got] == [name for name, _ in expected]
    for (_, box), (_, want) in zip(got, expected, strict=True):
        assert box == pytest.approx(want, abs=0.01)
    negative = next(i for i, image in enumerate(splits.val_images) if not image.objects)
    empty = splits.val[negative]["labels"]
    assert tuple(empty["boxes"].shape) == (0, 4) and empty["class_labels"].numel() == 0


def test_a_checkpoints_class_order_is_kept_and_a_foreign_class_refused(hf, sample) -> None:
    order = ["triangle", "circle", "square"]
    splits = hf.task.load_splits(sample.root, sample.cfg, image_size=IMAGE_SIZE,
                                 class_names=order, splits=("val",))
    assert splits.train is None and splits.class_names == order
    first = splits.val_images[0]
    assert splits.val.target(0)["class_labels"].tolist() == [
        order.index(sample.splits.class_names[o.class_id]) for o in first.objects]
    with pytest.raises(hf.utils.DatasetError, match="not among the model's"):
        hf.task.load_splits(sample.root, sample.cfg, image_size=IMAGE_SIZE,
                            class_names=["circle", "square"])


def test_a_bad_image_fails_the_dataset_or_is_skipped_within_max_bad_images(hf, sample,
                                                                           tmp_path) -> None:
    import shutil

    root = Path(shutil.copytree(sample.root, tmp_path / "copy"))
    broken = root / "images" / sample.splits.val_images[2].file_name
    broken.write_bytes(broken.read_bytes()[:200])  # cut off: no JPEG end marker
    with pytest.raises(hf.utils.DatasetError, match=r"1 bad image.*val_00002\.jpg"):
        hf.task.load_splits(root, sample.cfg, image_size=IMAGE_SIZE)
    lenient = hf.utils.parse_settings(hf.utils.TRAIN_SETTINGS, [], {
        "DATASET_ID": DATASET, "MAX_BAD_IMAGES": "1"})
    splits = hf.task.load_splits(root, lenient, image_size=IMAGE_SIZE)
    assert [i.file_name for i in splits.val_images] == [
        i.file_name for i in sample.splits.val_images if i.file_name != "val/val_00002.jpg"]


@pytest.mark.parametrize("model_name", ["PekingU/rtdetr_v2_r18vd",
                                        "microsoft/conditional-detr-resnet-50",
                                        "ustc-community/dfine-nano-coco"])
def test_an_offline_model_trains_validates_and_predicts(hf, sample, model_name, no_network,
                                                        tmp_path) -> None:
    import torch

    assert model_name in hf.task.offline_models()
    splits = sample.splits
    torch.manual_seed(0)
    model = hf.task.create_model(model_name, splits.class_names, pretrained=False,
                                 image_size=IMAGE_SIZE)
    assert type(model).__name__ == hf.models.OFFLINE_MODELS[model_name].architecture
    assert model.config.id2label == dict(enumerate(splits.class_names))
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 3e6  # trains on a CPU

    batch = next(iter(loader(hf, splits.train)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):  # one batch, over and over: the loss must fall
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses

    model.eval()
    validator = hf.task.validator(splits.class_names, keep_per_image=True)
    with torch.no_grad():
        for val_batch in loader(hf, splits.val, batch_size=3):
            validator.update(val_batch, model(**val_batch))
    result = validator.result()
    assert result.task_type == "object_detection"
    assert result.primary_metric_name == "mAP@0.5:0.95" == hf.task.primary_metric
    assert {"mAP@0.5", "mAP@0.5:0.95", "precision", "recall"} <= set(result.metrics)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.primary_metric_value == result.metrics["mAP@0.5:0.95"]
    assert result.class_names == splits.class_names
    assert list(result.per_class_metrics) == splits.class_names
    for values in result.per_class_metrics.values():
        assert set(values) == {"ap_50", "ap_50_95", "precision", "recall", "support"}
    boxes_in_val = sum(len(image.objects) for image in splits.val_images)
    assert sum(v["support"] for v in result.per_class_metrics.values()) == boxes_in_val
    assert result.overall_loss is not None and math.isfinite(result.overall_loss)

    records = hf.task.image_records(validator, splits)
    assert [r["image_name"] for r in records] == [i["file_name"]
                                                  for i in file_split(sample.json, "val")]
    assert [r["image_index"] for r in records] == list(range(len(splits.val_images)))
    for record, image in zip(records, splits.val_images, strict=True):
        assert Path(record["image_file"]) == image.path and record["image_file"].is_file()
        assert set(record) == {"image_file", "image_name", "image_index", "true_boxes",
                               "predicted_boxes", "iou"}
        assert 0.0 <= record["iou"] <= 1.0
        assert len(record["true_boxes"]) == len(image.objects)
        for box in record["true_boxes"] + record["predicted_boxes"]:
            assert box["class_name"] == splits.class_names[box["class_id"]]
            x1, y1, x2, y2 = box["bbox"]
            assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
        assert all(b["confidence"] >= hf.metrics.SHOWN_CONFIDENCE
                   for b in record["predicted_boxes"])

    paths = [image.path for image in splits.val_images[:3]]
    predictions = hf.task.predict(model, paths, splits.class_names, image_size=IMAGE_SIZE,
                                  device=torch.device("cpu"), out_dir=tmp_path, confidence=0.0)
    assert [p["image"] for p in predictions] == [p.name for p in paths]
    assert not any(tmp_path.iterdir())  # boxes need no files
    for prediction in predictions:
        assert (prediction["width"], prediction["height"]) == (96, 72)
        assert 0 < len(prediction["detections"]) <= hf.metrics.MAX_DETECTIONS
        scores = [d["confidence"] for d in prediction["detections"]]
        assert scores == sorted(scores, reverse=True)
        for detection in prediction["detections"]:
            assert detection["class_name"] == splits.class_names[detection["class_id"]]
            x1, y1, x2, y2 = detection["box_xyxy"]
            assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 72

    rebuilt = hf.task.model_from_config(model.config.to_dict())
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    pixels = batch["pixel_values"][:2]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixel_values=pixels).pred_boxes,
                                   model(pixel_values=pixels).pred_boxes)


def detector_output(hf, targets: list[dict[str, Any]], num_classes: int, *,
                    shift_class: int = 0) -> Any:
    """An RT-DETR v2 output that finds every target box (query j: object j), confident in the
    class `shift_class` places after the true one; the other queries unsure, somewhere else."""
    import torch
    from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import (
        RTDetrV2ObjectDetectionOutput,
    )

    queries = 10
    logits = torch.full((len(targets), queries, num_classes), -6.0)
    boxes = torch.tensor([0.5, 0.5, 0.05, 0.05]).repeat(len(targets), queries, 1)
    for i, target in enumerate(targets):
        for j, (label, box) in enumerate(zip(target["class_labels"], target["boxes"],
                                             strict=True)):
            logits[i, j, (int(label) + shift_class) % num_classes] = 6.0
            boxes[i, j] = box
    return RTDetrV2ObjectDetectionOutput(logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize("shift_class, expected", [(0, 1.0), (1, 0.0)])
def test_metrics_score_perfect_and_wrong_detections(hf, sample, shift_class, expected) -> None:
    """COCO's numbers on outputs whose answer is known: every box found in its class scores 1
    (boxes in pixels after the round trip through the square input), the wrong class 0."""
    splits = sample.splits
    validator = hf.task.validator(splits.class_names, keep_per_image=True)
    for batch in loader(hf, splits.val, batch_size=4):
        validator.update(batch, detector_output(hf, batch["labels"], len(splits.class_names),
                                                shift_class=shift_class))
    result = validator.result()
    for name in ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall"):
        assert result.metrics[name] == pytest.approx(expected, abs=1e-6), name
    for name, values in result.per_class_metrics.items():
        if values["support"]:
            assert values["ap_50"] == pytest.approx(expected, abs=1e-6), name
            assert values["ap_50_95"] == pytest.approx(expected, abs=1e-6), name
    if expected == 1.0:
        records = hf.task.image_records(validator, splits)
        # 1 up to the records' rounding of boxes to 0.1 px
        assert [record["iou"] for record in records] == pytest.approx([1.0] * len(records),
                                                                      abs=0.005)
        assert result.pr_curves["iou_threshold"] == 0.5


def test_pretrained_with_no_network_is_an_error_the_loop_decides_on(hf, no_network) -> None:
    # The task asks the Hub and nothing else: falling back to the offline architecture is the
    # loop's one rule for every task (training_run.check_model; tests/test_trainer_huggingface).
    with pytest.raises(OSError):
        hf.task.create_model("PekingU/rtdetr_v2_r18vd", ["a", "b"], pretrained=True,
                             image_size=64)


def test_an_unknown_model_offline_fails_naming_the_known_ones(hf) -> None:
    with pytest.raises(hf.utils.ConfigError, match="PekingU/rtdetr_v2_r18vd"):
        hf.task.create_model("someone/unknown-detector", ["a"], pretrained=False, image_size=64)
