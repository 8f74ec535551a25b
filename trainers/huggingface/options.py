"""EXTRA_ARGS: the framework options a job may set, typed for the platform's UI, and presets.

`OPTIONS` is read by capabilities.py (the manifest types EXTRA_ARGS field by field and lists
PRESET's choices) and by train.py (run_job resolves PRESET + EXTRA_ARGS and checks them before
any work: a wrong type, a value out of range or an unknown option fails the job with exit 2).
Keep this module import-light: no torch, no framework.

FRAMEWORK: declare your framework's options below, each with its JSON Schema `type`, its
`default` (the framework's own), `minimum`/`maximum` or `enum`, a one-line `description` and an
`x-group` (augmentation, optimization, regularization, validation, data, ...). Where the
framework defines its options in code, derive them instead of typing them: write
`generate() -> {"source": ..., "properties": ..., "excluded": ...}` here (it may import the
framework), run `python tools/sync.py` once to write framework_options.py, and build OPTIONS
from that module's PROPERTIES, EXCLUDED and SOURCE (see trainers/ultralytics/options.py).
"""

from __future__ import annotations

import utils

# The TinyCNN keywords (model.py) a job may set; model.py's MODELS says which model takes which.
PROPERTIES = {
    "width": {"type": "integer", "default": 16, "minimum": 1, "maximum": 256,
              "description": "Channels of the first conv block (doubling in each of four).",
              "x-group": "model"},
    "dropout": {"type": "number", "default": 0.1, "minimum": 0.0, "maximum": 1.0,
                "description": "Dropout before the linear head.", "x-group": "regularization"},
}

# Options a job may not set here, each with why (shown when a job tries).
EXCLUDED = {
    "num_classes": "the dataset's class folders decide it",
}

PRESETS = {
    "fast": utils.Preset("A narrow network: the quickest epochs, for a first look at a dataset.",
                         {"width": 8, "dropout": 0.0}),
    "balanced": utils.Preset("The model's defaults.", {}),
    "accurate": utils.Preset("A wider network with more dropout, for larger datasets.",
                             {"width": 32, "dropout": 0.3}),
}

OPTIONS = utils.FrameworkOptions(PROPERTIES, EXCLUDED, PRESETS, "declared in options.py")
