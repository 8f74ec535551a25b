"""EXTRA_ARGS of the Hugging Face trainer: the optimization options a job may set, typed.

Each option is a field of transformers' `TrainingArguments` that the accelerate loop honours
(engine.py, training_run.py), under the same name and meaning. `generate()` reads each default
and description from `TrainingArguments` itself (run by `python tools/sync.py`, which writes
framework_options.py), so a run checks EXTRA_ARGS without importing transformers; the ranges
are this trainer's. PRESET applies one of PRESETS first.
"""

from __future__ import annotations

from typing import Any

import framework_options
import utils

# Schedules of transformers' get_scheduler that need nothing but warmup and length.
SCHEDULES = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
             "constant_with_warmup", "inverse_sqrt"]

# TrainingArguments field -> (x-group, JSON Schema type and range, what to add to its help)
DECLARED: dict[str, tuple[str, dict[str, Any], str]] = {
    "lr_scheduler_type": ("optimization", {"type": "string", "enum": SCHEDULES}, ""),
    "warmup_steps": ("optimization", {"type": "number", "minimum": 0.0},
                     "Under 1: a fraction of all updates."),
    "max_grad_norm": ("optimization", {"type": "number", "minimum": 0.0}, ""),
    "adam_beta1": ("optimization", {"type": "number", "minimum": 0.0, "maximum": 1.0}, ""),
    "adam_beta2": ("optimization", {"type": "number", "minimum": 0.0, "maximum": 1.0}, ""),
    "adam_epsilon": ("optimization", {"type": "number", "minimum": 0.0}, ""),
    "gradient_accumulation_steps": ("optimization", {"type": "integer", "minimum": 1}, ""),
}

# TrainingArguments fields a job may not set here, each with why (shown when a job tries).
EXCLUDED = {
    "learning_rate": "set by the job: use LEARNING_RATE",
    "weight_decay": "set by the job: use WEIGHT_DECAY",
    "num_train_epochs": "set by the job: use EPOCHS",
    "per_device_train_batch_size": "set by the job: use BATCH_SIZE",
    "seed": "set by the job: use SEED",
    "bf16": "set by the job: use AMP",
    "fp16": "set by the job: use AMP",
    "output_dir": "the job's work dir: use WORK_DIR",
    "num_labels": "the dataset's classes decide it",
}

PRESETS = {
    "fast": utils.Preset("Short runs: a constant learning rate after a short warmup.",
                         {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 0.05}),
    "balanced": utils.Preset("transformers' own defaults (linear decay, no warmup).", {}),
    "accurate": utils.Preset("Longer runs: cosine decay after a 10 % warmup, as the Hub's "
                             "fine-tuning recipes use.",
                             {"lr_scheduler_type": "cosine", "warmup_steps": 0.1}),
}


def generate() -> dict[str, Any]:
    """The options schema, each default and description read from TrainingArguments."""
    import dataclasses

    import transformers
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    properties = {}
    for name, (group, schema, note) in DECLARED.items():
        field = fields[name]
        default = getattr(field.default, "value", field.default)  # an enum: its value
        help_text = field.metadata.get("help", "").split(". ")[0].rstrip(".") + "."
        help_text = f"{help_text} {note}".strip()
        properties[name] = {**schema, "default": default, "description": help_text,
                            "x-group": group}
    return {"source": f"transformers {transformers.__version__}: TrainingArguments fields",
            "properties": properties, "excluded": EXCLUDED}


OPTIONS = utils.FrameworkOptions(framework_options.PROPERTIES, framework_options.EXCLUDED,
                                 PRESETS, framework_options.SOURCE)


def resolved(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Every option's value: EXTRA_ARGS (PRESET applied, checked by run_job) over the defaults."""
    return {**{name: p["default"] for name, p in framework_options.PROPERTIES.items()},
            **(extra or {})}
