"""What this trainer can do, declared once; `python train.py --capabilities` reads it.

The manifest built from this and every script's settings table is committed as
capabilities.json (kept current by `python tools/sync.py` in the monorepo root). The platform's
UI builds its forms from it and validates a job against it before launch
(`utils.validate_job_settings`). Keep this module import-light: no torch, no framework.

FRAMEWORK: declare your framework's package, tasks, models (with whether pretrained weights
exist), dataset layouts and export formats. Models must match model.py's MODELS; the
framework's options and presets are options.py's.
"""

from __future__ import annotations

import options
import utils

CAPABILITIES = utils.Capabilities(
    framework="PyTorch",
    package="torch",
    tasks=(utils.TaskInfo.standard("image_classification"),),
    models=(utils.ModelInfo("tinycnn", "image_classification", pretrained=False),),
    dataset_layouts=(utils.DATASET_LAYOUTS["image_folder"],
                     utils.platform_annotations_layout("image_classification")),
    export_formats=(utils.EXPORT_ONNX, utils.EXPORT_TORCHSCRIPT),
    options=options.OPTIONS,
)
