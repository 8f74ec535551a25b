"""Pose estimation's extras: the OKS the platform reports, the keypoints' flip order.

`OKS` (contract section 3) is the mean object keypoint similarity of each ground-truth object
with its matched prediction, 0 when it has none. Ultralytics computes OKS between every object
and prediction of a batch (`kpt_iou`, with the dataset's sigmas) only to count true positives;
`validator_class` keeps those similarities, matches each object to one prediction of its class
(highest OKS first, one prediction per object, as Ultralytics matches them) and averages them
over the validation (every rank's share under DDP). Objects without a labelled keypoint count
for nothing, as in COCO.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_SIDE = re.compile(r"left|right", re.IGNORECASE)


def flip_index(names: Sequence[str]) -> list[int]:
    """Ultralytics' `flip_idx`: where each keypoint goes when the image is mirrored. A name with
    `left` swaps with the same name with `right` (any case: left_eye, Right Ear, ...); every
    other keypoint stays where it is."""

    def mirrored(name: str) -> str:
        def swap(match: re.Match) -> str:
            word = "right" if match.group().lower() == "left" else "left"
            if match.group().isupper():
                return word.upper()
            return word.capitalize() if match.group()[0].isupper() else word

        return _SIDE.sub(swap, name)

    position = {name: i for i, name in enumerate(names)}
    return [position.get(mirrored(name), i) for i, name in enumerate(names)]


def matched_similarities(oks: np.ndarray, same_class: np.ndarray) -> np.ndarray:
    """Each object's OKS with the prediction matched to it (0 when none): pairs of the same class
    are taken highest OKS first, each object and each prediction at most once."""
    objects = oks.shape[0]
    matched = np.zeros(objects, dtype=np.float64)
    if objects == 0 or oks.shape[1] == 0:
        return matched
    candidates = np.argwhere(same_class & (oks > 0))
    order = np.argsort(-oks[candidates[:, 0], candidates[:, 1]], kind="stable")
    taken_objects, taken_predictions = set(), set()
    for obj, pred in candidates[order]:
        if obj in taken_objects or pred in taken_predictions:
            continue
        matched[obj] = oks[obj, pred]
        taken_objects.add(obj)
        taken_predictions.add(pred)
    return matched


def validator_class() -> type:
    """Ultralytics' PoseValidator that also reports `metrics.oks` (imported when needed)."""
    from ultralytics.models.yolo.pose import PoseValidator
    from ultralytics.utils import ops
    from ultralytics.utils.metrics import kpt_iou

    class OksPoseValidator(PoseValidator):
        def init_metrics(self, model: Any) -> None:
            super().init_metrics(model)
            self.object_similarities: list[np.ndarray] = []

        def _process_batch(self, preds: dict[str, Any], batch: dict[str, Any]) -> dict:
            tp = super()._process_batch(preds, batch)
            truth = batch["keypoints"]
            if truth.shape[0] == 0:
                return tp
            labelled = (truth[..., 2] != 0).any(-1) if truth.shape[-1] == 3 else None
            if preds["cls"].shape[0] == 0:
                similarities = np.zeros(truth.shape[0])
            else:  # the area as Ultralytics takes it for OKS (its 0.53 from xtcocotools)
                area = ops.xyxy2xywh(batch["bboxes"])[:, 2:].prod(1) * 0.53
                oks = kpt_iou(truth, preds["keypoints"], sigma=self.sigma, area=area)
                same_class = (batch["cls"].view(-1, 1) == preds["cls"].view(1, -1))
                similarities = matched_similarities(oks.cpu().numpy(), same_class.cpu().numpy())
            if labelled is not None:
                similarities = similarities[labelled.cpu().numpy()]
            self.object_similarities.append(similarities)
            return tp

        def gather_stats(self) -> None:
            """Under DDP every rank validates a shard: rank 0 averages over all of them."""
            super().gather_stats()
            from ultralytics.utils import RANK

            if RANK == -1:
                return
            import torch.distributed as dist

            shards = [None] * dist.get_world_size() if RANK == 0 else None
            dist.gather_object(self.object_similarities, shards, dst=0)
            if RANK == 0:
                self.object_similarities = [part for shard in shards for part in shard]

        def finalize_metrics(self) -> None:
            super().finalize_metrics()
            found = np.concatenate(self.object_similarities) if self.object_similarities else []
            self.metrics.oks = float(np.mean(found)) if len(found) else 0.0

    return OksPoseValidator
