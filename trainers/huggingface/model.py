"""The model and its checkpoint format.

FRAMEWORK: replace `TinyCNN` / `create_model` with your framework's model factory. Keep the
checkpoint self-describing: predict.py and evaluate.py read the class names, image size and
normalisation from it and never guess.

Two forms of one checkpoint (docs/checkpoints.md): the resumable `last.pt` (everything, optimizer
and schedule included) and the weights-only form of `epoch-N.pt`, `best.pt` and a finished job's
`last.pt` (`weights_only`: the same description, no training state), which the contract's upload
worker makes from a snapshot of `last.pt`, off the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import utils

CHECKPOINT_FORMAT = "vision-platform/huggingface/2"
# Format 1 (every file resumable, before weights-only checkpoints) reads the same way.
READABLE_FORMATS = (CHECKPOINT_FORMAT, "vision-platform/huggingface/1")
TRAINING_STATE = ("optimizer", "scheduler", "best_value")  # what the weights-only form leaves out


class TinyCNN(nn.Module):
    """Four conv blocks and a linear head: trains on a CPU in seconds, still a real classifier."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i in range(4):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# name -> (constructor, the keyword arguments EXTRA_ARGS may set)
MODELS: dict[str, tuple[type[nn.Module], frozenset[str]]] = {
    "tinycnn": (TinyCNN, frozenset({"width", "dropout"})),
}


def check_model_args(name: str, extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """Validate MODEL_NAME and EXTRA_ARGS before any download or GPU work."""
    if name not in MODELS:
        raise utils.ConfigError(f"MODEL_NAME={name!r} is not one of {', '.join(sorted(MODELS))}")
    allowed = MODELS[name][1]
    unknown = sorted(set(extra_args or {}) - allowed)
    if unknown:
        raise utils.ConfigError(f"EXTRA_ARGS has unknown keys for {name}: {', '.join(unknown)} "
                                f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
    return dict(extra_args or {})


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    constructor, _ = MODELS[name]
    return constructor(num_classes=num_classes, **kwargs)


def resolve_device(setting: str) -> torch.device:
    """DEVICE: auto, cpu, cuda, cuda:N, N or a list N,M (this trainer uses the first)."""
    wanted = (setting or "auto").strip().lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise utils.ConfigError(f"DEVICE={setting!r} asks for a GPU but CUDA is not available")
    first = wanted.split(",")[0]
    return torch.device(first if first.startswith("cuda") else f"cuda:{int(first)}")


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically: a reader (or a background upload) never sees a half-written file."""
    with utils.atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def weights_only(source: Path, dest: Path) -> None:
    """Write the weights-only form of the checkpoint `source` to `dest`: what evaluate, predict,
    export and fine-tuning read, without the optimizer and schedule a resume needs. Memory-mapped:
    only the tensors kept are read."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, dest)


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    return checkpoint.get("optimizer") is None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # Weights and plain containers only: any checkpoint, trusted or not, loads without running
    # code (the contract's rule; this format needs nothing more).
    checkpoint = utils.load_torch_checkpoint(path)
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found not in READABLE_FORMATS:
        raise utils.CheckpointError(f"{path.name} is not a {CHECKPOINT_FORMAT} checkpoint "
                                    f"(format: {found or 'unknown, another framework'})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device) -> nn.Module:
    model = create_model(checkpoint["model_name"], len(checkpoint["class_names"]),
                         **checkpoint.get("model_kwargs", {}))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
