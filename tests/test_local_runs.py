"""Runs by hand never trip over each other, and a checkpoint never silently replaces MODEL_NAME.

run_job of template/utils.py in this process, on local storage with MLflow pointed at a closed
port (one warning, tracking off: no server to wait for); the trainers' own check of a
checkpoint's model runs their train.py as the platform would, stopping before any data is staged.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import clean_environ
from tests.support.servers import REPO, closed_port_url

LOCAL_ID = re.compile(r"^local-\d{8}-\d{6}-[0-9a-f]{4}$")
PLATFORM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the contract's identifier rule


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    root = tmp_path / "bucket"
    root.mkdir()
    return root


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder, where a job without WORK_DIR makes its default work dir."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def local_env(bucket: Path, **extra: str) -> dict[str, str]:
    return {**clean_environ(), "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket),
            "DATASET_ID": "ds", "MLFLOW_TRACKING_URI": closed_port_url(), **extra}


def run(utils, environ: dict[str, str], work) -> int:
    return utils.run_job("train", utils.TRAIN_SETTINGS, work, framework="test", argv=[],
                         environ=environ)


def journal(work_dir: Path) -> list[dict]:
    lines = (work_dir / "callbacks.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def fail_after_uploading_last(utils):
    """A work function that got as far as an uploaded last.pt, then failed."""

    def work(job):
        checkpoint = job.work_dir / "last.pt"
        checkpoint.write_bytes(b"weights")
        job.upload(checkpoint, job.checkpoint_key("last.pt"))
        raise utils.DatasetError("the dataset went away")

    return work


# --- who a local run is ------------------------------------------------------------------------

def test_runs_without_job_id_get_their_own_id_and_work_dir(utils_module, bucket, private_tmp,
                                                           caplog):
    seen = []

    def work(job):
        seen.append((job.job_id, job.work_dir))

    caplog.set_level(logging.INFO, logger="trainer")
    assert run(utils_module, local_env(bucket), work) == utils_module.EXIT_OK
    first_line = next(r.getMessage() for r in caplog.records if r.name == "trainer")
    assert run(utils_module, local_env(bucket), work) == utils_module.EXIT_OK

    (one, one_dir), (two, two_dir) = seen
    assert LOCAL_ID.match(one) and LOCAL_ID.match(two) and one != two
    assert PLATFORM_ID.match(one)
    assert one_dir == (private_tmp / "vision-platform" / f"job-{one}").resolve()
    assert two_dir == (private_tmp / "vision-platform" / f"job-{two}").resolve()
    assert one in first_line and str(one_dir) in first_line, first_line
    assert {e["body"]["job_id"] for e in journal(one_dir)} == {one}
    assert (bucket / "checkpoints").exists() is False  # nothing uploaded, nothing shared


def test_an_explicit_work_dir_is_honoured(utils_module, bucket, tmp_path, private_tmp):
    seen = []
    work_dir = tmp_path / "mine"
    assert run(utils_module, local_env(bucket, WORK_DIR=str(work_dir)),
               lambda job: seen.append(job.work_dir)) == utils_module.EXIT_OK
    assert seen == [work_dir.resolve()]
    assert not (private_tmp / "vision-platform").exists()


def test_a_failed_local_run_is_not_resumed_by_the_next_one(utils_module, bucket, tmp_path):
    """The issue's trap: the same WORK_DIR, no JOB_ID; the second run must start afresh."""
    utils = utils_module
    shared = str(tmp_path / "work")
    assert run(utils, local_env(bucket, WORK_DIR=shared),
               fail_after_uploading_last(utils)) == utils.EXIT_DATA
    failed_id = journal(Path(shared))[0]["body"]["job_id"]
    assert (bucket / "checkpoints" / f"job-{failed_id}" / "last.pt").is_file()

    seen = []

    def work(job):
        seen.append((job.job_id, job.cfg.checkpoint_path, job.unfinished_attempt))

    assert run(utils, local_env(bucket, WORK_DIR=shared), work) == utils.EXIT_OK
    (job_id, checkpoint_path, unfinished), = seen
    assert job_id != failed_id and checkpoint_path is None and not unfinished
    events = [e for e in journal(Path(shared)) if e["body"]["job_id"] == job_id]
    assert [e["seq"] for e in events][:1] == [1]  # its own numbering, not the other job's


def test_only_a_restart_of_the_same_job_id_resumes(utils_module, bucket, tmp_path):
    utils = utils_module
    shared = str(tmp_path / "work")
    env = local_env(bucket, WORK_DIR=shared, JOB_ID="job-a")
    assert run(utils, env, fail_after_uploading_last(utils)) == utils.EXIT_DATA

    seen = {}

    def record(name):
        def work(job):
            seen[name] = job.cfg.checkpoint_path

        return work

    assert run(utils, {**env, "JOB_ID": "job-b"}, record("other")) == utils.EXIT_OK
    assert run(utils, env, record("restart")) == utils.EXIT_OK
    assert seen == {"other": None, "restart": "checkpoints/job-job-a/last.pt"}


def test_a_failure_file_never_outlives_the_next_start(utils_module, bucket, tmp_path):
    utils = utils_module
    env = local_env(bucket, WORK_DIR=str(tmp_path / "work"), JOB_ID="job-f")
    failure = tmp_path / "work" / "failure"
    assert run(utils, env, fail_after_uploading_last(utils)) == utils.EXIT_DATA
    assert failure.read_text().strip() == "the dataset went away"

    during = []
    assert run(utils, {**env, "JOB_ID": "job-g"},
               lambda job: during.append(failure.exists())) == utils.EXIT_OK
    assert during == [False] and not failure.exists()


# --- MLflow-free checks of the explicit-setting rule ------------------------------------------

def test_config_knows_which_settings_were_given(utils_module):
    settings = utils_module.with_defaults(utils_module.TRAIN_SETTINGS, MODEL_NAME="tiny")
    given = utils_module.parse_settings(settings, ["--epochs", "3"],
                                        {"DATASET_ID": "d", "MODEL_NAME": "tiny"})
    defaulted = utils_module.parse_settings(settings, [], {"DATASET_ID": "d"})
    assert given.given("MODEL_NAME") and given.given("EPOCHS") and given.given("DATASET_ID")
    assert not given.given("BATCH_SIZE")
    assert defaulted.model_name == "tiny" and not defaulted.given("MODEL_NAME")


def test_a_checkpoint_of_another_model_conflicts_only_with_a_given_model_name(utils_module):
    utils = utils_module
    settings = utils.with_defaults(utils.TRAIN_SETTINGS, MODEL_NAME="tiny")
    env = {"DATASET_ID": "d", "CHECKPOINT_PATH": "checkpoints/job-1/best.pt"}
    defaulted = utils.parse_settings(settings, [], env)
    utils.check_checkpoint_model(defaulted, "bigger")  # the default gives way to the checkpoint
    given = utils.parse_settings(settings, [], {**env, "MODEL_NAME": "tiny"})
    utils.check_checkpoint_model(given, "tiny")
    with pytest.raises(utils.ConfigError) as raised:
        utils.check_checkpoint_model(given, "bigger")
    assert raised.value.exit_code == utils.EXIT_CONFIG
    assert "MODEL_NAME=tiny" in str(raised.value) and "bigger" in str(raised.value)


# --- the trainers refuse before any work --------------------------------------------------------

TIMM_CHECKPOINT = """
import re, sys, torch
source = open(sys.argv[2] + "/model.py", encoding="utf-8").read()  # no timm import: seconds
CHECKPOINT_FORMAT = re.search(r'CHECKPOINT_FORMAT = "([^"]+)"', source).group(1)
torch.save({"format": CHECKPOINT_FORMAT, "model_name": "test_resnet", "model_kwargs": {},
            "epoch": 1, "epochs": 3, "class_names": ["a", "b"]}, sys.argv[1])
"""

YOLO_CHECKPOINT = """
import sys
from ultralytics.nn.tasks import DetectionModel
import torch
model = DetectionModel("yolo11n.yaml", nc=2, verbose=False)
model.names = {0: "a", 1: "b"}
torch.save({"model": model, "epoch": -1, "train_args": {"model": "best.pt", "task": "detect",
            "epochs": 1, "imgsz": 64}}, sys.argv[1])
"""


@pytest.mark.slow  # each imports its framework twice: ~10 s on 2 busy cores
@pytest.mark.parametrize("trainer, script, wanted, held", [
    ("timm", TIMM_CHECKPOINT, "resnet18", "test_resnet"),
    ("ultralytics", YOLO_CHECKPOINT, "yolo11s", "yolo11n"),
])
def test_a_checkpoint_of_another_model_fails_naming_both(trainer, script, wanted, held,
                                                         bucket, tmp_path):
    folder = REPO / "trainers" / trainer
    checkpoint = tmp_path / "held.pt"
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(folder)], check=True,
                   timeout=120, capture_output=True, env={
                       **clean_environ(), "YOLO_CONFIG_DIR": str(tmp_path / "yolo-config"),
                       "YOLO_OFFLINE": "1"})
    env = local_env(bucket, WORK_DIR=str(tmp_path / "work"), JOB_ID="mismatch",
                    CHECKPOINT_PATH=str(checkpoint), MODEL_NAME=wanted, PRETRAINED="false",
                    OFFLINE="true", DEVICE="cpu", NUM_WORKERS="0", DATASET_ID="never-staged")
    result = subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    reason = (tmp_path / "work" / "failure").read_text().strip()
    assert f"MODEL_NAME={wanted}" in reason and held in reason, reason
    assert not (tmp_path / "work" / "cache").exists(), "the dataset was staged"


# --- --help ------------------------------------------------------------------------------------

def test_help_groups_wraps_between_words_and_ends_with_an_example(utils_module, monkeypatch):
    utils = utils_module
    monkeypatch.setenv("COLUMNS", "60")
    settings = utils.merge_settings(utils.PLATFORM_SETTINGS, utils.TRAIN_SETTINGS)
    text = utils.build_parser(settings, "train.py", "Train a model.").format_help()

    titles = [line.rstrip(":") for line in text.splitlines()
              if line.endswith(":") and not line.startswith(" ")]
    assert titles[:-1] == [*utils.HELP_SECTIONS.values(), "other"], titles
    assert titles[-1].startswith("Example")
    job = text.split(utils.HELP_SECTIONS["job"])[1].split(utils.HELP_SECTIONS["storage"])[0]
    flags = re.findall(r"^  (--[a-z-]+)", job, re.MULTILINE)
    assert flags[:3] == ["--dataset-id", "--checkpoint-path", "--model-name"], flags
    assert "--storage-type" not in job and "--minio-endpoint" in text.split(
        utils.HELP_SECTIONS["storage"])[1].split(utils.HELP_SECTIONS["callbacks"])[0]

    lines = text.rstrip("\n").splitlines()
    example = lines[-1].strip()
    assert example.startswith("STORAGE_TYPE=local") and "python train.py" in example
    assert "--dataset-id sample" in example
    too_wide = [line for line in lines[:-1] if len(line) > 60]
    assert not too_wide, too_wide
    words = set(text.split())
    assert "image_classification," in words and "instance_segmentation," in words
    assert "[env DATASET_ID; str; required]" in " ".join(text.split())


def test_help_example_names_what_the_script_requires(utils_module):
    utils = utils_module
    example = utils.help_example(utils.merge_settings(utils.PLATFORM_SETTINGS,
                                                      utils.EXPORT_SETTINGS), "export.py")
    assert "python export.py --checkpoint-path" in example
    assert "--export-format onnx" in example and "--epochs" not in example


NOISE_PROBE = """
import logging
import runtime

quiet = runtime.FrameworkNoise(verbose=False, colour=False)
loud = runtime.FrameworkNoise(verbose=True, colour=False)


def record(message, level=logging.INFO):
    return logging.LogRecord("ultralytics", level, "x.py", 1, message, (), None)


chatter = ["Creating new Ultralytics Settings v0.0.8 file \\u2705 \\nView Ultralytics Settings",
           "\\x1b[34m\\x1b[1mengine/trainer: \\x1b[0magnostic_nms=False, amp=False, " * 20,
           "\\n                   from  n    params  module      arguments",
           "  0                  -1  1       464  ultralytics.nn.modules.conv.Conv  [3, 16]",
           " 12             [-1, 6]  1         0  ultralytics.nn.modules.conv.Concat [1]",
           "\\nExport complete (1.2s)\\nPredict: yolo predict model=/tmp/gone.onnx"]
assert not any(quiet.filter(record(m)) for m in chatter)
assert all(loud.filter(record(m)) for m in chatter)
kept = record("\\x1b[34m\\x1b[1moptimizer:\\x1b[0m AdamW(lr=0.001)")
assert quiet.filter(kept) and kept.getMessage() == "optimizer: AdamW(lr=0.001)", kept.getMessage()
assert quiet.filter(record("YOLO11n summary: 181 layers, 2,590,425 parameters"))
assert quiet.filter(record("engine/trainer: a warning", logging.WARNING))
print("ok")
"""


def test_ultralytics_chatter_is_dropped_and_uncoloured_unless_debug():
    result = subprocess.run([sys.executable, "-c", NOISE_PROBE], cwd=REPO / "trainers" /
                            "ultralytics", capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr[-3000:]


def test_torchrun_without_job_id_fails_naming_it(utils_module, bucket, tmp_path):
    """Each process would generate its own id: the processes of one job must share JOB_ID."""
    env = local_env(bucket, WORK_DIR=str(tmp_path / "work"), WORLD_SIZE="2", RANK="0",
                    LOCAL_RANK="0")
    assert run(utils_module, env, lambda job: None) == utils_module.EXIT_CONFIG
    assert "JOB_ID is required under torchrun" in (tmp_path / "work" / "failure").read_text()


BEST_PROBE = """
import types
import reporting


class Validating:  # what platform_trainer needs of an Ultralytics trainer: validate's contract
    def __init__(self, values):
        self.values, self.best_fitness = iter(values), None
        self.validator = types.SimpleNamespace(metrics=None)

    def validate(self):
        value = next(self.values)
        self.validator.metrics = types.SimpleNamespace(
            results_dict={"metrics/mAP50-95(B)": value})
        return {"metrics/mAP50-95(B)": round(value, 5)}, value


values = [0.0, 0.0, 2.97e-05, 3.24e-05, 0.2, 0.1, 0.2, 0.3]
trainer = reporting.platform_trainer(Validating, "detect")(values)
improved = []
for _ in values:
    trainer.fitness = trainer.validate()[1]
    improved.append(trainer.improved)
print(improved, trainer.best_fitness)
"""


def test_best_means_better_than_every_earlier_epoch():
    """From scratch mAP sits at 0.0: a tie is not an improvement, a gain below the validator's
    rounding is."""
    result = subprocess.run([sys.executable, "-c", BEST_PROBE], cwd=REPO / "trainers" /
                            "ultralytics", capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == (
        "[True, False, True, True, True, False, False, True] 0.3"), result.stderr[-3000:]
