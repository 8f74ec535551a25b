"""The platform UI's log panel and per-image validation view (contract section 3):
`POST /logs` and `POST /validation-image-results`, against the recording backend (which answers
a validation result with its `validation_result_id`, like the real one) and the moto S3 server.

The fast tests run `run_job` of template/utils.py in process; the slow ones run each trainer's
scripts for one tiny epoch and check what a person would see in the UI.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import clean_environ
from tests.support.servers import REPO, RecordingBackend, S3Server, closed_port_url, wait_until

TOKEN = "test-token"
# Not "train"/"evaluate": the same lifecycle without an MLflow run, so these tests stay fast.
KIND = "ui-test"


def env_for(tmp_path: Path, s3: S3Server, backend: RecordingBackend, **extra: str
            ) -> dict[str, str]:
    return {**clean_environ(), **s3.env(), **backend.env("job-1", TOKEN),
            "WORK_DIR": str(tmp_path / "work"), "DATASET_ID": "ds-1", "MODEL_NAME": "tiny",
            **extra}


def run(utils, env, work) -> int:
    return utils.run_job(KIND, utils.TRAIN_SETTINGS, work, framework="test-framework", argv=[],
                         environ=env)


def accuracy_result(utils, value: float):
    return utils.ValidationResult(
        task_type="image_classification", metrics={"accuracy": value},
        primary_metric_name="accuracy", primary_metric_value=value, class_names=["cat", "dog"])


def log_bodies(backend: RecordingBackend) -> list[dict]:
    return [call.body for call in backend.logs]


# --- POST /logs ---------------------------------------------------------------------------------


def test_the_jobs_own_lines_arrive_redacted_with_their_epoch(utils_module, tmp_path, s3,
                                                             backend):
    work_log = logging.getLogger("trainer.work")

    def work(job):
        job.start_epoch(2)
        work_log.info("epoch 2 talks to %s with %s", "the backend", TOKEN)
        work_log.debug("a debug line stays home")
        logging.getLogger("ultralytics").warning("a framework's progress line stays home")
        return None

    assert run(utils_module, env_for(tmp_path, s3, backend), work) == utils_module.EXIT_OK

    bodies = log_bodies(backend)
    [line] = [b for b in bodies if b["message"].startswith("epoch 2 talks")]
    assert line["message"] == "epoch 2 talks to the backend with ***"
    assert line["level"] == "INFO" and line["epoch"] == 2
    assert line["timestamp"].endswith("Z") and line["job_id"] == "job-1"
    assert not any(TOKEN in b["message"] for b in bodies)
    assert not any("stays home" in b["message"] for b in bodies)
    keys = [call.headers["Idempotency-Key"] for call in backend.logs]
    assert all(key.startswith("job-1:log:") for key in keys) and len(set(keys)) == len(keys)
    assert not {call.headers["Idempotency-Key"] for call in backend.calls} & set(keys)
    assert all(call.headers["X-Internal-Auth"] == TOKEN for call in backend.logs)
    assert backend.statuses() == ["running", "completed"]  # log lines are not events


def test_a_flood_of_lines_is_rate_limited_and_never_delays_metrics(utils_module, tmp_path, s3,
                                                                   backend):
    flood, sent_at = 3000, {}
    work_log = logging.getLogger("trainer.work")

    def work(job):
        started = time.monotonic()
        for n in range(flood):
            work_log.info("line %d", n)
        sent_at["flood_s"] = time.monotonic() - started
        sent_at["metrics"] = time.monotonic()
        job.send_training_metrics(1, utils_module.TrainingMetrics(loss=0.5))
        assert wait_until(lambda: backend.bodies("training-metrics"), 5)
        return None

    assert run(utils_module, env_for(tmp_path, s3, backend), work) == utils_module.EXIT_OK

    [metrics] = [c for c in backend.calls if c.route == "training-metrics"]
    assert metrics.time - sent_at["metrics"] < 0.5, "the metric waited behind log lines"
    assert sent_at["flood_s"] < 2.0, "logging blocked the training thread"
    messages = [b["message"] for b in log_bodies(backend)]
    sent = [m for m in messages if m.startswith("line ")]
    assert utils_module.LOG_BURST - 2 <= len(sent) < utils_module.LOG_BURST + 20
    summaries = [m for m in messages if "log line(s) not sent" in m]
    assert summaries and sum(int(m.split()[0]) for m in summaries) == flood - len(sent)


def test_with_a_hung_backend_logging_never_waits_and_the_exit_stays_bounded(
        utils_module, tmp_path, s3, backend):
    work_log = logging.getLogger("trainer.work")
    timings = {}

    def work(job):
        backend.set_hang(True)
        job.send_training_metrics(1, utils_module.TrainingMetrics(loss=0.5))
        started = time.monotonic()
        for n in range(500):
            work_log.warning("line %d", n)
        timings["logging_s"] = time.monotonic() - started
        return None

    env = env_for(tmp_path, s3, backend, CALLBACK_FLUSH_S="4")
    started = time.monotonic()
    code = run(utils_module, env, work)
    elapsed = time.monotonic() - started
    backend.set_hang(False)
    assert code == utils_module.EXIT_OK
    assert timings["logging_s"] < 1.0
    assert elapsed < 4 + 3, f"the exit took {elapsed:.1f} s with CALLBACK_FLUSH_S=4"


# --- POST /validation-image-results -------------------------------------------------------------


def images(tmp_path: Path, count: int) -> list[Path]:
    folder = tmp_path / "val" / "cat"
    folder.mkdir(parents=True)
    paths = []
    for n in range(count):
        path = folder / f"{n:03d}.png"
        Image.new("RGB", (8, 8), (n * 40 % 256, 0, 0)).save(path)
        paths.append(path)
    return paths


def classification_records(utils, paths: list[Path]) -> list[dict]:
    # Images 1 and 3 are mistakes (predicted dog); the rest are right.
    return utils.classification_image_records(
        [(p, 0) for p in paths],
        [([1, 0], [0.9, 0.1]) if i in (1, 3) else ([0, 1], [0.8, 0.2])
         for i in range(len(paths))], ["cat", "dog"])


def test_image_results_follow_their_validation_capped_and_fetchable(utils_module, tmp_path, s3,
                                                                    backend):
    utils = utils_module
    paths = images(tmp_path, 6)

    def work(job):
        for epoch in (1, 2):
            job.end_epoch(epoch, 2, utils.TrainingMetrics(loss=1.0), accuracy_result(utils, 0.5))
        assert job.send_validation_image_results(classification_records(utils, paths)) == 3
        return None

    env = env_for(tmp_path, s3, backend, VAL_IMAGE_RESULTS_MAX="3")
    assert run(utils, env, work) == utils.EXIT_OK

    [call] = [c for c in backend.calls if c.route == "validation-image-results"]
    results = call.body
    assert len(results) == 3
    assert {r["validation_result_id"] for r in results} == {2}  # the last validation's answer
    assert {r["epoch"] for r in results} == {2}
    assert [r["image_index"] for r in results[:2]] == [1, 3]  # the mistakes first
    assert [r["is_correct"] for r in results] == [False, False, True]
    assert results[0]["true_label"] == "cat" and results[0]["predicted_label"] == "dog"
    assert results[0]["top5_predictions"][0] == {"label": "dog", "label_id": 1,
                                                 "confidence": 0.9}
    validation_seqs = [c.body["seq"] for c in backend.calls if c.route == "validation-results"]
    assert all(r["seq"] > validation_seqs[-1] for r in results)
    for result in results:
        assert "image_file" not in result
        key = result["image_path"].removeprefix(f"s3://{s3.bucket}/")
        assert key == f"artifacts/job-job-1/validation-images/val/{result['image_name']}"
        assert s3.get_bytes(key) == paths[result["image_index"]].read_bytes()


def test_no_id_in_the_answer_sends_none_and_says_so_once(utils_module, tmp_path, s3, backend,
                                                         caplog):
    utils = utils_module
    backend.result_ids = False
    paths = images(tmp_path, 4)

    def work(job):
        job.end_epoch(1, 1, utils.TrainingMetrics(loss=1.0), accuracy_result(utils, 0.5))
        job.send_validation_image_results(classification_records(utils, paths))
        return None

    with caplog.at_level(logging.INFO, logger="trainer"):
        assert run(utils, env_for(tmp_path, s3, backend), work) == utils.EXIT_OK
    assert backend.bodies("validation-results") and not backend.bodies(
        "validation-image-results")
    assert len([r for r in caplog.records if "no validation_result_id" in r.getMessage()]) == 1


def test_zero_turns_image_results_off(utils_module, tmp_path, s3, backend):
    utils = utils_module
    paths = images(tmp_path, 2)

    def work(job):
        job.end_epoch(1, 1, utils.TrainingMetrics(loss=1.0), accuracy_result(utils, 0.5))
        assert job.send_validation_image_results(classification_records(utils, paths)) == 0
        return None

    env = env_for(tmp_path, s3, backend, VAL_IMAGE_RESULTS_MAX="0")
    assert run(utils, env, work) == utils.EXIT_OK
    assert not backend.bodies("validation-image-results")
    assert not s3.keys("artifacts/job-job-1/validation-images/")


def test_selection_lists_worst_boxes_first_then_a_sample(utils_module):
    utils = utils_module
    records = [utils.detection_image_record(
        i, Path(f"{i}.jpg"), f"{i}.jpg", [(0, 0, 0, 10, 10)],
        [(0, 0, 0, 10, 10 - i / 5, 0.9)] if i % 5 else [], ["box"]) for i in range(20)]
    chosen = utils.select_image_results(records, 8)
    assert [r["image_index"] for r in chosen[:4]] == [0, 5, 10, 15]  # missed: IoU 0
    assert all(r["iou"] >= utils.REVIEW_IOU for r in chosen[4:])
    assert len({r["image_index"] for r in chosen}) == 8
    assert records[1]["iou"] == 0.98 and records[1]["predicted_boxes"][0]["confidence"] == 0.9
    assert utils.image_iou([], []) == 1.0
    # Room for every image: each once, none repeated (a step under one once repeated some).
    everything = utils.select_image_results(records, 200)
    assert sorted(r["image_index"] for r in everything) == list(range(20))


def test_batches_hold_at_most_one_hundred(utils_module, tmp_path, s3, backend):
    utils = utils_module
    [path] = images(tmp_path, 1)
    records = [{**classification_records(utils, [path])[0], "image_index": i,
                "image_name": f"cat/{i}.png"} for i in range(150)]

    def work(job):
        job.end_epoch(1, 1, utils.TrainingMetrics(loss=1.0), accuracy_result(utils, 0.5))
        job.send_validation_image_results(records)
        return None

    assert run(utils, env_for(tmp_path, s3, backend), work) == utils.EXIT_OK
    assert [len(b) for b in backend.bodies("validation-image-results")] == [100, 50]


# --- each trainer, one tiny epoch ----------------------------------------------------------------

CLASSIFICATION = {"true_label", "true_label_id", "predicted_label", "predicted_label_id",
                  "confidence", "top5_predictions", "is_correct"}
DETECTION = {"true_boxes", "predicted_boxes", "iou"}
COMMON = {"validation_result_id", "epoch", "image_name", "image_index", "image_path", "job_id",
          "seq"}


def sample_zip(trainer: str, root: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "trainers" / trainer / "sample_data.py"),
                    str(root), *args], check=True, capture_output=True, timeout=300)
    [archive] = (root / "datasets").glob("*.zip")
    return archive


def trainer_env(s3: S3Server, backend: RecordingBackend, tmp_path: Path, archive: Path,
                job_id: str, **settings: str) -> dict[str, str]:
    bucket = s3.bucket
    s3.client.upload_file(str(archive), bucket, f"datasets/{archive.stem}.zip")
    return {**clean_environ(), **s3.env(), **backend.env(job_id, TOKEN),
            "WORK_DIR": str(tmp_path / job_id), "DATASET_ID": archive.stem, "DEVICE": "cpu",
            "NUM_WORKERS": "0", "EPOCHS": "1", "VAL_IMAGE_RESULTS_MAX": "5",
            # No tracking server: one warning, tracking off (MLflow is not what is tested here).
            "MLFLOW_TRACKING_URI": closed_port_url(),
            "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", **settings}


def run_trainer(trainer: str, script: str, env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, script], cwd=REPO / "trainers" / trainer, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def check_image_results(s3: S3Server, backend: RecordingBackend, job_id: str, fields: set[str],
                        split: str = "val") -> list[dict]:
    validations = [c for c in backend.calls if c.route == "validation-results"]
    # The recording backend numbers the validation results it stores 1, 2, ... like the real one.
    last = max(n for n, c in enumerate(validations, 1) if c.body["job_id"] == job_id)
    [call] = [c for c in backend.calls if c.route == "validation-image-results"
              and c.body[0]["job_id"] == job_id]
    results = call.body
    assert 0 < len(results) <= 5
    for result in results:
        assert COMMON | fields <= set(result), set(COMMON | fields) - set(result)
        assert result["validation_result_id"] == last
        assert result["epoch"] == validations[last - 1].body["epoch"]
        key = result["image_path"].removeprefix(f"s3://{s3.bucket}/")
        assert key.startswith(f"artifacts/job-{job_id}/validation-images/{split}/")
        assert s3.get_bytes(key)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb",
                                         b"\xff\xd8\xff\xe1")
    assert any(b["message"] for b in log_bodies(backend) if b["job_id"] == job_id)
    return results


def log_epochs(backend: RecordingBackend, job_id: str) -> set:
    """The epochs the job's log lines were sent with (the log panel groups by them)."""
    return {b["epoch"] for b in log_bodies(backend) if b["job_id"] == job_id}


@pytest.mark.slow
def test_pytorch_train_and_evaluate_fill_the_per_image_view(tmp_path, s3, backend):
    archive = sample_zip("pytorch", tmp_path / "data", "--train", "4", "--val", "3")
    env = trainer_env(s3, backend, tmp_path, archive, "pt-train", IMAGE_SIZE="32",
                      BATCH_SIZE="4")
    run_trainer("pytorch", "train.py", env)
    results = check_image_results(s3, backend, "pt-train", CLASSIFICATION)
    assert log_epochs(backend, "pt-train") == {None, 1}
    assert {r["true_label"] for r in results} <= {"circle", "square", "triangle"}
    assert all(len(r["top5_predictions"]) == 3 for r in results)

    best = f"s3://{s3.bucket}/checkpoints/job-pt-train/best.pt"
    run_trainer("pytorch", "evaluate.py", {**env, **backend.env("pt-eval", TOKEN),
                                           "CHECKPOINT_PATH": best,
                                           "WORK_DIR": str(tmp_path / "pt-eval")})
    check_image_results(s3, backend, "pt-eval", CLASSIFICATION)



@pytest.mark.slow
def test_timm_train_and_evaluate_fill_the_per_image_view(tmp_path, s3, backend):
    archive = sample_zip("timm", tmp_path / "data", "--train", "4", "--val", "3", "--test", "2")
    env = trainer_env(s3, backend, tmp_path, archive, "timm-train", MODEL_NAME="test_resnet",
                      PRETRAINED="false", IMAGE_SIZE="32", BATCH_SIZE="8",
                      HF_HOME=str(tmp_path / "hf"))
    run_trainer("timm", "train.py", env)
    results = check_image_results(s3, backend, "timm-train", CLASSIFICATION)
    assert log_epochs(backend, "timm-train") == {None, 1}
    assert {r["true_label"] for r in results} <= {str(d) for d in range(10)}

    best = f"s3://{s3.bucket}/checkpoints/job-timm-train/best.pt"
    run_trainer("timm", "evaluate.py", {**env, **backend.env("timm-eval", TOKEN),
                                        "CHECKPOINT_PATH": best, "SPLIT": "test",
                                        "WORK_DIR": str(tmp_path / "timm-eval")})
    check_image_results(s3, backend, "timm-eval", CLASSIFICATION, split="test")


@pytest.mark.slow
@pytest.mark.parametrize(("task", "model", "fields"), [
    ("detect", "yolo11n", DETECTION),
    ("segment", "yolo11n-seg", {"true_mask_path", "predicted_mask_path", "extra_data"}),
    ("classify", "yolo11n-cls", CLASSIFICATION),
])
def test_ultralytics_train_fills_the_per_image_view(tmp_path, s3, backend, task, model, fields):
    archive = sample_zip("ultralytics", tmp_path / "data", "--task", task, "--name",
                         f"shapes-{task}", "--train", "8", "--val", "4", "--size", "128")
    env = trainer_env(s3, backend, tmp_path, archive, f"yolo-{task}", MODEL_NAME=model,
                      PRETRAINED="false", IMAGE_SIZE="64" if task == "classify" else "128",
                      BATCH_SIZE="8", EXTRA_ARGS='{"plots": false}')
    run_trainer("ultralytics", "train.py", env)
    results = check_image_results(s3, backend, f"yolo-{task}", fields)
    assert log_epochs(backend, f"yolo-{task}") == {None, 1}
    assert len(results) == 4  # every validation image: fewer than VAL_IMAGE_RESULTS_MAX
    if task == "detect":
        for result in results:
            assert result["true_boxes"], "every sample image holds a shape"
            for box in result["true_boxes"] + result["predicted_boxes"]:
                assert box["class_name"] in ("circle", "square", "triangle")
                x1, y1, x2, y2 = box["bbox"]
                assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128  # pixels, not fractions
            assert 0 <= result["iou"] <= 1
        best = f"s3://{s3.bucket}/checkpoints/job-yolo-detect/best.pt"
        run_trainer("ultralytics", "evaluate.py", {
            **env, **backend.env("yolo-eval", TOKEN), "CHECKPOINT_PATH": best,
            "WORK_DIR": str(tmp_path / "yolo-eval"), "VAL_IMAGE_RESULTS_MAX": "2"})
        assert len(check_image_results(s3, backend, "yolo-eval", DETECTION)) == 2
    if task == "segment":
        import io

        import numpy as np

        for result in results:
            assert result["extra_data"]["true_boxes"]
            for field, folder in (("true_mask_path", "true"), ("predicted_mask_path",
                                                              "predicted")):
                key = result[field].removeprefix(f"s3://{s3.bucket}/")
                assert key.startswith(f"artifacts/job-yolo-segment/validation-masks/val/{folder}/")
                mask = np.asarray(Image.open(io.BytesIO(s3.get_bytes(key))))
                assert mask.shape == (128, 128) and mask.max() <= 3  # class id + 1, 0: none
            true_mask = np.asarray(Image.open(io.BytesIO(s3.get_bytes(
                result["true_mask_path"].removeprefix(f"s3://{s3.bucket}/")))))
            assert true_mask.any(), "every sample image holds a shape"


@pytest.mark.slow
def test_a_folder_datasets_images_are_referenced_by_their_own_keys(tmp_path, s3, backend):
    """A folder dataset's images are in the bucket already: `image_path` is each one's own key,
    and nothing is copied under validation-images/."""
    archive = sample_zip("pytorch", tmp_path / "data", "--train", "4", "--val", "3")
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if not name.endswith("/"):
                s3.client.put_object(Bucket=s3.bucket, Key=f"datasets/folder-ds/{name}",
                                     Body=zf.read(name))
    env = trainer_env(s3, backend, tmp_path, archive, "pt-folder", IMAGE_SIZE="32",
                      BATCH_SIZE="4", DATASET_ID="folder-ds")
    run_trainer("pytorch", "train.py", env)
    [call] = [c for c in backend.calls if c.route == "validation-image-results"
              and c.body[0]["job_id"] == "pt-folder"]
    for result in call.body:
        key = result["image_path"].removeprefix(f"s3://{s3.bucket}/")
        assert key.startswith("datasets/folder-ds/") and key.endswith(result["image_name"]), key
        assert s3.get_bytes(key)[:4] == b"\x89PNG"
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="artifacts/job-pt-folder/")
    assert not [o["Key"] for o in listed.get("Contents", []) if "validation-images" in o["Key"]]
