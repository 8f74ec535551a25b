"""The models each task builds with no network, by Hub name: one import-light table.

capabilities.py lists them (it must not import torch or transformers), and each task module
reads its own row: `offline_models()` returns it, and `create_model` builds these names offline
from a small configuration of the same architecture (the task module holds those configurations).
The first name of a row is the task's default MODEL_NAME.
"""

from __future__ import annotations

# TASK_TYPE -> {Hub name: architecture}; each task module adds its row here.
OFFLINE_MODELS: dict[str, dict[str, str]] = {
    "image_classification": {
        "google/vit-base-patch16-224": "ViT",
        "microsoft/resnet-50": "ResNet",
        "facebook/convnext-tiny-224": "ConvNeXt",
    },
    "object_detection": {
        "PekingU/rtdetr_v2_r18vd": "RT-DETR v2",
        "ustc-community/dfine-nano-coco": "D-FINE",
        "microsoft/conditional-detr-resnet-50": "Conditional DETR",
    },
    "semantic_segmentation": {
        "nvidia/mit-b0": "SegFormer",
        "openmmlab/upernet-convnext-tiny": "UperNet (ConvNeXt)",
    },
}


def default_model(task_type: str) -> str | None:
    """The task's default MODEL_NAME: the first model of its row (None while it has none)."""
    return next(iter(OFFLINE_MODELS.get(task_type, {})), None)
