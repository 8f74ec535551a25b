"""export.py of trainers/pytorch and of a fresh template render: real training, real exports.

Each trainer trains one epoch on a tiny sample (local storage), then exports its best checkpoint
to ONNX (DYNAMIC_BATCH=true) and to TorchScript (a fixed batch of 1), as the platform runs it:
a subprocess configured by environment variables. The exported models are run with
onnxruntime / torch.jit.load on the sample's images and must reproduce the PyTorch model's
logits within ATOL; metadata.json must describe them (schemas/export-metadata.schema.json and
field by field). A format that is not supported, or whose toolchain is missing, fails before
any download with one line, a `failed` status and nothing uploaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import clean_environ
from tests.support.contract import contract
from tests.support.servers import REPO, closed_port_url

ATOL = 1e-4  # most |exported - PyTorch| on the logits (float32), as export.py enforces itself
SCHEMA = REPO / "schemas" / "export-metadata.schema.json"
PROBE = REPO / "tests" / "support" / "export_probe.py"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript"}
EXTRA = {"onnx": {"DYNAMIC_BATCH": "true"}, "torchscript": {}}  # one dynamic, one fixed batch
CLASSES = ["circle", "square", "triangle"]  # sample_data.py's
TRAINERS = ["pytorch", "template"]


def job_environ(bucket: Path, work: Path, job_id: str, **settings: str) -> dict[str, str]:
    """What the platform would set: local storage, CPU, no backend; nothing from this shell."""
    return {**clean_environ(), "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket),
            "JOB_ID": job_id, "WORK_DIR": str(work), "DEVICE": "cpu", "NUM_WORKERS": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # Several jobs share two cores: one thread each, so none spins waiting for another.
            "OMP_NUM_THREADS": "1", **settings}


def run_all(jobs: dict, timeout: float = 600) -> dict[object, subprocess.CompletedProcess]:
    """Run scripts side by side (each is mostly torch start-up), wait for them all.

    `jobs` maps a key to (folder, [script, *args], environment).
    """
    started = {key: subprocess.Popen([sys.executable, *argv], cwd=folder, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for key, (folder, argv, env) in jobs.items()}
    results = {}
    for key, process in started.items():
        out, err = process.communicate(timeout=timeout)
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


def statuses(work: Path) -> list[tuple[str, str | None]]:
    events = [json.loads(line) for line in (work / contract.JOURNAL_NAME).read_text().splitlines()]
    return [(e["body"]["status"], e["body"]["error"]) for e in events if e["route"] == "status"]


def uploads(bucket: Path, job_id: str) -> list[str]:
    """The job's artifacts besides the journal (which goes up whatever the outcome)."""
    folder = bucket / "artifacts" / f"job-{job_id}"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != contract.JOURNAL_NAME)


@dataclass
class Trained:
    folder: Path
    slug: str
    root: Path
    exports: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    probe: subprocess.CompletedProcess | None = None

    @property
    def bucket(self) -> Path:
        return self.root / "bucket"

    @property
    def best_key(self) -> str:
        return "checkpoints/job-train/best.pt"

    def archive(self, fmt: str) -> Path:
        return self.bucket / "artifacts" / f"job-export-{fmt}" / "export" / f"export-{fmt}.zip"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """Both trainers trained for one epoch, each checkpoint exported to both formats, and the
    exports probed (export_probe.py): each step's jobs side by side."""
    root = tmp_path_factory.mktemp("export")
    render = root / "render" / "vision-y"
    subprocess.run([sys.executable, "-m", "copier", "copy", "--defaults", "--quiet", "--data",
                    "slug=vision-y", "template", str(render)], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    trainers = {"pytorch": Trained(REPO / "trainers" / "pytorch", "pytorch", root / "pytorch"),
                "template": Trained(render, "vision-y", root / "template")}
    samples = run_all({name: (t.folder, ["sample_data.py", str(t.bucket), "--train", "8",
                                         "--val", "4"], os.environ)
                       for name, t in trainers.items()})
    for name, result in samples.items():
        assert result.returncode == 0, f"{name}: no sample: {result.stderr[-3000:]}"
    # A tracking server that refuses connections: MLflow off after one warning, which halves
    # the CPU a one-epoch run costs (MLflow has tests of its own).
    training = run_all({name: (t.folder, ["train.py"], job_environ(
        t.bucket, t.root / "train", "train", DATASET_ID="sample", EPOCHS="1", BATCH_SIZE="8",
        IMAGE_SIZE="64", PRETRAINED="false", MLFLOW_TRACKING_URI=closed_port_url()))
        for name, t in trainers.items()})
    for name, result in training.items():
        assert result.returncode == 0, f"{name} did not train: {result.stderr[-3000:]}"
    exports = run_all({(name, fmt): (t.folder, ["export.py"], job_environ(
        t.bucket, t.root / f"export-{fmt}", f"export-{fmt}", CHECKPOINT_PATH=t.best_key,
        EXPORT_FORMAT=fmt, **EXTRA[fmt])) for name, t in trainers.items() for fmt in FILES})
    for (name, fmt), result in exports.items():
        trainers[name].exports[fmt] = result
    # The staged sample (36 images, train and val) through every archive and the PyTorch model.
    probes = run_all({name: (t.folder, [str(PROBE), str(t.bucket / t.best_key),
                                        str(t.root / "train" / "cache"),
                                        *(str(t.archive(fmt)) for fmt in FILES)],
                             {**os.environ, "OMP_NUM_THREADS": "1"})
                      for name, t in trainers.items()
                      if all(r.returncode == 0 for r in t.exports.values())})
    for name, result in probes.items():
        trainers[name].probe = result
    return trainers


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FILES))
@pytest.mark.parametrize("name", TRAINERS)
def test_export_uploads_one_archive_with_the_model_and_its_metadata(
        trained: dict[str, Trained], name: str, fmt: str) -> None:
    t = trained[name]
    result = t.exports[fmt]
    assert result.returncode == 0, result.stderr[-3000:]
    archive = t.archive(fmt)
    assert uploads(t.bucket, f"export-{fmt}") == [f"export/{archive.name}"], "one archive"
    assert result.stdout.strip().endswith(f"export/{archive.name}"), "stdout names the result"
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["metadata.json", FILES[fmt]]
        metadata = json.loads(zf.read("metadata.json"))

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()),
                                                format_checker=jsonschema.FormatChecker())
    assert [e.message for e in validator.iter_errors(metadata)] == []
    batch = -1 if fmt == "onnx" else 1
    assert metadata["format"] == fmt and metadata["file"] == FILES[fmt]
    assert metadata["task_type"] == "image_classification"
    assert metadata["class_names"] == CLASSES
    assert metadata["input"] == {"name": "images", "shape": [batch, 3, 64, 64],
                                 "dtype": "float32", "layout": "NCHW"}
    assert metadata["outputs"][0]["shape"] == [batch, len(CLASSES)]
    assert metadata["dynamic_batch"] is (fmt == "onnx") and metadata["half"] is False
    steps = metadata["preprocessing"]
    assert steps["resize"] == {"height": 64, "width": 64, "interpolation": "bilinear",
                               "antialias": True, "keep_aspect_ratio": False}
    assert (steps["letterbox"], steps["channel_order"], steps["layout"]) == (False, "RGB", "NCHW")
    assert steps["rescale_factor"] == pytest.approx(1 / 255)
    assert steps["mean"] == [0.485, 0.456, 0.406] and steps["std"] == [0.229, 0.224, 0.225]
    source = metadata["source_checkpoint"]
    assert source["path"] == t.best_key and source["model_name"] == "tinycnn"
    assert source["sha256"] == hashlib.sha256((t.bucket / t.best_key).read_bytes()).hexdigest()
    assert source["format"] == f"vision-platform/{t.slug}/2" and source["epoch"] == 1
    assert metadata["trainer"] == t.slug and metadata["job_id"] == f"export-{fmt}"
    assert metadata["framework"] == {"name": "PyTorch", "package": "torch",
                                     "version": importlib.metadata.version("torch")}
    assert metadata["exporter"]["name"] == {"onnx": "torch.onnx.export",
                                            "torchscript": "torch.jit.trace"}[fmt]
    assert metadata["exporter"].get("opset") == (17 if fmt == "onnx" else None)
    check = metadata["verification"]
    assert check["status"] == "passed" and check["max_abs_diff"] <= check["tolerance"] == ATOL
    assert check["batch"] == (2 if fmt == "onnx" else 1)
    assert statuses(t.root / f"export-{fmt}") == [("running", None), ("completed", None)]


@pytest.mark.slow
def test_the_metadata_schema_rejects_what_a_deployment_could_not_use(
        trained: dict[str, Trained]) -> None:
    with zipfile.ZipFile(trained["pytorch"].archive("onnx")) as zf:
        metadata = json.loads(zf.read("metadata.json"))
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    assert list(validator.iter_errors(metadata)) == []
    broken = json.loads(json.dumps(metadata))
    del broken["class_names"]
    broken["input"]["shape"] = [1, 64, 64]
    broken["preprocessing"]["channel_order"] = "RGBA"
    broken["preprocessing"]["std"] = [0.229, 0.224, 0]
    broken["source_checkpoint"]["sha256"] = "not-a-digest"
    broken["verification"] = {"status": "passed"}  # passed, but against what?
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert paths == {"", "input/shape", "preprocessing/channel_order", "preprocessing/std/2",
                     "source_checkpoint/sha256", "verification"}, paths
    # A letterbox (Ultralytics' detection input) keeps the aspect ratio and says how it pads.
    letterboxed = json.loads(json.dumps(metadata))
    letterboxed["preprocessing"]["letterbox"] = True
    assert {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(letterboxed)} == {
        "preprocessing", "preprocessing/resize/keep_aspect_ratio"}
    letterboxed["preprocessing"]["resize"]["keep_aspect_ratio"] = True
    for padding in ({"pad_value": 114}, {"pad_fill": [124, 116, 104]}):
        assert list(validator.iter_errors({**letterboxed, "preprocessing": {
            **letterboxed["preprocessing"], **padding}})) == [], padding


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_exported_models_reproduce_the_pytorch_outputs(trained: dict[str, Trained],
                                                       name: str) -> None:
    t = trained[name]
    for fmt, result in t.exports.items():
        assert result.returncode == 0, f"{fmt}: {result.stderr[-3000:]}"
    probe = t.probe
    assert probe is not None and probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout)
    assert report["images"] == 36
    for fmt in FILES:
        assert report[fmt]["max_abs_diff"] <= ATOL, (fmt, report[fmt])
        # metadata.json's preprocessing, rebuilt with PIL + numpy, is the trainer's transform
        assert report[fmt]["preprocessing_max_abs_diff"] <= 1e-5, (fmt, report[fmt])
    assert report["onnx"]["calls"] == 1, "a dynamic-batch model takes every image at once"
    assert report["torchscript"]["calls"] == 36, "a fixed batch of 1: one image per call"


def test_an_unsupported_format_fails_at_once_and_uploads_nothing(tmp_path: Path) -> None:
    bucket, work = tmp_path / "bucket", tmp_path / "work"
    bucket.mkdir()
    env = job_environ(bucket, work, "bad-format", CHECKPOINT_PATH="checkpoints/job-x/best.pt",
                      EXPORT_FORMAT="tflite")
    result = subprocess.run([sys.executable, "export.py"], cwd=REPO / "trainers" / "pytorch",
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == contract.EXIT_CONFIG, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        "EXPORT_FORMAT='tflite' is not one of onnx, torchscript"), result.stderr
    reason = "EXPORT_FORMAT='tflite' is not one of onnx, torchscript"
    assert statuses(work) == [("failed", reason)]
    assert (work / "failure").read_text().strip() == reason
    assert uploads(bucket, "bad-format") == [] and not (work / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt, settings, reason", [
    ("onnx", {}, "EXPORT_FORMAT=onnx needs the onnx package, which this machine does not have"),
    ("torchscript", {"HALF": "true"},
     "HALF=true needs a CUDA device (DEVICE resolves to the CPU)"),
], ids=["onnx-not-installed", "half-without-gpu"])
def test_a_missing_toolchain_fails_before_any_download(tmp_path: Path, fmt: str,
                                                       settings: dict, reason: str) -> None:
    bucket, work = tmp_path / "bucket", tmp_path / "work"
    key = "checkpoints/job-x/best.pt"
    (bucket / key).parent.mkdir(parents=True)
    (bucket / key).write_bytes(b"never read: the check comes first")
    # A package that fails to import, as when it is not installed.
    (tmp_path / "absent" / "onnx").mkdir(parents=True)
    (tmp_path / "absent" / "onnx" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'onnx'\")\n")
    env = job_environ(bucket, work, "no-toolchain", CHECKPOINT_PATH=key, EXPORT_FORMAT=fmt,
                      PYTHONPATH=str(tmp_path / "absent"), **settings)
    result = subprocess.run([sys.executable, "export.py"], cwd=REPO / "trainers" / "pytorch",
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == contract.EXIT_CONFIG, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(reason), result.stderr[-3000:]
    assert statuses(work) == [("running", None), ("failed", reason)]
    assert not (work / "inputs").exists(), "the checkpoint must not have been downloaded"
    assert uploads(bucket, "no-toolchain") == [] and not (work / "export").exists()


def test_the_archive_is_written_atomically(utils_module, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    folder = tmp_path / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "v.index").write_bytes(b"index")
    dest = tmp_path / "out" / "export-onnx.zip"
    utils_module.write_export_archive(dest, {"model.onnx": model, "saved_model": folder},
                                      {"format": "onnx", "class_names": ["çà", "b"]})
    with zipfile.ZipFile(dest) as zf:
        assert sorted(zf.namelist()) == ["metadata.json", "model.onnx",
                                         "saved_model/saved_model.pb",
                                         "saved_model/variables/v.index"]
        assert json.loads(zf.read("metadata.json"))["class_names"] == ["çà", "b"]

    broken = tmp_path / "out" / "export-torchscript.zip"
    with pytest.raises(FileNotFoundError):  # the model vanished half-way through
        utils_module.write_export_archive(broken, {"model.torchscript": tmp_path / "gone"},
                                          {"format": "torchscript"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export-onnx.zip"], \
        "a failed write leaves neither the archive nor a temporary file"


def test_a_format_names_everything_it_lacks(utils_module) -> None:
    engine = utils_module.ExportFormat("engine", "model.engine",
                                       requires=("tensorrt_not_installed_here",), needs_gpu=True)
    with pytest.raises(utils_module.ConfigError) as raised:
        engine.require(gpu_available=False)
    assert str(raised.value) == ("EXPORT_FORMAT=engine needs the tensorrt_not_installed_here "
                                 "package and a CUDA GPU, which this machine does not have")
    utils_module.ExportFormat("torchscript", "model.torchscript").require(gpu_available=False)
    caps = utils_module.Capabilities("PyTorch", "torch", (), (), (),
                                     (utils_module.EXPORT_ONNX,))
    with pytest.raises(utils_module.ConfigError, match="'coreml' is not supported"):
        caps.export_format("coreml")
