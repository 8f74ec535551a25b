"""The Hugging Face trainer's semantic segmentation task (trainers/huggingface/segmentation.py):
platform annotations (contract 2a) rasterised into class-index masks, the offline SegFormer and
UperNet built from their configurations and trained a few steps, the contract's metric names
(section 3) from a hand-checkable pixel confusion matrix, and the mask files of per-image
records and predictions. Tiny data, CPU, no network.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import import_by_path
from tests.support.servers import REPO

TRAINER = REPO / "trainers" / "huggingface"
IMAGE_SIZE = 64
# Contract section 3, semantic segmentation: the names the UI reads.
METRICS = {"mIoU", "pixel_accuracy", "mean_accuracy"}
PER_CLASS = {"iou", "accuracy", "support"}


@pytest.fixture(scope="module")
def seg():
    """segmentation.py as train.py imports it: beside the trainer's own utils.py and task.py."""
    own = ("task", "architectures", "data", "segmentation_sample")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TRAINER))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setitem(sys.modules, "utils", import_by_path(TRAINER / "utils.py"))
        for name in own:  # the trainer's modules, not another trainer's of the same name
            patch.delitem(sys.modules, name, raising=False)
        yield import_by_path(TRAINER / "segmentation.py")
        for name in own:  # nor left behind for the next test module
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def sample(seg, tmp_path_factory):
    """The task's sample (segmentation_sample.py), written and extracted: (root, splits)."""
    root = tmp_path_factory.mktemp("seg-sample")
    archive = seg.write_sample(root, "shapes", train=16, val=5, image_size=IMAGE_SIZE, seed=3)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root / "staged")
    splits = seg.load_splits(root / "staged", SimpleNamespace(), image_size=IMAGE_SIZE)
    return root / "staged", splits


def write_dataset(root: Path, annotations: list[dict], categories: list[dict],
                  size: tuple[int, int] = (16, 16)) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    images = []
    for image_id, split in ((1, "train"), (2, "val")):
        Image.new("RGB", size, (0, 0, 0)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size[0],
                       "height": size[1], "split": split})
    (root / "annotations_segmentation.json").write_text(json.dumps(
        {"categories": categories, "images": images, "annotations": annotations}))
    return root


# -- data -----------------------------------------------------------------------------------------


def test_sample_is_platform_annotations_split_by_split_config(seg, sample, tmp_path) -> None:
    root, splits = sample
    assert (root / "annotations_segmentation.json").is_file()
    assert splits.platform.split_source == "split_config"
    assert splits.class_names == ["background", "square", "circle"]
    assert (len(splits.train), len(splits.val)) == (16, 5)
    assert [image.split for image in splits.val_images] == ["val"] * 5
    negatives = [image for image in splits.platform.images if not image.objects]
    assert negatives, "the sample has __background__ images"
    masks = [splits.train[i][1] for i in range(len(splits.train))]
    assert {0, 1, 2} <= set(np.unique(np.stack(masks)).tolist())
    again = seg.write_sample(tmp_path, "shapes", train=16, val=5, image_size=IMAGE_SIZE, seed=3)
    assert again.read_bytes() == (root.parent / "datasets" / "shapes.zip").read_bytes()


def test_polygons_become_class_index_masks(seg, tmp_path) -> None:
    # Category ids out of order: class ids follow the categories' order, background first.
    categories = [{"id": 7, "name": "a"}, {"id": 3, "name": "b"},
                  {"id": 9, "name": "__background__"}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 8, 6],
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        # drawn later, so it wins where it overlaps the first
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [8, 4, 4, 4],
         "segmentation": [[8, 4, 12, 4, 12, 8, 8, 8]]},
        {"id": 3, "image_id": 2, "category_id": 9},  # a negative: all background
    ]
    root = write_dataset(tmp_path / "d", annotations, categories)
    splits = seg.load_splits(root, SimpleNamespace(), image_size=16)
    assert splits.class_names == ["background", "a", "b"]
    pixels, labels = splits.train[0]
    expected = np.zeros((16, 16), dtype=np.int64)
    expected[2:8, 2:10] = 2  # rows y 2..7, columns x 2..9: the polygon's area, 8 x 6
    expected[4:8, 8:12] = 1
    assert labels.dtype.is_floating_point is False
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert pixels.shape == (3, 16, 16)
    assert float(pixels[0, 0, 0]) == pytest.approx((0 - 0.485) / 0.229)  # ImageNet-normalised
    _, negative = splits.val[0]
    assert int(negative.sum()) == 0

    # A checkpoint's class order wins; a class it lacks fails naming the class.
    ordered = seg.load_splits(root, SimpleNamespace(), image_size=16,
                              class_names=["background", "b", "a", "extra"])
    assert set(np.unique(ordered.train[0][1].numpy()).tolist()) == {0, 1, 2}
    assert int((ordered.train[0][1] == 1).sum()) == int((labels == 2).sum())
    with pytest.raises(sys.modules["utils"].DatasetError, match="classes b are not among"):
        seg.load_splits(root, SimpleNamespace(), image_size=16, class_names=["background", "a"])


def test_resize_is_bilinear_for_images_and_nearest_for_masks(seg, tmp_path) -> None:
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 12],
                    "segmentation": [[0, 0, 20, 0, 20, 12, 0, 12]]}]
    root = write_dataset(tmp_path / "d", annotations, [{"id": 1, "name": "a"}], size=(40, 24))
    splits = seg.load_splits(root, SimpleNamespace(), image_size=8)
    _, labels = splits.train[0]
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[:4, :4] = 1  # the top-left quarter of a 40 x 24 image, squeezed to 8 x 8
    np.testing.assert_array_equal(labels.numpy(), expected)


def test_a_dataset_without_platform_annotations_fails_naming_the_format(seg, tmp_path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(sys.modules["utils"].DatasetError, match="platform"):
        seg.load_splits(tmp_path, SimpleNamespace(), image_size=16)


# -- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["nvidia/mit-b0", "openmmlab/upernet-convnext-tiny"])
def test_offline_model_trains_and_rebuilds_from_its_config(seg, sample, model_name) -> None:
    import torch

    _, splits = sample
    assert model_name in seg.TASK.offline_models()
    torch.manual_seed(0)
    model = seg.TASK.create_model(model_name, splits.class_names, pretrained=False,
                                  image_size=IMAGE_SIZE)
    assert model.config.id2label == dict(enumerate(splits.class_names))
    batch = seg.TASK.collate([splits.train[i] for i in range(8)])
    assert batch["pixel_values"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].shape == (8, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].dtype == torch.long
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses

    model.eval()
    rebuilt = seg.TASK.model_from_config(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, model(**batch).logits)


def test_an_unknown_model_offline_fails_naming_the_known_ones(seg, monkeypatch) -> None:
    with pytest.raises(sys.modules["utils"].ConfigError, match="nvidia/mit-b0"):
        seg.TASK.create_model("someone/unknown", ["background", "a"], pretrained=False,
                              image_size=IMAGE_SIZE)
    # Weights the Hub cannot give (offline here): one line, and what builds with no download.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(sys.modules["utils"].ConfigError,
                       match="no pretrained weights.*PRETRAINED=false builds nvidia/mit-b0"):
        seg.TASK.create_model("someone/unknown", ["background", "a"], pretrained=True,
                              image_size=IMAGE_SIZE)


# -- metrics --------------------------------------------------------------------------------------


def logits_for(predicted: np.ndarray, num_classes: int):
    """Logits whose argmax is `predicted` ([B, H, W])."""
    import torch

    return torch.nn.functional.one_hot(torch.as_tensor(predicted), num_classes).permute(
        0, 3, 1, 2).float()


def test_metrics_from_known_pixels(seg) -> None:
    import torch

    names = ["background", "a", "b", "never"]
    truth = np.array([[[0, 0, 1, 1], [0, 0, 2, 2]]])
    guess = np.array([[[0, 1, 1, 1], [0, 0, 0, 2]]])
    validator = seg.TASK.validator(names, keep_per_image=False)
    validator.update({"labels": torch.as_tensor(truth)},
                     SimpleNamespace(logits=logits_for(guess, 4), loss=torch.tensor(1.0)))
    # A second batch of two images, at half resolution (upsampled to the label size): all right.
    half = logits_for(np.zeros((2, 1, 2), dtype=np.int64), 4)
    validator.update({"labels": torch.zeros((2, 2, 4), dtype=torch.long)},
                     SimpleNamespace(logits=half, loss=torch.tensor(4.0)))
    result = validator.result()

    # truth 0: 4 + 16 pixels, 19 right, 1 called a; truth 1: 2, both right; truth 2: 2, one
    # right, one called background.
    assert result.confusion_matrix == [[19, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = {"background": 19 / (20 + 20 - 19), "a": 2 / (2 + 3 - 2), "b": 1 / (2 + 1 - 1)}
    assert set(result.metrics) == METRICS
    assert result.primary_metric_name == "mIoU"
    assert result.primary_metric_value == pytest.approx(sum(iou.values()) / 3)
    assert result.metrics["pixel_accuracy"] == pytest.approx(22 / 24)
    assert result.metrics["mean_accuracy"] == pytest.approx((19 / 20 + 1 + 1 / 2) / 3)
    assert result.class_names == names
    for name, value in iou.items():
        assert set(result.per_class_metrics[name]) == PER_CLASS
        assert result.per_class_metrics[name]["iou"] == pytest.approx(value)
    assert result.per_class_metrics["b"]["support"] == 2
    # Absent from truth and prediction: no IoU, left out of the means.
    assert result.per_class_metrics["never"] == {"iou": None, "accuracy": None, "support": 0}
    assert result.overall_loss == pytest.approx((1.0 * 1 + 4.0 * 2) / 3)
    json.dumps(result.__dict__, allow_nan=False)  # the body the backend reads: no NaN


# -- mask files -----------------------------------------------------------------------------------


def test_image_records_and_predictions_write_class_index_masks(seg, sample, tmp_path) -> None:
    import torch
    from PIL import Image

    root, splits = sample
    torch.manual_seed(0)
    model = seg.TASK.create_model("nvidia/mit-b0", splits.class_names, pretrained=False,
                                  image_size=IMAGE_SIZE).eval()
    validator = seg.TASK.validator(splits.class_names, keep_per_image=True)
    with torch.no_grad():
        for start in range(0, len(splits.val), 4):
            batch = seg.TASK.collate([splits.val[i] for i in range(start, min(start + 4,
                                                                              len(splits.val)))])
            validator.update(batch, model(**batch))
    records = seg.TASK.image_records(validator, splits, mask_dir=tmp_path / "masks")
    assert [r["image_index"] for r in records] == list(range(len(splits.val)))
    for record, image in zip(records, splits.val_images, strict=True):
        assert record["image_name"] == image.file_name and record["image_file"] == image.path
        assert {"true_mask_path", "predicted_mask_path"} <= set(record)
        assert 0.0 <= record["extra_data"]["iou"] <= 1.0
        true = np.asarray(Image.open(record["true_mask_file"]))
        predicted = np.asarray(Image.open(record["predicted_mask_file"]))
        assert true.shape == predicted.shape == (image.height, image.width)
        np.testing.assert_array_equal(true, seg.rasterise(image, splits.val.class_of))
        assert predicted.max() < len(splits.class_names)
    assert len(seg.TASK.image_records(validator, splits, mask_dir=tmp_path / "some",
                                      limit=2)) == 2
    assert len(list((tmp_path / "some" / "true").iterdir())) == 2  # only the chosen ones

    odd = tmp_path / "inputs" / "odd.jpg"  # not square: the mask keeps the image's own size
    odd.parent.mkdir()
    Image.new("RGB", (40, 24), (250, 40, 40)).save(odd)
    images = [odd, splits.val_images[0].path]
    predictions = seg.TASK.predict(model, images, splits.class_names, image_size=IMAGE_SIZE,
                                   device="cpu", out_dir=tmp_path / "predicted")
    assert [p["image"] for p in predictions] == ["odd.jpg", splits.val_images[0].path.name]
    for prediction, (width, height) in zip(predictions, [(40, 24), (IMAGE_SIZE, IMAGE_SIZE)],
                                           strict=True):
        mask = np.asarray(Image.open(tmp_path / "predicted" / prediction["mask"]))
        assert mask.shape == (height, width)
        assert sum(prediction["class_pixels"].values()) == width * height
        assert prediction["class_pixels"] == {
            name: int((mask == i).sum()) for i, name in enumerate(splits.class_names)}
