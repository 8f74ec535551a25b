"""The Ultralytics trainer's pose estimation, the UI's segmentation and pose metric names, and
training from the platform's own annotations (contract sections 2a and 3).

Real servers on loopback (moto S3, the recording backend, MLflow) and tiny real models from
their YAMLs, one epoch each: a pose model trained once on Ultralytics' native pose layout is
evaluated, predicted with and exported to ONNX; detection trains from a platform-annotation zip
whose `split_config` picks the validated images; segmentation and pose train from annotations
stored as a folder (an object prefix). The matching behind OKS and the keypoints' flip order are
unit-tested on their own.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import clean_environ, import_by_path
from tests.support import platform_data
from tests.support.contract import contract
from tests.support.servers import (
    REPO,
    MlflowServer,
    RecordingBackend,
    S3Server,
    closed_port_url,
)
from tests.support.trainer_jobs import EXPORT_SCHEMA, guarded, of_job, run_script, statuses

TRAINER = REPO / "trainers" / "ultralytics"
CORNERS = ["bottom_right", "bottom_left", "top_left", "top_right"]
SKELETON = [[0, 1], [1, 2], [2, 3], [3, 0]]
EXPERIMENT = "ultralytics-pose-tests"
TINY = {"IMAGE_SIZE": "128", "BATCH_SIZE": "8", "PRETRAINED": "false", "DEVICE": "cpu",
        "NUM_WORKERS": "0", "EPOCHS": "1", "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "EXTRA_ARGS": '{"plots": false}'}


# --- the names, declared once -------------------------------------------------------------------


def test_segmentation_and_pose_declare_the_names_the_ui_reads() -> None:
    primary, metrics, per_class = contract.TASK_METRICS["instance_segmentation"]
    assert primary == "mAP50-95(M)"
    assert {"mAP@0.5", "mAP@0.5:0.95", "precision", "recall", "mAP50(M)", "mAP50-95(M)",
            "precision(M)", "recall(M)"} == set(metrics)
    assert {"ap_50(M)", "ap_50_95(M)", "precision(M)", "recall(M)", "ap_50", "support"} <= set(
        per_class)
    primary, metrics, per_class = contract.TASK_METRICS["pose_estimation"]
    assert primary == "mAP50-95(P)" and "OKS" in metrics and "mAP50(P)" in metrics
    assert {"ap_50(P)", "ap_50_95(P)", "precision(P)", "recall(P)"} <= set(per_class)
    manifest = json.loads((TRAINER / "capabilities.json").read_text(encoding="utf-8"))
    tasks = {t["task_type"]: t for t in manifest["tasks"]}
    assert tasks["pose_estimation"]["primary_metric"] == "mAP50-95(P)"
    assert tasks["instance_segmentation"]["primary_metric"] == "mAP50-95(M)"
    layouts = {layout["name"]: set(layout["task_types"]) for layout in manifest["dataset_layouts"]}
    assert layouts["platform_annotations"] == {"object_detection", "instance_segmentation",
                                               "pose_estimation", "image_classification"}
    assert "pose_estimation" in layouts["yolo"]
    assert any(m["name"] == "yolo11n-pose" for m in manifest["models"])


@pytest.fixture(scope="module")
def pose_module():
    module = import_by_path(TRAINER / "pose.py")
    yield module
    sys.modules.pop(module.__name__, None)


def test_flip_order_swaps_left_and_right_names(pose_module) -> None:
    names = ["nose", "left_eye", "right_eye", "Left Ear", "Right Ear", "LEFT_HIP", "RIGHT_HIP"]
    assert pose_module.flip_index(names) == [0, 2, 1, 4, 3, 6, 5]
    assert pose_module.flip_index(CORNERS) == [1, 0, 3, 2]
    assert pose_module.flip_index(["a", "b", "left_only"]) == [0, 1, 2]  # no pair: stays


def test_each_object_is_matched_to_one_prediction_of_its_class(pose_module) -> None:
    oks = np.array([[0.9, 0.8, 0.0],
                    [0.95, 0.1, 0.0],
                    [0.3, 0.2, 0.7]])
    same_class = np.array([[True, True, False],
                           [True, True, False],
                           [True, True, False]])
    # object 1 takes prediction 0 (0.95), object 0 the next best left (0.8); object 2 finds
    # only predictions already taken (prediction 2 is another class): missed, 0
    assert pose_module.matched_similarities(oks, same_class).tolist() == [0.8, 0.95, 0.0]
    assert pose_module.matched_similarities(np.zeros((2, 0)), np.zeros((2, 0), bool)).tolist() \
        == [0.0, 0.0]


# --- end to end ---------------------------------------------------------------------------------


def sample_zip(tmp: Path, task: str, name: str, *, train: int, val: int,
               layout: str = "yolo") -> Path:
    subprocess.run([sys.executable, str(TRAINER / "sample_data.py"), str(tmp), "--task", task,
                    "--name", name, "--train", str(train), "--val", str(val), "--size", "128",
                    "--layout", layout], check=True, capture_output=True, timeout=120)
    return tmp / "datasets" / f"{name}.zip"


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_script(TRAINER, script, env, timeout=600)


@dataclass
class Servers:
    s3: S3Server
    bucket: str  # this module's (the session's S3 server moves on to other buckets)
    backend: RecordingBackend
    mlflow: MlflowServer
    env: dict[str, str]
    tmp: Path

    def put_file(self, key: str, path: Path) -> None:
        self.s3.client.upload_file(str(path), self.bucket, key)

    def get_bytes(self, key: str) -> bytes:
        return self.s3.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def job_env(self, job_id: str, **settings: str) -> dict[str, str]:
        return guarded({**self.env, **self.backend.env(job_id),
                        "WORK_DIR": str(self.tmp / job_id), **settings},
                       self.tmp / f"guard-{job_id}.log")

    def no_network(self, job_id: str) -> None:
        log = self.tmp / f"guard-{job_id}.log"
        assert not log.exists(), log.read_text()

    def json_object(self, key: str) -> dict:
        return json.loads(self.get_bytes(key))


@pytest.fixture(scope="module")
def servers(s3_server: S3Server, mlflow_server: MlflowServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("ultralytics-pose")
    s3_server.start()
    s3_server.enforce_auth(False)
    bucket = s3_server.new_bucket(f"pose-{uuid.uuid4().hex[:8]}")
    backend = RecordingBackend()
    env = {**clean_environ(), **s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", **TINY}
    yield Servers(s3_server, bucket, backend, mlflow_server, env, tmp)
    backend.close()


@pytest.fixture(scope="module")
def pose_trained(servers: Servers) -> subprocess.CompletedProcess:
    """yolo11n-pose, one epoch on the native pose sample (squares, their corners as keypoints)."""
    servers.put_file("datasets/squares-pose.zip", sample_zip(
        servers.tmp / "data", "pose", "squares-pose", train=8, val=4))
    return run("train.py", servers.job_env("pose", DATASET_ID="squares-pose",
                                           MODEL_NAME="yolo11n-pose"))


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def assert_pose_names(body: dict) -> None:
    primary, metrics, per_class = contract.TASK_METRICS["pose_estimation"]
    assert body["task_type"] == "pose_estimation"
    assert set(body["metrics"]) == set(metrics)
    assert body["primary_metric_name"] == primary == "mAP50-95(P)"
    assert body["primary_metric_value"] == body["metrics"]["mAP50-95(P)"]
    assert 0.0 <= body["metrics"]["OKS"] <= 1.0
    assert list(body["per_class_metrics"]) == ["square"]
    assert set(body["per_class_metrics"]["square"]) == set(per_class)


@pytest.mark.slow
def test_pose_trains_with_keypoint_metrics_and_oks(servers: Servers, pose_trained) -> None:
    checked(pose_trained)
    assert statuses(servers.backend, "pose") == ["running", "completed"]
    [validation] = of_job(servers.backend, "validation-results", "pose")
    assert_pose_names(validation)
    # the untrained model still finds some corners near the truth; a missed object counts 0
    assert validation["metrics"]["OKS"] > 0.0
    training = of_job(servers.backend, "training-metrics", "pose")[0]["extra_metrics"]
    assert {"pose_loss", "kobj_loss"} <= set(training)
    # The UI's per-image view: every val image's labelled corners, the predicted ones, its OKS.
    [images] = [c.body for c in servers.backend.calls if c.route == "validation-image-results"
                and c.body[0]["job_id"] == "pose"]
    assert len(images) == 4
    for result in images:
        assert result["validation_result_id"] is not None
        assert result["true_keypoints"], "every sample image holds a square"
        for truth in result["true_keypoints"]:  # each square's 4 corners, in pixels
            assert truth["class_name"] == "square" and len(truth["keypoints"]) == 4
            assert all(0 <= x <= 128 and 0 <= y <= 128 for x, y, _ in truth["keypoints"])
        assert all(len(p["keypoints"]) == 4 for p in result["predicted_keypoints"])
        assert 0.0 <= result["oks"] <= 1.0
    servers.no_network("pose")


@pytest.mark.slow
def test_the_pose_checkpoint_carries_its_keypoints(servers: Servers, pose_trained) -> None:
    checked(pose_trained)
    best = servers.tmp / "pose-best.pt"
    servers.s3.client.download_file(servers.bucket, "checkpoints/job-pose/best.pt", str(best))
    probe = ("import json, sys, torch\n"
             "model = torch.load(sys.argv[1], weights_only=False)['model']\n"
             "print(json.dumps({'shape': list(model.kpt_shape), 'names': model.kpt_names,"
             " 'skeleton': model.kpt_skeleton, 'type': type(model).__name__}))\n")
    env = {**clean_environ(), "YOLO_CONFIG_DIR": str(servers.tmp / "probe-config"),
           "YOLO_OFFLINE": "1"}
    result = checked(subprocess.run([sys.executable, "-c", probe, str(best)], env=env,
                                    capture_output=True, text=True, timeout=120,
                                    cwd=servers.tmp))
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"shape": [4, 3], "names": {"0": CORNERS}, "skeleton": SKELETON,
                     "type": "PoseModel"}


@pytest.mark.slow
def test_pose_evaluate_reports_the_keypoint_names(servers: Servers, pose_trained) -> None:
    checked(pose_trained)
    result = checked(run("evaluate.py", servers.job_env(
        "pose-eval", DATASET_ID="squares-pose", CHECKPOINT_PATH="checkpoints/job-pose/best.pt")))
    [validation] = of_job(servers.backend, "validation-results", "pose-eval")
    assert_pose_names(validation)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == validation["metrics"]
    servers.no_network("pose-eval")


@pytest.mark.slow
def test_pose_predict_writes_keypoints_per_object(servers: Servers, pose_trained) -> None:
    checked(pose_trained)
    image = next((servers.tmp / "pose").rglob("val_00000.jpg"))
    servers.put_file("inputs/pose/one.jpg", image)
    checked(run("predict.py", servers.job_env(
        "pose-predict", CHECKPOINT_PATH="checkpoints/job-pose/best.pt",
        INPUT_PATH="inputs/pose/one.jpg", CONF_THRESHOLD="0.0")))
    output = servers.json_object("artifacts/job-pose-predict/predictions/predictions.json")
    assert output["task_type"] == "pose_estimation"
    assert output["keypoint_names"] == CORNERS and output["skeleton"] == SKELETON
    [prediction] = output["predictions"]
    assert prediction["detections"], "CONF_THRESHOLD=0 keeps the untrained model's guesses"
    for detection in prediction["detections"]:
        assert len(detection["keypoints"]) == len(CORNERS)
        for x, y, confidence in detection["keypoints"]:
            assert 0.0 <= confidence <= 1.0 and np.isfinite([x, y]).all()


@pytest.mark.slow
def test_pose_export_describes_its_keypoints(servers: Servers, pose_trained) -> None:
    import jsonschema

    checked(pose_trained)
    checked(run("export.py", servers.job_env(
        "pose-export", CHECKPOINT_PATH="checkpoints/job-pose/best.pt", EXPORT_FORMAT="onnx")))
    archive = servers.tmp / "pose-export.zip"
    archive.write_bytes(servers.get_bytes("artifacts/job-pose-export/export/export-onnx.zip"))
    with zipfile.ZipFile(archive) as zf:
        metadata = json.loads(zf.read("metadata.json"))
    schema = json.loads(EXPORT_SCHEMA.read_text(encoding="utf-8"))
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(metadata)] == []
    assert metadata["task_type"] == "pose_estimation" and metadata["class_names"] == ["square"]
    assert metadata["keypoints"] == {"shape": [4, 3], "names": CORNERS, "skeleton": SKELETON}
    anchors = sum((128 // stride) ** 2 for stride in (8, 16, 32))
    [output] = metadata["outputs"]
    assert output["shape"] == [1, 4 + 1 + 4 * 3, anchors]  # box, 1 class, 4 x (x, y, v)
    # the ONNX model was run against the PyTorch model on the same batch, and agreed
    assert metadata["verification"]["status"] == "passed"
    servers.no_network("pose-export")


# --- the platform's annotations -----------------------------------------------------------------


@pytest.fixture
def data_module(utils_module, monkeypatch):
    """The trainer's data.py, imported afresh with the template's utils (the same code)."""
    monkeypatch.syspath_prepend(str(TRAINER))
    monkeypatch.setitem(sys.modules, "utils", utils_module)
    for name in ("data", "model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    return importlib.import_module("data")


def test_yolo_labels_are_written_once_per_image_with_objects(data_module, utils_module,
                                                             tmp_path) -> None:
    root = tmp_path / "ds"
    platform_data.detection(root, images=6, boxes=2, size=64)
    (root / "images" / "img_00000.jpg").write_bytes(b"")  # a.png and a.jpg: one label each
    data = json.loads((root / "annotations_detection.json").read_text())
    data["images"].append({"id": 99, "file_name": "img_00000.jpg", "width": 64, "height": 64,
                           "split": "train"})
    data["annotations"].append({"id": 999, "image_id": 99, "category_id": 2,
                                "bbox": [60, 50, 10, 20]})  # reaches outside: clipped
    data["images"].append({"id": 100, "file_name": "img_00009.png", "width": 64, "height": 64,
                           "split": "train"})  # no objects: a background image
    (root / "images" / "img_00009.png").write_bytes(b"")
    (root / "annotations_detection.json").write_text(json.dumps(data))
    dataset = utils_module.read_platform_annotations(root, "object_detection")
    out = data_module.platform_layout(root, "detect", dataset)
    labels = sorted(p.name for p in (out / "labels" / "train").iterdir())
    images = sorted(p.name for p in (out / "images" / "train").iterdir())
    assert len(images) == 7 and len(labels) == 6 and "img_00009.txt" not in labels
    assert {Path(name).stem for name in labels} <= {Path(name).stem for name in images}
    for image in dataset.split("train") + dataset.split("val"):
        if not image.objects:
            continue
        expected = "".join(data_module.label_line("detect", o, image.width, image.height, 0)
                           + "\n" for o in image.objects)
        assert data_module.label_text("detect", image, 0).decode() == expected
    clipped = next(i for i in dataset.images if i.id == "99")
    assert data_module.label_text("detect", clipped, 0) == \
        b"1 0.968750 0.890625 0.062500 0.218750\n"  # x 60..64, y 50..64


def unpack(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(into)
    [root] = [p for p in into.iterdir() if p.is_dir()]
    return root


@pytest.mark.slow
def test_detection_trains_from_an_annotation_zip_on_its_val_split(servers: Servers) -> None:
    root = unpack(sample_zip(servers.tmp / "plat-det", "detect", "shapes-det", train=10, val=2,
                             layout="platform"), servers.tmp / "plat-det" / "unpacked")
    file = root / "annotations_detection.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    # The file's split, not the file names, decides: three "train_*" images are validated.
    chosen = {"2", "5", "9"}
    data["split_config"]["splits"] = {str(image["id"]): "val" if str(image["id"]) in chosen
                                      else "train" for image in data["images"]}
    file.write_text(json.dumps(data), encoding="utf-8")
    expected = len([a for a in data["annotations"] if str(a["image_id"]) in chosen])
    archive = servers.tmp / "plat-det" / "repacked.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, path.relative_to(root.parent).as_posix())
    servers.put_file("datasets/platform-det.zip", archive)

    checked(run("train.py", servers.job_env("plat-det", DATASET_ID="platform-det",
                                            MODEL_NAME="yolo11n")))
    [validation] = of_job(servers.backend, "validation-results", "plat-det")
    assert validation["task_type"] == "object_detection"
    assert validation["class_names"] == ["circle", "square", "triangle"]
    assert list(validation["per_class_metrics"]) == ["circle", "square", "triangle"]
    assert sum(m["support"] for m in validation["per_class_metrics"].values()) == expected
    [run_info] = [r for r in servers.mlflow.runs(EXPERIMENT)
                  if r.data.tags.get("job_id") == "plat-det"]
    assert run_info.data.params["split_source"] == "split_config"
    assert run_info.data.params["split_val_images"] == "3"
    assert run_info.data.params["split_train_images"] == "9"
    servers.no_network("plat-det")


def put_folder(servers: Servers, archive: Path, into: Path, prefix: str) -> None:
    """The sample's files as separate objects under `prefix` (a dataset stored as a folder)."""
    root = unpack(archive, into)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            servers.put_file(prefix + path.relative_to(root).as_posix(), path)


@pytest.mark.slow
def test_segmentation_from_an_annotation_folder_sends_box_and_mask_names(
        servers: Servers) -> None:
    put_folder(servers, sample_zip(servers.tmp / "plat-seg", "segment", "s", train=8, val=3,
                                      layout="platform"),
               servers.tmp / "plat-seg" / "unpacked", "datasets/platform-seg/")
    checked(run("train.py", servers.job_env("plat-seg", DATASET_ID="platform-seg",
                                            TASK_TYPE="instance_segmentation")))
    [validation] = of_job(servers.backend, "validation-results", "plat-seg")
    primary, metrics, per_class = contract.TASK_METRICS["instance_segmentation"]
    assert validation["task_type"] == "instance_segmentation"
    assert set(validation["metrics"]) == set(metrics)
    assert validation["primary_metric_name"] == primary == "mAP50-95(M)"
    assert validation["primary_metric_value"] == validation["metrics"]["mAP50-95(M)"]
    assert list(validation["per_class_metrics"]) == ["circle", "square", "triangle"]
    assert all(set(m) == set(per_class) for m in validation["per_class_metrics"].values())
    servers.no_network("plat-seg")


@pytest.mark.slow
def test_pose_from_an_annotation_folder(servers: Servers) -> None:
    put_folder(servers, sample_zip(servers.tmp / "plat-pose", "pose", "p", train=8, val=3,
                                      layout="platform"),
               servers.tmp / "plat-pose" / "unpacked", "datasets/platform-pose/")
    checked(run("train.py", servers.job_env("plat-pose", DATASET_ID="platform-pose",
                                            TASK_TYPE="pose_estimation")))
    [validation] = of_job(servers.backend, "validation-results", "plat-pose")
    assert_pose_names(validation)
    # the category's keypoints and 1-based COCO skeleton, converted, are in the checkpoint
    checked(run("export.py", servers.job_env(
        "plat-pose-export", CHECKPOINT_PATH="checkpoints/job-plat-pose/best.pt",
        EXPORT_FORMAT="torchscript")))
    archive = servers.tmp / "plat-pose-export.zip"
    archive.write_bytes(servers.get_bytes(
        "artifacts/job-plat-pose-export/export/export-torchscript.zip"))
    with zipfile.ZipFile(archive) as zf:
        metadata = json.loads(zf.read("metadata.json"))
    assert metadata["keypoints"] == {"shape": [4, 3], "names": CORNERS, "skeleton": SKELETON}
    servers.no_network("plat-pose")


# --- bad input: one line, `failed`, exit 3, before any training ----------------------------------


def zip_of(members: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def annotations(keypoints: list[int], splits: dict[str, str]) -> str:
    return json.dumps({
        "categories": [{"id": 1, "name": "square", "keypoints": ["left", "right"],
                        "skeleton": [[1, 2]]}],
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 32, "height": 32}
                   for i in (1, 2)],
        "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10],
                         "keypoints": keypoints} for i in (1, 2)],
        "split_config": {"splits": splits}})


JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")
BAD_INPUTS = {
    "pose data.yaml without kpt_shape": (
        {"data.yaml": "names: [square]\ntrain: images/train\nval: images/val\n",
         "images/train/a.jpg": JPEG, "images/val/b.jpg": JPEG,
         "labels/train/a.txt": "0 .5 .5 .2 .2 .1 .1 2\n", "labels/val/b.txt": ""},
        "data.yaml: pose needs `kpt_shape: [keypoints, 2 or 3]` (found None)"),
    "keypoints of the wrong length": (
        {"annotations_pose.json": annotations([1, 1, 2], {"1": "train", "2": "val"}),
         "images/1.jpg": JPEG, "images/2.jpg": JPEG},
        "annotations_pose.json: annotation 11 of image 1 has 3 keypoint values, expected 6 "
        "(2 x, y, v)"),
    "a val split without images": (
        {"annotations_pose.json": annotations([1, 1, 2, 3, 3, 2], {"1": "train", "2": "train"}),
         "images/1.jpg": JPEG, "images/2.jpg": JPEG},
        "annotations_pose.json: the val split has no images (splits from split_config)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_pose_datasets_fail_with_one_line(case: str, s3: S3Server, backend: RecordingBackend,
                                              job_env: dict, tmp_path: Path) -> None:
    members, reason = BAD_INPUTS[case]
    s3.put_bytes("datasets/bad.zip", zip_of(members))
    env = {**job_env, **TINY, "DATASET_ID": "bad", "TASK_TYPE": "pose_estimation",
           "MLFLOW_TRACKING_URI": closed_port_url()}
    result = run("train.py", guarded(env, tmp_path / "guard.log"))
    assert result.returncode == contract.EXIT_DATA, result.stderr[-3000:]
    assert backend.statuses() == ["running", "failed"]
    assert backend.bodies("status")[-1]["error"] == reason
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work" / "ultralytics").exists(), "training started"


@pytest.mark.slow
def test_classification_from_nested_annotations_in_a_zip(servers: Servers) -> None:
    root = servers.tmp / "plat-cls" / "colours"
    data = platform_data.classification(root, per_class=4, nested=True, background=2)
    servers.put_file("datasets/platform-cls.zip", platform_data.zip_folder(
        root, servers.tmp / "plat-cls" / "colours.zip"))
    checked(run("train.py", servers.job_env("plat-cls", DATASET_ID="platform-cls",
                                            TASK_TYPE="image_classification", IMAGE_SIZE="64",
                                            BATCH_SIZE="3")))
    [validation] = of_job(servers.backend, "validation-results", "plat-cls")
    assert validation["class_names"] == ["red", "green", "blue"]
    # the file's val split (every 4th image of a class), counted in the confusion matrix
    val = [image for image in data["images"] if data["split_config"]["splits"][
        str(image["id"])] == "val"]
    assert sum(map(sum, validation["confusion_matrix"])) == len(val) == 3
    servers.no_network("plat-cls")
