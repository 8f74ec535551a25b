"""Export an Ultralytics checkpoint for deployment, with Ultralytics' own exporter.

CHECKPOINT_PATH + EXPORT_FORMAT (onnx, torchscript, openvino, tflite, coreml or engine; optional
IMAGE_SIZE, DYNAMIC_BATCH, HALF, OPSET) -> artifacts/job-{JOB_ID}/export/export-{EXPORT_FORMAT}.zip:
the exported model (a file, or a folder for openvino and coreml) and metadata.json (input shape,
outputs, letterbox preprocessing, class names in id order, task, source checkpoint, framework and
exporter versions). The model is exported as `YOLO(checkpoint).export(...)` writes it: raw head
outputs, NMS left to the deployment. ONNX and TorchScript exports are run on the same batch as
the PyTorch model before the archive is written and must agree within RELATIVE_TOLERANCE.

A format whose toolchain is not installed (or, for engine, no CUDA GPU) fails before the
checkpoint is downloaded, naming what is missing: Ultralytics would otherwise try to pip-install
it. A failed export uploads nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import utils

FRAMEWORK = "ultralytics"
FORMATS = ("onnx", "torchscript", "openvino", "tflite", "coreml", "engine")
SETTINGS = tuple(dataclasses.replace(s, choices=FORMATS) if s.name == "EXPORT_FORMAT" else s
                 for s in utils.EXPORT_SETTINGS)
# EXPORT_FORMAT -> Ultralytics' format name (TFLite is its LiteRT export since 8.4.83).
ULTRALYTICS_FORMATS = {"tflite": "litert"}
# Ultralytics export arguments each format takes (beyond imgsz, batch, device).
TAKES_DYNAMIC = {"onnx", "torchscript", "openvino", "engine", "coreml"}
TAKES_HALF = {"onnx", "torchscript", "openvino", "engine", "coreml"}
TAKES_OPSET = {"onnx", "engine"}
INPUT_NAME = "images"
VERIFIED = ("onnx", "torchscript")  # the formats run here against the PyTorch model
# Most |exported - PyTorch| allowed on the raw head outputs of the verification batch, times the
# outputs' largest magnitude (at least 1): detection boxes are in input pixels, up to
# IMAGE_SIZE, and the exporter fuses each convolution with its batch norm, which reorders sums.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float16": 1e-2}
PAD_VALUE = 114  # Ultralytics' LetterBox fill


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("export", SETTINGS, export, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="export.py")


def export(job: utils.Job) -> utils.JobResult:
    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress to stdout
        fmt, archive, verification = build_archive(job)
    return utils.publish_export(job, fmt, archive, verification)


def build_archive(job: utils.Job) -> tuple[utils.ExportFormat, Path, dict[str, Any]]:
    """Check, fetch, export, verify; the archive (model + metadata.json) and the verification."""
    import runtime

    cfg = job.cfg
    job.require_trusted_checkpoint()  # before any work: Ultralytics unpickles a whole model
    # Before torch and Ultralytics are imported: no pip installs, no network, private settings.
    runtime.prepare(job.work_dir, job.cache_dir / "weights",
                    cpu_threads=runtime.cpu_threads(cfg.device))
    fmt, device = check_format(cfg)
    import model

    source = job.fetch_checkpoint(trusted_only=True)
    info = model.inspect_checkpoint(source)
    size = cfg.image_size or info.image_size or 640
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=job.work_dir))
    try:
        exported, reference, exporter = run_exporter(cfg, fmt, device, source, info, size,
                                                     staging)
        images = verification_batch(size, 2 if cfg.dynamic_batch else 1, device)
        expected = raw_outputs(reference, images)
        verification = verify(fmt.name, exported, images, expected, half=cfg.half)
        shapes = [[-1 if cfg.dynamic_batch else 1, *e.shape[1:]] for e in expected]
        metadata = describe(job, fmt, info, source, size, shapes, exporter, verification)
        archive = utils.write_export(job, fmt, exported, metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fmt, archive, verification


def check_format(cfg: Any) -> tuple[utils.ExportFormat, str]:
    """The format and the device to export on; ConfigError naming what this machine lacks.

    Runs before anything is downloaded or exported.
    """
    import torch

    import model
    from capabilities import CAPABILITIES

    fmt = CAPABILITIES.export_format(cfg.export_format)
    wanted = model.ultralytics_device(cfg.device)  # ConfigError for a GPU that is not there
    cuda = torch.cuda.is_available()
    device = wanted or ("0" if cuda and (fmt.needs_gpu or cfg.half) else "cpu")
    fmt.require(gpu_available=cuda and device != "cpu")
    if cfg.half and fmt.name not in TAKES_HALF:
        raise utils.ConfigError(f"HALF=true is not supported for EXPORT_FORMAT={fmt.name}")
    if cfg.half and device == "cpu":
        raise utils.ConfigError("HALF=true needs a CUDA device (DEVICE resolves to the CPU)")
    if cfg.dynamic_batch and fmt.name not in TAKES_DYNAMIC:
        raise utils.ConfigError(f"DYNAMIC_BATCH=true is not supported for "
                                f"EXPORT_FORMAT={fmt.name}")
    return fmt, device.split(",")[0]  # one device exports


def run_exporter(cfg: Any, fmt: utils.ExportFormat, device: str, source: Path, info: Any,
                 size: int, staging: Path) -> tuple[Path, Any, dict[str, Any]]:
    """`YOLO(checkpoint).export(...)` in `staging`; (the exported model, the PyTorch model,
    what exported it)."""
    import ultralytics
    from ultralytics import YOLO

    # Ultralytics writes beside the checkpoint, named after it: model.onnx, model_openvino_model/
    checkpoint = staging / "model.pt"
    shutil.copyfile(source, checkpoint)
    yolo = YOLO(str(checkpoint), task=info.task)
    arguments: dict[str, Any] = {
        "format": ULTRALYTICS_FORMATS.get(fmt.name, fmt.name), "imgsz": size, "batch": 1,
        "device": device, "nms": None, "verbose": False}
    if fmt.name in TAKES_DYNAMIC:
        arguments["dynamic"] = cfg.dynamic_batch
    if cfg.half:
        arguments["quantize"] = 16
    if fmt.name in TAKES_OPSET:
        # onnxslim is not a dependency; without it Ultralytics would try to install it
        arguments.update(opset=cfg.opset, simplify=False)
    try:
        written = yolo.export(**arguments)
    except Exception as exc:  # the exporter's toolchains raise anything; the job says which
        raise utils.TrainerError(f"Ultralytics' {fmt.name} export failed: "
                                 f"{type(exc).__name__}: {utils.one_line(str(exc))}") from exc
    written = Path(written) if written else None
    if written is None or not written.exists():
        raise utils.TrainerError(f"Ultralytics' {fmt.name} export wrote nothing")
    exporter = {"name": "ultralytics", "version": ultralytics.__version__,
                "format": arguments["format"], "torch_version": torch_version()}
    if fmt.name == "onnx":
        import onnx

        opsets = [o.version for o in onnx.load(str(written), load_external_data=False)
                  .opset_import if o.domain in ("", "ai.onnx")]
        exporter.update(onnx_version=onnx.__version__, opset=opsets[0] if opsets else cfg.opset)
    return written, reference_model(yolo, device), exporter


def torch_version() -> str:
    import torch

    return str(torch.__version__)


def reference_model(yolo, device: str) -> Any:
    """The checkpoint's PyTorch model in float32, as the exporter saw it: raw head outputs (an
    end-to-end head such as YOLO26's keeps its one-to-many branch, as in the export)."""
    module = yolo.model.float().eval().to(torch_device(device))
    if hasattr(module, "end2end"):
        module.end2end = False
    return module


def torch_device(device: str) -> str:
    return "cpu" if device == "cpu" else f"cuda:{device}"


def verification_batch(size: int, batch: int, device: str):
    """A fixed random batch of images, as if letterboxed and scaled to 0-1."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, size, size, generator=generator).to(torch_device(device))


def raw_outputs(module, images) -> list:
    """The PyTorch model's outputs as the exported model returns them (in eval mode the head
    also returns its training-time predictions, which the export drops)."""
    import torch

    with torch.inference_mode():
        out = module(images)
    if isinstance(out, (list, tuple)):
        first = out[0]
        out = list(first) if isinstance(first, (list, tuple)) else [first]
    else:
        out = [out]
    return [t.float().cpu() for t in out]


def run_exported(fmt: str, exported: Path, images) -> tuple[list, str]:
    """The exported model's outputs on `images`, and the runtime that produced them."""
    import torch

    if fmt == "onnx":
        import onnxruntime

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()
                     and (p != "CUDAExecutionProvider" or images.is_cuda)]
        session = onnxruntime.InferenceSession(str(exported), providers=providers)
        outputs = session.run(None, {INPUT_NAME: images.cpu().numpy()})
        return ([torch.from_numpy(o).float() for o in outputs],
                f"onnxruntime {onnxruntime.__version__} ({providers[0]})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch
        loaded = torch.jit.load(str(exported), map_location=images.device)
    with torch.inference_mode():
        out = loaded(images)
    out = out if isinstance(out, (list, tuple)) else [out]
    return [t.float().cpu() for t in out], f"torch.jit {torch.__version__}"


def verify(fmt: str, exported: Path, images, expected: list, *, half: bool) -> dict[str, Any]:
    """Run the exported model on the batch the PyTorch model gave `expected` for; they must
    agree within the tolerance, relative to the outputs' scale (boxes are in pixels)."""
    if fmt not in VERIFIED:
        return {"status": "skipped", "reason": f"{fmt} has no runtime in this trainer (it runs "
                                               f"{' and '.join(VERIFIED)} exports)"}
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return {"status": "skipped", "reason": "onnxruntime is not installed"}
    actual, runtime = run_exported(fmt, exported, images.half() if half else images)
    if [tuple(a.shape) for a in actual] != [tuple(e.shape) for e in expected]:
        raise utils.TrainerError(
            f"the exported {fmt} model's outputs have shapes {[list(a.shape) for a in actual]}, "
            f"the PyTorch model's {[list(e.shape) for e in expected]}")
    difference = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    scale = max(1.0, *(float(e.abs().max()) for e in expected))
    tolerance = RELATIVE_TOLERANCE["float16" if half else "float32"] * scale
    if not difference <= tolerance:  # NaN fails too
        raise utils.TrainerError(f"the exported {fmt} model's outputs differ from the PyTorch "
                                 f"model's by {difference:.3g} (tolerance {tolerance:.3g})")
    return {"status": "passed", "runtime": runtime, "batch": int(images.shape[0]),
            "max_abs_diff": difference, "tolerance": tolerance}


def describe_outputs(task: str, shapes: list[list[int]], class_count: int) -> list[dict]:
    """The exported model's outputs, as Ultralytics names them."""
    if task == "classify":
        return [{"name": "output0", "shape": shapes[0], "description":
                 "[batch, classes]: class probabilities (softmax) in class-id order"}]
    boxes = (f"per anchor: box centre x, centre y, width, height in input pixels, then "
             f"{class_count} class scores (sigmoid)")
    nms = "confidence threshold and NMS are left to the deployment"
    if task == "segment":
        coefficients = shapes[0][1] - 4 - class_count
        return [{"name": "output0", "shape": shapes[0], "description":
                 f"[batch, 4 + classes + {coefficients}, anchors]: {boxes}, then {coefficients} "
                 f"mask coefficients; {nms}"},
                {"name": "output1", "shape": shapes[1], "description":
                 "[batch, mask coefficients, height / 4, width / 4]: mask prototypes; a "
                 "detection's mask is sigmoid(coefficients @ prototypes) cropped to its box"}]
    if task == "pose":
        values = shapes[0][1] - 4 - class_count
        return [{"name": "output0", "shape": shapes[0], "description":
                 f"[batch, 4 + classes + {values}, anchors]: {boxes}, then the keypoints "
                 f"({values} values: x, y in input pixels and a visibility score (sigmoid) per "
                 f"keypoint, in metadata.json's keypoint order); {nms}"}]
    return [{"name": "output0", "shape": shapes[0], "description":
             f"[batch, 4 + classes, anchors]: {boxes}; {nms}"}]


def preprocessing(task: str, size: int) -> dict[str, Any]:
    """What Ultralytics' predictor does to an image before the model (RGB, 0-1, NCHW)."""
    steps: dict[str, Any] = {"channel_order": "RGB", "layout": "NCHW", "rescale_factor": 1 / 255,
                             "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    if task == "classify":  # classify_transforms: shorter side to size, centre crop
        return {"resize": {"height": size, "width": size, "interpolation": "bilinear",
                           "antialias": True, "keep_aspect_ratio": True},
                "center_crop": {"height": size, "width": size}, "letterbox": False, **steps}
    # LetterBox: scale the longer side to size, pad the rest evenly with grey
    return {"resize": {"height": size, "width": size, "interpolation": "bilinear",
                       "keep_aspect_ratio": True},
            "letterbox": True, "pad_value": PAD_VALUE, **steps}


def describe(job: utils.Job, fmt: utils.ExportFormat, info: Any, source: Path, size: int,
             shapes: list[list[int]], exporter: dict[str, Any], verification: dict[str, Any]
             ) -> dict[str, Any]:
    """metadata.json (utils.export_metadata) with what this trainer's model takes and returns."""
    from capabilities import CAPABILITIES

    metadata = utils.export_metadata(
        job, fmt, CAPABILITIES, source=source, task_type=info.task_type,
        class_names=info.class_names, input_name=INPUT_NAME,
        input_shape=[-1 if job.cfg.dynamic_batch else 1, 3, size, size],
        outputs=describe_outputs(info.task, shapes, len(info.class_names)),
        preprocessing=preprocessing(info.task, size),
        checkpoint={"format": "ultralytics", "model_name": info.model_name,
                    "epoch": info.trained_epochs},
        exporter=exporter, verification=verification)
    if info.keypoints:  # pose: what each keypoint is and how they connect
        metadata["keypoints"] = info.keypoints.as_json()
    return metadata


if __name__ == "__main__":
    utils.exit_process(main())
