"""What this trainer can do, declared once; `python train.py --capabilities` reads it.

The manifest built from this and every script's settings table is committed as
capabilities.json (kept current by `python tools/sync.py` in the monorepo root). The platform's
UI builds its forms from it and validates a job against it before launch
(`utils.validate_job_settings`). Import-light: utils, model.py's tables and the generated
framework_options.py (through options.py), never torch or Ultralytics.
"""

from __future__ import annotations

import dataclasses

import model
import options
import utils

# Families whose YAMLs ship with Ultralytics and whose weights it publishes for all four tasks
# (model.pretrained_weights downloads {name}.pt from its releases).
FAMILIES = ("yolo11", "yolo26", "yolov8")
SCALES = ("n", "s", "m", "l", "x")

# The catalogue is not the whole list: any YOLO name whose YAML ships with Ultralytics trains
# (model.resolve_model, checked at start), e.g. yolov8n-p2; not the tasks this trainer lacks.
MODEL_NAME_PATTERN = (r"^yolo(v?\d+)[a-z]*(-(?!obb\b|sem\b|depth\b)[a-z0-9]+)*"
                      r"(\.ya?ml|\.pt)?$")

EXPORT_FORMATS = (
    utils.EXPORT_ONNX,
    utils.EXPORT_TORCHSCRIPT,
    # Ultralytics writes a folder ({stem}_openvino_model/: .xml, .bin, metadata.yaml)
    utils.ExportFormat("openvino", "model_openvino_model", requires=("openvino",)),
    # Ultralytics 8.4 exports TFLite through Google's LiteRT (its format `litert`)
    utils.ExportFormat("tflite", "model.tflite", requires=("litert_torch", "ai_edge_litert")),
    utils.ExportFormat("coreml", "model.mlpackage", requires=("coremltools",)),
    # TensorRT builds the engine from an ONNX export, on the GPU it will run on
    utils.ExportFormat("engine", "model.engine", requires=("tensorrt", "onnx"), needs_gpu=True),
)


# The platform's own annotation format (contract section 2a), converted by data.py to what
# Ultralytics reads, for every task this trainer trains.
PLATFORM_ANNOTATIONS = dataclasses.replace(
    utils.DATASET_LAYOUTS.get("platform_annotations") or utils.DatasetLayout(
        "platform_annotations", (), "annotations_<task>.json (or annotations.json) with the "
        "images under images/: the platform's COCO-based annotations, standard or nested"),
    task_types=tuple(model.TASKS))


def catalogue() -> tuple[utils.ModelInfo, ...]:
    return tuple(
        utils.ModelInfo(f"{family}{scale}{suffix}", model.TASK_TYPES[task], pretrained=True)
        for family in FAMILIES for task, suffix in model.SUFFIXES.items() for scale in SCALES)


CAPABILITIES = utils.Capabilities(
    framework="Ultralytics",
    package="ultralytics",
    tasks=tuple(utils.TaskInfo.standard(task_type) for task_type in model.TASKS),
    models=catalogue(),
    dataset_layouts=(
        PLATFORM_ANNOTATIONS,
        dataclasses.replace(utils.DATASET_LAYOUTS["yolo"], task_types=(
            "object_detection", "instance_segmentation", "pose_estimation")),
        utils.DATASET_LAYOUTS["image_folder"],
    ),
    export_formats=EXPORT_FORMATS,
    model_name_pattern=MODEL_NAME_PATTERN,
    options=options.OPTIONS,
)
