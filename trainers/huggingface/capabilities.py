"""What this trainer can do, declared once; `python train.py --capabilities` reads it.

The manifest built from this and every script's settings table is committed as
capabilities.json (kept current by `python tools/sync.py` in the monorepo root). The platform's
UI builds its forms from it and validates a job against it before launch
(`utils.validate_job_settings`). Keep this module import-light: no torch, no transformers (the
models come from architectures.py, the options from the generated framework_options.py).

`MODELS` are the names every task builds offline (a small configuration of the architecture)
and, with PRETRAINED=true, downloads from the Hub; train.py takes any other Hub model of the
task's kind too, which `MODEL_NAME_PATTERN` admits.
"""

from __future__ import annotations

import options
import utils
from architectures import OFFLINE_MODELS

# A Hub repository id: `owner/name`, or a bare legacy id.
MODEL_NAME_PATTERN = r"[\w.\-]+(/[\w.\-]+)?"

CAPABILITIES = utils.Capabilities(
    framework="Hugging Face transformers",
    package="transformers",
    tasks=tuple(utils.TaskInfo.standard(task) for task in OFFLINE_MODELS),
    models=tuple(utils.ModelInfo(name, task, pretrained=True)
                 for task, models in OFFLINE_MODELS.items() for name in models),
    dataset_layouts=(utils.DATASET_LAYOUTS["image_folder"],
                     utils.platform_annotations_layout(*OFFLINE_MODELS)),
    export_formats=(utils.EXPORT_ONNX, utils.EXPORT_TORCHSCRIPT),
    model_name_pattern=MODEL_NAME_PATTERN,
    options=options.OPTIONS,
)
