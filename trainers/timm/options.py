"""EXTRA_ARGS of the timm trainer: the timm options a job may set beyond its settings, typed.

Each option goes to one timm call: the model's regularization to `timm.create_model`, the
augmentation to `timm.data.create_transform`, the mixing to `timm.data.Mixup`. `generate()`
reads each option's default from that call's own signature (run by `python tools/sync.py`, which
writes framework_options.py), so a run checks EXTRA_ARGS without importing timm; the ranges and
descriptions are this trainer's (timm declares none). PRESET applies one of PRESETS first.
"""

from __future__ import annotations

from typing import Any

import framework_options
import utils

# option -> (timm call, its keyword, x-group, JSON Schema type and range, description)
DECLARED: dict[str, tuple[str, str, str, dict[str, Any], str]] = {
    "drop_rate": ("model", "drop_rate", "regularization", {"type": "number", "minimum": 0.0,
                  "maximum": 1.0}, "Dropout probability before the classifier."),
    "drop_path_rate": ("model", "drop_path_rate", "regularization", {
        "type": "number", "minimum": 0.0, "maximum": 1.0},
        "Stochastic depth: probability of dropping a residual branch (deepest block)."),
    "vflip": ("transform", "vflip", "augmentation", {"type": "number", "minimum": 0.0,
              "maximum": 1.0}, "Vertical-flip probability in training."),
    "color_jitter": ("transform", "color_jitter", "augmentation", {"type": "number",
                     "minimum": 0.0}, "Colour-jitter strength (brightness, contrast, "
                     "saturation); ignored when AUTO_AUGMENT is set."),
    "grayscale_prob": ("transform", "grayscale_prob", "augmentation", {
        "type": "number", "minimum": 0.0, "maximum": 1.0},
        "Probability of turning a training image grey."),
    "gaussian_blur_prob": ("transform", "gaussian_blur_prob", "augmentation", {
        "type": "number", "minimum": 0.0, "maximum": 1.0},
        "Probability of blurring a training image."),
    "re_prob": ("transform", "re_prob", "augmentation", {"type": "number", "minimum": 0.0,
                "maximum": 1.0}, "Random-erasing probability (0: off)."),
    "re_mode": ("transform", "re_mode", "augmentation", {
        "type": "string", "enum": ["const", "rand", "pixel"]},
        "What fills an erased box: zeros, one random colour, or per-pixel noise."),
    "re_count": ("transform", "re_count", "augmentation", {"type": "integer", "minimum": 1},
                 "Boxes erased per image."),
    "mixup_prob": ("mixup", "prob", "augmentation", {"type": "number", "minimum": 0.0,
                   "maximum": 1.0}, "Probability of mixing a batch (with MIXUP or CUTMIX > 0)."),
    "mixup_switch_prob": ("mixup", "switch_prob", "augmentation", {
        "type": "number", "minimum": 0.0, "maximum": 1.0},
        "Probability of CutMix rather than Mixup when both MIXUP and CUTMIX are on."),
    "mixup_mode": ("mixup", "mode", "augmentation", {
        "type": "string", "enum": ["batch", "pair", "elem"]},
        "Mix once per batch, per pair of images, or per image."),
}

# Keywords of those timm calls that a job may not set here, each with why.
EXCLUDED = {
    "num_classes": "the dataset's class folders decide it",
    "pretrained": "set by the job: use PRETRAINED",
    "checkpoint_path": "set by the job: use CHECKPOINT_PATH",
    "pretrained_cfg": "use MODEL_NAME with a tag, e.g. resnet50.a1_in1k",
    "features_only": "this trainer trains classifiers",
    "in_chans": "images are read as RGB",
    "drop_block_rate": "a ResNet-only keyword: the options are those every architecture takes",
    "input_size": "set by the job: use IMAGE_SIZE",
    "hflip": "set by the job: use HFLIP",
    "scale": "set by the job: use CROP_SCALE",
    "auto_augment": "set by the job: use AUTO_AUGMENT",
    "interpolation": "the model's pretrained data config decides it",
    "mean": "the model's pretrained data config decides it",
    "std": "the model's pretrained data config decides it",
    "mixup_alpha": "set by the job: use MIXUP",
    "cutmix_alpha": "set by the job: use CUTMIX",
    "label_smoothing": "set by the job: use LABEL_SMOOTHING",
    "smoothing": "set by the job: use LABEL_SMOOTHING",
}

PRESETS = {
    "fast": utils.Preset(
        "Short fine-tunes from pretrained weights (a few epochs): no colour jitter, the least "
        "CPU per image, so small GPUs are not kept waiting on the data loader.",
        {"color_jitter": 0.0}),
    "balanced": utils.Preset(
        "timm's own defaults (colour jitter 0.4, no dropout, no erasing): the start for most "
        "datasets.", {}),
    "accurate": utils.Preset(
        "Long runs on larger datasets, after timm's ImageNet recipes: stochastic depth 0.1, "
        "head dropout 0.1 and random erasing 0.25 with per-pixel noise; add MIXUP/CUTMIX for "
        "more.",
        {"drop_path_rate": 0.1, "drop_rate": 0.1, "re_prob": 0.25, "re_mode": "pixel"}),
}


def generate() -> dict[str, Any]:
    """The options schema, each default read from the timm call the option goes to."""
    import inspect

    import timm
    from timm.data import Mixup, create_transform
    from timm.models.resnet import ResNet  # the default MODEL_NAME's class

    calls = {"model": ResNet.__init__, "transform": create_transform, "mixup": Mixup.__init__}
    defaults = {call: {name: p.default for name, p in inspect.signature(fn).parameters.items()}
                for call, fn in calls.items()}
    properties = {
        name: {**schema, "default": defaults[call][keyword], "description": description,
               "x-group": group}
        for name, (call, keyword, group, schema, description) in DECLARED.items()}
    return {"source": f"timm {timm.__version__}: create_model (ResNet), create_transform and "
                      "Mixup signatures", "properties": properties, "excluded": EXCLUDED}


OPTIONS = utils.FrameworkOptions(framework_options.PROPERTIES, framework_options.EXCLUDED,
                                 PRESETS, framework_options.SOURCE)


def split(extra: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Resolved EXTRA_ARGS as keyword arguments per timm call: {"model": ..., "transform": ...,
    "mixup": ...}."""
    calls: dict[str, dict[str, Any]] = {"model": {}, "transform": {}, "mixup": {}}
    for name, value in (extra or {}).items():
        call, keyword = DECLARED[name][:2]
        calls[call][keyword] = value
    return calls
