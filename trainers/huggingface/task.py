"""What one task brings to the trainer's single training loop.

train.py, evaluate.py and predict.py never branch on the task: they ask `task_for(TASK_TYPE)`
for a `Task` and call it. A task owns its data (platform annotations read by `utils`, turned
into tensors), its model head (an `AutoModelFor...` built by Hub name, or offline from a small
configuration of the same architecture), its metrics under the contract's names (section 3),
the per-image records the UI shows and the predictions `predict.py` writes.

The loop's side of the bargain: every batch is the dict `collate` returns, passed as
`model(**batch)`; the model's output carries `.loss` (transformers computes it when the batch
holds `labels`), and `Validator.update` sees the same batch with that output.

What the loop (engine.py) and scripts further rely on:
- A batch holds `pixel_values` (its length counts the images). Under torchrun, `update` sees every
  process's share of a batch gathered into one, in the split's order, on the CPU: the batch less
  `pixel_values`/`pixel_mask` (tensors of one row per image stacked, per-image lists kept as
  lists) and the output's per-image fields (no loss, hidden states or auxiliary outputs).
- `Validator.result().overall_loss` may be None: the loop fills in the mean model loss.
- `load_splits(..., splits=(name,))` with one name (evaluate.py's SPLIT: val or test) puts that
  split in `Splits.val` and leaves `train` None.
- Optional: `batch_accuracy(batch, outputs) -> (correct, images)`, `correct` a tensor on the
  device, gives the training accuracy (classification); a task without it reports none.
- Offline models and the default MODEL_NAME come from `architectures.OFFLINE_MODELS[task_type]`
  (import-light: capabilities.py reads it).
- `input_mean` / `input_std`: the normalisation the task's data applies to 0..1 pixels (identity
  where the model normalises inside, as detection's do); checkpoints and export metadata say it.
- Prediction records may hold a ranked `top_k` list, which predict.py cuts to TOP_K.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import utils

# TASK_TYPE -> the module implementing it (imported on first use: each pulls its own classes).
TASK_MODULES = {
    "image_classification": "classification",
    "object_detection": "detection",
    "semantic_segmentation": "segmentation",
}


@dataclasses.dataclass
class Splits:
    """The datasets one run uses, and what the UI needs to name their images."""

    train: Any  # a torch Dataset whose items `collate` understands; None when only evaluating
    val: Any
    class_names: list[str]
    val_images: list[utils.AnnotatedImage | tuple[Path, int]]  # in val's order, for per-image
    platform: utils.PlatformDataset | None = None  # recorded in the run when the split is its


class Validator(Protocol):
    """Accumulates one validation pass; `result` is the POST /validation-results body."""

    def update(self, batch: dict[str, Any], outputs: Any) -> None: ...

    def result(self) -> utils.ValidationResult: ...


class Task(Protocol):
    task_type: str
    primary_metric: str
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    default_model: str  # MODEL_NAME when none is given

    def offline_models(self) -> dict[str, str]:
        """Hub names this task builds with no network -> the architecture (capabilities)."""

    def load_splits(self, root: Path, cfg: utils.Config, *, image_size: int,
                    class_names: Sequence[str] | None = None,
                    splits: Sequence[str] = ("train", "val")) -> Splits:
        """The staged dataset's splits in either layout this task reads; `class_names` (a
        checkpoint's) fixes the class order when given."""

    def create_model(self, model_name: str, class_names: Sequence[str], *, pretrained: bool,
                     image_size: int) -> Any:
        """A transformers model with a head for `class_names`: Hub weights when `pretrained`,
        else the architecture from its configuration (small defaults offline)."""

    def model_from_config(self, config: dict[str, Any]) -> Any:
        """The architecture a checkpoint names (its `config.to_dict()`), random weights, no
        download: the checkpoint's state dict is loaded into it."""

    def collate(self, items: list[Any]) -> dict[str, Any]:
        """A batch as the model's keyword arguments, `labels` included."""

    def validator(self, class_names: Sequence[str], *, keep_per_image: bool) -> Validator: ...

    def image_records(self, validator: Validator, splits: Splits, *,
                      mask_dir: Path | None = None, limit: int | None = None
                      ) -> list[dict[str, Any]]:
        """The last validation's per-image records (POST /validation-image-results). A task
        with masks writes them under `mask_dir` (the job uploads them); `limit`
        (VAL_IMAGE_RESULTS_MAX) lets it skip the work for images that will not be sent."""

    def predict(self, model: Any, images: Sequence[Path], class_names: Sequence[str], *,
                image_size: int, device: Any, out_dir: Path,
                confidence: float = 0.25) -> list[dict[str, Any]]:
        """One record per image for predictions.json (mask files written under `out_dir`;
        objects below `confidence`, CONF_THRESHOLD, left out where a task has objects)."""


def task_for(task_type: str) -> Task:
    if task_type not in TASK_MODULES:
        raise utils.ConfigError(f"TASK_TYPE={task_type} is not one this trainer trains "
                                f"({', '.join(TASK_MODULES)})")
    return importlib.import_module(TASK_MODULES[task_type]).TASK
