"""The job's settings as Ultralytics train arguments, and EXTRA_ARGS typed by its own options.

EXTRA_ARGS passes Ultralytics options through (`{"mosaic": 0.5, "cos_lr": true}`); PRESET
applies one of PRESETS first. `OPTIONS` types every option a job may set; its schema is
generated from Ultralytics' own definitions by `generate()` (run by `python tools/sync.py`, which
writes framework_options.py), so run_job checks PRESET and EXTRA_ARGS with the settings, before
any work and without importing Ultralytics: unknown names (with the closest match), values of the
wrong type or out of range, and keys the platform owns are all reported at once. Ultralytics'
own `check_cfg` then checks them again (`check_extra_args`), converting where it would.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import framework_options
import utils

# Ultralytics arguments the job sets itself: EXTRA_ARGS may not, and the error says what to use.
OWNED = {
    "model": "MODEL_NAME", "data": "DATASET_ID", "task": "TASK_TYPE", "mode": "train.py",
    "epochs": "EPOCHS", "batch": "BATCH_SIZE", "imgsz": "IMAGE_SIZE", "lr0": "LEARNING_RATE",
    "optimizer": "OPTIMIZER", "device": "DEVICE", "workers": "NUM_WORKERS", "seed": "SEED",
    "pretrained": "PRETRAINED", "amp": "AMP", "resume": "CHECKPOINT_PATH",
    "save_period": "CHECKPOINT_EVERY", "project": "WORK_DIR", "name": "WORK_DIR",
    "exist_ok": "WORK_DIR", "save_dir": "WORK_DIR", "cfg": "EXTRA_ARGS itself",
    "save": "the platform (checkpoints are always saved)",
    "val": "the platform (it reads a validation every epoch)",
}

# Sections of Ultralytics' default.yaml that are not about training, and options of training
# that a job may not set: each with why (the schema's `excluded`, shown in errors).
OTHER_MODES = ("Predict settings", "Visualize settings", "Export settings", "Tracker settings",
               "Custom config.yaml")
NOT_FOR_JOBS = {
    "time": "it ends training by wall-clock hours; EPOCHS decides the run's length, its progress "
            "and ETA",
    "distill_model": "a teacher model's path on the job's machine, which the platform does not "
                     "stage",
    "dis": "the distillation loss weight, for distill_model, which a job may not set",
    "split": "validation during training always uses the dataset's val split",
    "quantize": "quantization-aware training is not supported by this trainer",
    "dnn": "OpenCV DNN is an inference backend, not used by training",
    "nms": "an export option (use export.py)",
    "profile": "it profiles ONNX/TensorRT exports during training (use export.py)",
    **{gain: "a loss gain of a task this trainer does not train (pose, obb or depth)"
       for gain in ("pose", "kobj", "rle", "angle", "dlog", "dgrad", "dlam")},
}
# The form's groups: every option Ultralytics has is in one of these or excluded (generate()
# fails on a new option until it is placed).
GROUPS = {
    "augmentation": ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                     "perspective", "flipud", "fliplr", "bgr", "mosaic", "mixup", "cutmix",
                     "copy_paste", "copy_paste_mode", "auto_augment", "erasing", "close_mosaic",
                     "multi_scale"),
    "optimization": ("lrf", "momentum", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
                     "cos_lr", "nbs", "patience"),
    "regularization": ("weight_decay", "dropout", "freeze"),
    "loss": ("box", "cls", "cls_pw", "dfl"),
    "validation": ("conf", "iou", "max_det", "plots", "save_json"),
    "data": ("cache", "fraction", "rect", "single_cls", "overlap_mask", "mask_ratio",
             "cls_remap"),
    "runtime": ("deterministic", "compile", "channels_last", "verbose"),
}
_JSON_TYPE = {"float": "number", "int": "integer", "bool": "boolean", "str": "string",
              "list": "array", "tuple": "array", "optional": "null"}
# `key: default # (types) description` and `# Section name ----` lines of default.yaml
_OPTION_LINE = re.compile(r"^(\w+):[^#]*#\s*\(([^)]*)\)\s*(.*)$")
_SECTION_LINE = re.compile(r"^# (.+?) -{3,}")

PRESETS = {
    "fast": utils.Preset(
        "Quick runs (a first look at a dataset, a few epochs): short warmup, lighter colour and "
        "mosaic augmentation, mosaic off for the last 2 epochs, early stop after 10 epochs "
        "without improvement.",
        {"warmup_epochs": 1.0, "hsv_s": 0.5, "hsv_v": 0.3, "mosaic": 0.5, "close_mosaic": 2,
         "patience": 10}),
    "balanced": utils.Preset(
        "Ultralytics' own defaults, tuned on COCO: the sound start for most datasets.", {}),
    "accurate": utils.Preset(
        "Long runs on a large dataset, for the last points of mAP: cosine learning-rate schedule, "
        "stronger scale, MixUp and copy-paste (segmentation) augmentation, mosaic off for the "
        "last 15 epochs, early stop only after 50 epochs without improvement.",
        {"cos_lr": True, "scale": 0.9, "mixup": 0.15, "copy_paste": 0.3, "close_mosaic": 15,
         "patience": 50}),
}


def generate() -> dict[str, Any]:
    """The options schema from Ultralytics' own definitions (tools/sync.py writes it out).

    Defaults come from DEFAULT_CFG_DICT, types and ranges from check_cfg's key sets
    (CFG_BOOL_KEYS, CFG_INT_KEYS with CFG_INT_MIN, CFG_FRACTION_KEYS: 0 to 1, CFG_FLOAT_KEYS)
    and, for the rest, the `(type)` of each line of default.yaml, whose comment is also the
    description.
    """
    import ultralytics
    from ultralytics import cfg
    from ultralytics.utils import DEFAULT_CFG_PATH

    group_of = {name: group for group, names in GROUPS.items() for name in names}
    properties: dict[str, Any] = {}
    excluded = {key: f"set by the job: {'use ' if owner.isupper() else ''}{owner}"
                for key, owner in OWNED.items()}
    section = ""
    for line in DEFAULT_CFG_PATH.read_text(encoding="utf-8").splitlines():
        if found := _SECTION_LINE.match(line):
            section = found.group(1)
        if not (found := _OPTION_LINE.match(line)) or found.group(1) in OWNED:
            continue
        name, kinds, description = found.groups()
        if name in NOT_FOR_JOBS or section in OTHER_MODES:
            excluded[name] = NOT_FOR_JOBS.get(name, f"{section.split()[0].lower()} only, not "
                                                    "used by training")
            continue
        if name not in group_of:
            raise ValueError(f"Ultralytics option {name!r} is in no group: add it to GROUPS "
                             "or NOT_FOR_JOBS in options.py")
        default = cfg.DEFAULT_CFG_DICT[name]
        prop = {"type": _option_type(name, kinds, default, cfg), "default": default,
                "description": description.strip()}
        if name in cfg.CFG_FRACTION_KEYS or name == "scale":
            prop.update(minimum=0.0, maximum=1.0)
        elif name in cfg.CFG_INT_MIN:
            prop["minimum"] = cfg.CFG_INT_MIN[name]
        properties[name] = {**prop, "x-group": group_of[name]}
    return {"source": f"ultralytics {ultralytics.__version__}: cfg/default.yaml and check_cfg",
            "properties": properties, "excluded": dict(sorted(excluded.items()))}


def _option_type(name: str, kinds: str, default: Any, cfg: Any) -> str | list[str]:
    for keys, kind in ((cfg.CFG_BOOL_KEYS, "boolean"), (cfg.CFG_INT_KEYS, "integer"),
                       (cfg.CFG_FRACTION_KEYS, "number"), (cfg.CFG_FLOAT_KEYS, "number"),
                       (cfg.CFG_STR_KEYS, "string")):
        if name in keys:
            types = [kind, "null"] if default is None else [kind]
            break
    else:
        words = re.split(r"[|,]", kinds)
        types = list(dict.fromkeys(_JSON_TYPE[w.strip()] for w in words if w.strip()))
    return types[0] if len(types) == 1 else types


OPTIONS = utils.FrameworkOptions(framework_options.PROPERTIES, framework_options.EXCLUDED,
                                 PRESETS, framework_options.SOURCE)


def check_extra_args(extra: dict[str, Any] | None) -> dict[str, Any]:
    """EXTRA_ARGS, validated by Ultralytics' own option names and types; ConfigError if not."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    extra = dict(extra or {})
    problems = []
    owned = sorted(k for k in extra if k in OWNED)
    if owned:
        problems.append("keys the job sets itself: " + ", ".join(
            f"{k!r} (use {OWNED[k]})" for k in owned))
    unknown = sorted(k for k in extra if k not in DEFAULT_CFG_DICT and k not in OWNED)
    if unknown:
        problems.append("unknown Ultralytics train arguments: " + ", ".join(
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
                k, DEFAULT_CFG_DICT, n=1)) else "") for k in unknown))
    for key in sorted(set(extra) - set(owned) - set(unknown)):
        checked = {key: extra[key]}
        try:
            check_cfg(checked)  # converts in place where Ultralytics would (e.g. 1 -> 1.0)
        except (TypeError, ValueError) as exc:
            problems.append(utils.one_line(str(exc)))
        else:
            extra[key] = checked[key]
    if problems:
        raise utils.ConfigError("EXTRA_ARGS: " + "; ".join(problems))
    return extra


def train_arguments(cfg: Any, *, data: str, device: str | None, save_dir: Path,
                    extra: dict[str, Any], world_size: int = 1) -> dict[str, Any]:
    """Keyword arguments of `YOLO.train` for a new run (fresh or fine-tuning)."""
    on_gpu = device != "cpu" and (device is not None or gpu_available())
    return {
        # BATCH_SIZE is per process; Ultralytics' `batch` is split across the DDP ranks.
        "data": data, "epochs": cfg.epochs, "batch": cfg.batch_size * max(world_size, 1),
        "imgsz": cfg.image_size, "lr0": cfg.learning_rate, "optimizer": cfg.optimizer,
        "device": device, "workers": cfg.num_workers, "seed": cfg.seed,
        "amp": bool(cfg.amp) and on_gpu, "save_dir": str(save_dir), "exist_ok": True,
        "save_period": -1, "save": True, "val": True, "plots": True, **extra,
    }


def resume_arguments(cfg: Any, *, data: str, device: str | None,
                     save_dir: Path) -> dict[str, Any]:
    """Keyword arguments of `YOLO.train(resume=True)`: the interrupted run's hyperparameters
    stand; only what belongs to this machine and this job changes."""
    return {"resume": True, "data": data, "device": device, "workers": cfg.num_workers,
            "save_dir": str(save_dir)}


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()
