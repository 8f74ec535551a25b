"""What this trainer can do, declared once; `python train.py --capabilities` reads it.

The manifest built from this and every script's settings table is committed as
capabilities.json (kept current by `python tools/sync.py` in the monorepo root). The platform's
UI builds its forms from it and validates a job against it before launch
(`utils.validate_job_settings`). Keep this module import-light: no torch, no timm (options.py
reads the generated framework_options.py).

`MODELS` is a catalogue of common choices, not the whole list: train.py takes any of timm's
~1300 architectures (`timm.list_models()`), optionally with a pretrained tag, or a Hugging Face
Hub model, which `MODEL_NAME_PATTERN` admits. train.py checks the name against timm itself
before anything is downloaded (model.check_model_name).
"""

from __future__ import annotations

import options
import utils

TASK = "image_classification"

# Each one a timm architecture (or architecture.tag) with pretrained weights on the Hub; a test
# checks that against the installed timm.
MODELS = (
    "resnet18", "resnet50", "resnet50.a1_in1k", "resnet101",
    "efficientnet_b0", "efficientnet_b3",
    "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "convnext_nano", "convnext_tiny", "convnext_tiny.in12k_ft_in1k", "convnext_small",
    "regnety_016",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
    "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "eva02_small_patch14_224",
    "fastvit_t8", "efficientvit_b1",
    "test_resnet",  # timm's tiny test model (~0.3 M parameters): demos and CI
)

# Any timm name (`architecture` or `architecture.tag`: lower-case letters, digits, underscores),
# a Hub repository (`hf-hub:timm/resnet50.a1_in1k`) or a local folder (`local-dir:/models/x`).
MODEL_NAME_PATTERN = (r"[a-z0-9_]+(\.[a-z0-9_]+)?"
                      r"|hf-hub:[\w.\-]+/[\w.\-]+(@[\w.\-]+)?"
                      r"|local-dir:/.+")

CAPABILITIES = utils.Capabilities(
    framework="timm",
    package="timm",
    tasks=(utils.TaskInfo.standard(TASK),),
    models=tuple(utils.ModelInfo(name, TASK, pretrained=True) for name in MODELS),
    dataset_layouts=(utils.DATASET_LAYOUTS["image_folder"],
                     utils.platform_annotations_layout(TASK)),
    export_formats=(utils.EXPORT_ONNX, utils.EXPORT_TORCHSCRIPT),
    model_name_pattern=MODEL_NAME_PATTERN,
    options=options.OPTIONS,
)
