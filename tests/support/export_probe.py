"""Run a trainer's exported models and its PyTorch model on the same images; print the gaps.

    cd trainers/<slug> && python ../../tests/support/export_probe.py CHECKPOINT IMAGES ARCHIVE...

Run with the trainer's folder as the working directory: the PyTorch side uses the trainer's own
model.py and eval transform (data.build_transform), exactly what predict.py uses. Each archive
is unpacked and run only through what its metadata.json says (onnxruntime for onnx,
torch.jit.load for torchscript, the batch size its input shape allows). The preprocessing
metadata.json describes is also rebuilt with PIL and numpy alone, as a deployment would, and
compared with the trainer's transform. Prints one JSON object:
{"images": N, "<format>": {"max_abs_diff", "calls", "preprocessing_max_abs_diff"}, ...}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the trainer's modules, not this folder's

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data import build_transform  # noqa: E402
from model import load_checkpoint, model_from_checkpoint  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def preprocess_from_metadata(path: Path, metadata: dict) -> np.ndarray:
    """One image as metadata.json describes it: resize, RGB, x * rescale, (x - mean) / std."""
    steps = metadata["preprocessing"]
    assert steps["letterbox"] is False and steps["layout"] == "NCHW"
    size = (steps["resize"]["width"], steps["resize"]["height"])
    with Image.open(path) as image:
        pixels = image.convert(steps["channel_order"]).resize(size, Image.Resampling.BILINEAR)
        x = np.asarray(pixels, dtype=np.float32) * np.float32(steps["rescale_factor"])
    x = (x - np.asarray(steps["mean"], np.float32)) / np.asarray(steps["std"], np.float32)
    return x.transpose(2, 0, 1)


def runner(model_file: Path, metadata: dict):
    if metadata["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(model_file),
                                               providers=["CPUExecutionProvider"])
        name = metadata["input"]["name"]
        return lambda batch: session.run(None, {name: batch})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(model_file), map_location="cpu")

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return run


def main(checkpoint_path: str, images_dir: str, *archives: str) -> dict:
    checkpoint = load_checkpoint(Path(checkpoint_path))
    model = model_from_checkpoint(checkpoint, torch.device("cpu"))
    images = sorted(p for p in Path(images_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    transform = build_transform(checkpoint["image_size"], train=False, mean=checkpoint["mean"],
                                std=checkpoint["std"])
    tensors = []
    for path in images:
        with Image.open(path) as image:
            tensors.append(transform(image.convert("RGB")))
    batch = torch.stack(tensors)
    with torch.inference_mode():
        reference = model(batch).numpy()
    report: dict = {"images": len(images)}
    for archive in archives:
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
            metadata = json.loads((Path(tmp) / "metadata.json").read_text())
            run = runner(Path(tmp) / metadata["file"], metadata)
            fixed = metadata["input"]["shape"][0]
            chunks = [batch] if fixed == -1 else list(batch.split(fixed))
            outputs = np.concatenate([run(chunk.numpy()) for chunk in chunks])
        rebuilt = np.stack([preprocess_from_metadata(p, metadata) for p in images])
        report[metadata["format"]] = {
            "max_abs_diff": float(np.abs(outputs - reference).max()),
            "calls": len(chunks),
            "preprocessing_max_abs_diff": float(np.abs(rebuilt - batch.numpy()).max()),
        }
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
