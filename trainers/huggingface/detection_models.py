"""Object-detection models: by Hub name with pretrained weights, or offline from a small
configuration of the same architecture; and the image processor each architecture post-processes
with.

Offline (PRETRAINED=false or no network) a Hub name in OFFLINE_MODELS is built from its
configuration class with sizes that train on a CPU (a few hundred thousand to ~1 M parameters
instead of tens of millions) and random weights; nothing is downloaded, not even a backbone.

Inputs are 0..1 RGB pixels, what RT-DETR's and D-FINE's processors give their models. An
architecture whose processor also normalises (Conditional DETR, DETR: ImageNet mean and std) gets
that step as a forward pre-hook on the model (`NormalizeInput`), so the mean and std travel with
the architecture: the data, evaluate, predict and an exported graph never need to know them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import architectures
import utils

log = logging.getLogger(f"trainer.{__name__}")

DEFAULT_MODEL = architectures.default_model("object_detection")

# model_type -> the image processor its Hub checkpoints name (preprocessor_config.json). Needed
# where transformers' own auto-mapping has no entry (rt_detr_v2, d_fine); the rest fall back to it.
PROCESSORS = {
    "rt_detr": "RTDetrImageProcessor",
    "rt_detr_v2": "RTDetrImageProcessor",
    "d_fine": "RTDetrImageProcessor",
    "conditional_detr": "ConditionalDetrImageProcessor",
    "deformable_detr": "DeformableDetrImageProcessor",
    "detr": "DetrImageProcessor",
}


def _rt_detr_v2() -> Any:
    from transformers import RTDetrResNetConfig, RTDetrV2Config

    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                  depths=[1, 1, 1, 1], layer_type="basic",
                                  downsample_in_bottleneck=False,
                                  out_features=["stage2", "stage3", "stage4"])
    # Random weights: the backbone's batch norms must learn, not stay frozen at their init.
    return RTDetrV2Config(backbone_config=backbone, freeze_backbone_batch_norms=False,
                          encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64,
                          encoder_ffn_dim=128, encoder_attention_heads=4, d_model=64,
                          decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128,
                          decoder_attention_heads=4, decoder_layers=2, num_queries=30,
                          num_denoising=20)


def _conditional_detr() -> Any:
    from transformers import ConditionalDetrConfig, ResNetConfig

    # Three stages: stride 16, so a 128 px input still gives an 8x8 map to attend over.
    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                            layer_type="basic", out_features=["stage3"])
    return ConditionalDetrConfig(backbone_config=backbone, d_model=64, encoder_layers=2,
                                 decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                 num_queries=30, auxiliary_loss=True)


def _d_fine() -> Any:
    from transformers import DFineConfig, HGNetV2Config

    backbone = HGNetV2Config(stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128],
                             stage_mid_channels=[16, 16, 32, 64],
                             stage_out_channels=[32, 64, 128, 256], stage_num_blocks=[1, 1, 1, 1],
                             stage_numb_of_layers=[2, 2, 2, 2], stage_kernel_size=[3, 3, 5, 5],
                             stage_light_block=[False, False, True, True],
                             hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                             out_features=["stage3", "stage4"])
    return DFineConfig(backbone_config=backbone, freeze_backbone_batch_norms=False,
                       encoder_in_channels=[128, 256], feat_strides=[16, 32],
                       num_feature_levels=2, encode_proj_layers=[1], encoder_hidden_dim=64,
                       encoder_ffn_dim=128, encoder_attention_heads=4, d_model=64,
                       decoder_in_channels=[64, 64], decoder_ffn_dim=128,
                       decoder_attention_heads=4, decoder_layers=2, decoder_n_points=[4, 4],
                       num_queries=30, num_denoising=20, depth_mult=0.34, hidden_expansion=0.5)


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    architecture: str  # the transformers class AutoModelForObjectDetection builds
    config: Callable[[], Any]  # the small configuration, with no labels yet


OFFLINE_MODELS = {
    "PekingU/rtdetr_v2_r18vd": OfflineModel("RTDetrV2ForObjectDetection", _rt_detr_v2),
    "microsoft/conditional-detr-resnet-50": OfflineModel("ConditionalDetrForObjectDetection",
                                                         _conditional_detr),
    "ustc-community/dfine-nano-coco": OfflineModel("DFineForObjectDetection", _d_fine),
}


def offline_models() -> dict[str, str]:
    """Hub name -> architecture, as capabilities lists them (architectures.py, import-light)."""
    return dict(architectures.OFFLINE_MODELS["object_detection"])


def label_maps(class_names: Sequence[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(class_names)),
            "label2id": {name: i for i, name in enumerate(class_names)}}


def create_model(model_name: str, class_names: Sequence[str], *, pretrained: bool) -> Any:
    """A detector for `class_names`: the Hub's weights (a new head) when `pretrained`, else the
    offline architecture of OFFLINE_MODELS. (The loop decides between them: training_run.py.)"""
    from transformers import AutoModelForObjectDetection

    labels = label_maps(class_names)
    if pretrained:  # no network and no cache: OSError, which the loop turns into one line
        model = AutoModelForObjectDetection.from_pretrained(
            model_name, ignore_mismatched_sizes=True, **labels)
        return with_input_normalization(model)
    if model_name not in OFFLINE_MODELS:
        raise utils.ConfigError(f"MODEL_NAME={model_name} has no offline configuration "
                                f"(offline: {', '.join(OFFLINE_MODELS)})")
    config = OFFLINE_MODELS[model_name].config()
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]  # sets num_labels
    return with_input_normalization(AutoModelForObjectDetection.from_config(config))


def model_from_config(config: dict[str, Any]) -> Any:
    """The architecture a checkpoint's `config.to_dict()` names, random weights, no download
    (a pretrained backbone the configuration names is not fetched: the state dict has it)."""
    from transformers import AutoConfig, AutoModelForObjectDetection

    values = copy.deepcopy(config)
    if "model_type" not in values:
        raise utils.CheckpointError("the checkpoint's model configuration names no model_type")
    for part in (values, values.get("backbone_config") or {}):
        if "use_pretrained_backbone" in part:
            part["use_pretrained_backbone"] = False
    model_type = values.pop("model_type")
    built = AutoConfig.for_model(model_type, **values)
    return with_input_normalization(AutoModelForObjectDetection.from_config(built))


@functools.cache
def image_processor(model_type: str) -> Any:
    """The architecture's image processor with its defaults (constructed, never downloaded):
    its post-processing turns the model's outputs into boxes in pixels."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    name = PROCESSORS.get(model_type)
    if name is None:
        backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
        name = backends.get("torchvision") or backends.get("pil")
    if name is None or not hasattr(transformers, name):
        raise utils.ConfigError(f"no image processor known for model type {model_type!r} "
                                f"(known: {', '.join(sorted(PROCESSORS))})")
    return getattr(transformers, name)()


def model_type_of_outputs(outputs: Any) -> str:
    """The architecture that produced `outputs`, from its class's module
    (transformers.models.<model_type>.modeling_<model_type>): the validator sees no model."""
    parts = type(outputs).__module__.split(".")
    if len(parts) < 3 or parts[:2] != ["transformers", "models"]:
        raise TypeError(f"not a transformers detection output: {type(outputs).__name__}")
    return parts[2]


class NormalizeInput:
    """Forward pre-hook: (pixels - mean) / std on `pixel_values`, as the processor would."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    def _normalize(self, pixels: Any) -> Any:
        mean = pixels.new_tensor(self.mean).view(1, -1, 1, 1)
        std = pixels.new_tensor(self.std).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "pixel_values" in kwargs:
            kwargs = {**kwargs, "pixel_values": self._normalize(kwargs["pixel_values"])}
        elif args:
            args = (self._normalize(args[0]), *args[1:])
        return args, kwargs


def input_normalization(model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) when the architecture's processor normalises 0..1 pixels, else None."""
    processor = image_processor(model_type)
    if not getattr(processor, "do_normalize", False):
        return None
    return tuple(processor.image_mean), tuple(processor.image_std)


def with_input_normalization(model: Any) -> Any:
    normalization = input_normalization(model.config.model_type)
    if normalization is not None:
        model.register_forward_pre_hook(NormalizeInput(*normalization), with_kwargs=True)
    return model
