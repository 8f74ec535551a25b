"""Which YOLO to build, from what weights, on which device; what a checkpoint holds.

Ultralytics checkpoints describe themselves: the model (with its class names and task), the
training arguments (image size, epochs, ...), the epoch and, mid-run, the optimizer state. That
last part decides what CHECKPOINT_PATH means to train.py: a checkpoint with an optimizer and an
epoch is an interrupted run and is resumed; a finished (stripped) model is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import utils

log = logging.getLogger(f"trainer.{__name__}")

# The platform's task names and Ultralytics' own, for the tasks this trainer trains.
TASKS = {
    "object_detection": "detect",
    "instance_segmentation": "segment",
    "image_classification": "classify",
    "pose_estimation": "pose",
}
TASK_TYPES = {task: task_type for task_type, task in TASKS.items()}
SUFFIXES = {"detect": "", "segment": "-seg", "classify": "-cls", "pose": "-pose"}
OTHER_SUFFIXES = {"-obb": "obb", "-sem": "semantic", "-depth": "depth"}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # e.g. yolo11n-seg
    task: str  # Ultralytics task: detect, segment, classify, pose

    @property
    def config(self) -> str:
        return f"{self.name}.yaml"

    @property
    def weights(self) -> str:
        return f"{self.name}.pt"


def same_model(model_name: str, checkpoint_model: str, task: str) -> bool:
    """Whether MODEL_NAME names the checkpoint's architecture (yolo11n is yolo11n-seg when the
    checkpoint segments: the task comes from the checkpoint)."""
    try:
        return resolve_model(model_name, TASK_TYPES[task]).name == checkpoint_model
    except utils.ConfigError:  # e.g. yolo11n-cls for a detection checkpoint
        return False


def task_of_name(name: str) -> str:
    """The task a model name implies, by Ultralytics' suffix convention (no suffix: detect)."""
    for suffix, task in {**{v: k for k, v in SUFFIXES.items() if v}, **OTHER_SUFFIXES}.items():
        if re.search(re.escape(suffix) + r"(\b|$)", name):
            return task
    return "detect"


def resolve_model(model_name: str, task_type: str | None) -> ModelSpec:
    """MODEL_NAME and TASK_TYPE -> the model to build. `yolo11n` + segmentation -> yolo11n-seg."""
    name = re.sub(r"\.(ya?ml|pt)$", "", model_name.strip())
    if not _MODEL_NAME.match(name):
        raise utils.ConfigError(f"MODEL_NAME={model_name!r} is not a model name (e.g. yolo11n)")
    implied = task_of_name(name)
    if task_type is None:
        task = implied
    elif task_type not in TASKS:
        raise utils.ConfigError(f"TASK_TYPE={task_type} is not trained by this trainer "
                                f"(it trains {', '.join(TASKS)})")
    else:
        task = TASKS[task_type]
        if implied == "detect" and task != "detect":
            name += SUFFIXES[task]
        elif implied != task:
            raise utils.ConfigError(f"MODEL_NAME={model_name!r} is a {implied} model but "
                                    f"TASK_TYPE={task_type}")
    if task not in TASK_TYPES:
        raise utils.ConfigError(f"MODEL_NAME={model_name!r} is a {task} model; this trainer "
                                f"trains {', '.join(TASKS)}")
    return ModelSpec(name, task)


def check_model_config(spec: ModelSpec) -> None:
    """The model's YAML ships with Ultralytics (no download, no network)."""
    from ultralytics.nn.tasks import yaml_model_load

    try:
        yaml_model_load(spec.config)
    except (FileNotFoundError, OSError) as exc:
        import ultralytics

        raise utils.ConfigError(f"MODEL_NAME={spec.name!r} is not an Ultralytics model "
                                f"(no {spec.config} in ultralytics {ultralytics.__version__})"
                                ) from exc


def pretrained_weights(spec: ModelSpec, weights_dir: Path, *, offline: bool) -> Path:
    """`{name}.pt` from WEIGHTS_DIR, downloaded there first unless OFFLINE. ConfigError if not."""
    path = weights_dir / spec.weights
    if path.is_file():
        return path
    advice = f"put {spec.weights} in WEIGHTS_DIR={weights_dir} or set PRETRAINED=false"
    if offline:
        raise utils.ConfigError(f"PRETRAINED=true needs {spec.weights}, which is not in "
                                f"WEIGHTS_DIR and OFFLINE=true forbids downloading it: {advice}")
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if spec.weights not in GITHUB_ASSETS_NAMES:
        raise utils.ConfigError(f"PRETRAINED=true: Ultralytics publishes no {spec.weights}: "
                                f"{advice}")
    weights_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading pretrained weights %s to %s", spec.weights, weights_dir)
    try:
        attempt_download_asset(str(path))
    except OSError as exc:  # ConnectionError: offline, DNS, refused, HTTP error
        raise utils.ConfigError(f"PRETRAINED=true: {spec.weights} could not be downloaded "
                                f"(no network access?): {advice}") from exc
    if not path.is_file():
        raise utils.ConfigError(f"PRETRAINED=true: {spec.weights} could not be downloaded: "
                                f"{advice}")
    return path


def ultralytics_device(setting: str) -> str | None:
    """DEVICE (auto, cpu, cuda, cuda:N, N, N,M) as Ultralytics spells it; None lets it choose."""
    wanted = (setting or "auto").strip().lower()
    if wanted == "auto":
        return None
    if wanted == "cpu":
        return "cpu"
    ids = [part.strip() for part in wanted.removeprefix("cuda").lstrip(":").split(",")]
    ids = ["0"] if ids == [""] else ids
    if not all(part.isdigit() for part in ids):
        raise utils.ConfigError(f"DEVICE={setting!r} is not auto, cpu, cuda, cuda:N or N,M,...")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise utils.ConfigError(f"DEVICE={setting!r} asks for a GPU but CUDA is not available")
    missing = [i for i in ids if int(i) >= count]
    if missing:
        raise utils.ConfigError(f"DEVICE={setting!r}: no GPU {', '.join(missing)} "
                                f"({count} visible)")
    return ",".join(ids)


@dataclasses.dataclass(frozen=True)
class Keypoints:
    """A pose model's keypoints: `kpt_shape` ([count, 2 or 3]), their names in order and the
    skeleton (0-based index pairs), as the model carries them (`kpt_names`, `kpt_skeleton`)."""

    shape: tuple[int, int]
    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "names": list(self.names),
                "skeleton": [list(pair) for pair in self.skeleton]}


def keypoints_of(model: Any) -> Keypoints | None:
    """The keypoints a pose model carries: Ultralytics keeps `kpt_shape` and `kpt_names`
    ({class id: names}) on the model; the skeleton is ours (`kpt_skeleton`, set in training)."""
    shape = getattr(model, "kpt_shape", None)
    if not shape:
        return None
    count = int(shape[0])
    names = getattr(model, "kpt_names", None) or {}
    first = names.get(0) if isinstance(names, dict) else names
    names = tuple(str(n) for n in first) if first and len(first) == count else tuple(
        str(i) for i in range(count))
    skeleton = tuple((int(a), int(b)) for a, b in getattr(model, "kpt_skeleton", None) or ())
    return Keypoints((count, int(shape[1])), names, skeleton)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    task: str
    model_name: str | None  # its architecture, e.g. yolo11n (from its YAML or train args)
    class_names: list[str]
    image_size: int | None
    trained_epochs: int  # epochs this checkpoint has been trained for
    total_epochs: int | None  # what its run was asked for
    resumable: bool  # an interrupted run: optimizer state and epoch inside
    train_results: dict[str, list[Any]]  # results.csv columns so far
    keypoints: Keypoints | None = None  # pose models: what their keypoints are

    @property
    def task_type(self) -> str:
        return TASK_TYPES.get(self.task, self.task)


def class_names(names: Any) -> list[str]:
    """Ultralytics' names ({0: 'a', 1: 'b'} or ['a', 'b']) as a list in class-id order."""
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names]


def write_with_provenance(source: Path, dest: Path, provenance: dict[str, Any]) -> Path:
    """`source` (an Ultralytics checkpoint this job wrote) at `dest`, atomically, carrying the
    contract's `provenance` (section 4) beside Ultralytics' own keys."""
    import torch
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(source)  # this job's own file
    ckpt["provenance"] = provenance
    with utils.atomic_path(dest) as tmp:
        torch.save(ckpt, tmp)
    return dest


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Read an Ultralytics checkpoint's description; CheckpointError if it is not one.

    The format pickles the model's classes, so reading it runs code: only a checkpoint the
    contract trusts gets here (`Job.fetch_checkpoint(trusted_only=True)`; docs/trust-boundaries.md).
    """
    import torch
    from ultralytics.nn.tasks import guess_model_task, torch_safe_load

    try:
        ckpt, _ = torch_safe_load(path)  # a full unpickle: trusted by the caller
    except Exception as exc:  # torch and pickle raise many types for a file that is not one
        raise utils.CheckpointError(f"{path.name} is not a readable Ultralytics checkpoint "
                                    f"({type(exc).__name__})") from exc
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise utils.CheckpointError(f"{path.name} is not an Ultralytics checkpoint (no model)")
    args = ckpt.get("train_args") or {}
    task = getattr(model, "task", None) or args.get("task") or guess_model_task(model)
    if task not in TASK_TYPES:
        raise utils.CheckpointError(f"{path.name} holds a {task} model; this trainer handles "
                                    f"{', '.join(TASK_TYPES)}")
    epoch = ckpt.get("epoch", -1)
    epoch = -1 if epoch is None else int(epoch)
    results = ckpt.get("train_results") or {}
    trained = epoch + 1 if epoch >= 0 else len(results.get("epoch", []))
    imgsz = args.get("imgsz")
    # The model's own YAML names the architecture; a fine-tuned model's train args name the
    # checkpoint it started from (best.pt), not what it is.
    source = (getattr(model, "yaml", None) or {}).get("yaml_file") or args.get("model")
    return CheckpointInfo(
        path=path, task=task, model_name=Path(str(source)).stem if source else None,
        class_names=class_names(model.names),
        image_size=int(imgsz) if isinstance(imgsz, (int, float)) else None,
        trained_epochs=trained, total_epochs=args.get("epochs"),
        resumable=epoch >= 0 and ckpt.get("optimizer") is not None, train_results=results,
        keypoints=keypoints_of(model) if task == "pose" else None)
