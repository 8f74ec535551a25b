"""Trust boundaries (issue 18): the internal token never follows a redirect, no checkpoint runs code
it was not trusted to run, identifiers never become paths, secrets stay out of argv, TLS verifies
with a private CA. Against real loopback servers and the trainers' own scripts, on tiny data.
"""

from __future__ import annotations

import datetime as dt
import http.server
import io
import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conformance.faults import RedirectingBackend
from tests.conftest import clean_environ
from tests.support.servers import LOOPBACK, REPO, RecordingBackend, free_port

TRAINERS = ("pytorch", "timm", "ultralytics")
SCRIPTS = ("train", "evaluate", "predict", "export")
# One script per trainer runs in the quick suite; the rest of the matrix is marked slow.
QUICK = {("pytorch", "export"), ("timm", "predict"), ("ultralytics", "predict")}


# ---------------------------------------------------------------------------------------------
# Inputs: images, datasets, a pickle that runs code
# ---------------------------------------------------------------------------------------------

def png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~0.4 MB grayscale PNG of 20000 x 20000 pixels: Pillow's decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def truncated_jpeg() -> bytes:
    """A JPEG cut off two thirds in: its header reads, its pixels end early."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return data[:len(data) * 2 // 3]


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def folders_dataset(bad: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Image folders, 2 classes x 2 images per split (+ `bad`, by path)."""
    files = {f"{split}/{cls}/{i}.png": png(color=color)
             for split in ("train", "val") for cls, color in (("a", (200, 0, 0)),
                                                               ("b", (0, 0, 200)))
             for i in range(2)}
    return {**files, **(bad or {})}


def yolo_dataset(bad: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The YOLO layout, one class, 2 images per split (+ `bad`, by path, labelled too)."""
    files: dict[str, bytes] = {"data.yaml": b"names: [thing]\ntrain: images/train\n"
                                            b"val: images/val\n"}
    for split in ("train", "val"):
        for i in range(2):
            files[f"images/{split}/{i}.png"] = png((64, 64))
    for name, data in (bad or {}).items():
        files[name] = data
    for name in list(files):
        if name.startswith("images/"):
            files["labels/" + name[7:].rsplit(".", 1)[0] + ".txt"] = b"0 0.5 0.5 0.3 0.3\n"
    return files


class RunsCode:
    """Unpickling this creates `marker`: what a checkpoint carrying code does when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_carrying_checkpoint(marker: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"model": RunsCode(marker), "epoch": 1}, buffer)
    data = buffer.getvalue()
    assert not marker.exists()  # pickling it ran nothing
    return data


# ---------------------------------------------------------------------------------------------
# Running a trainer's script on a local bucket
# ---------------------------------------------------------------------------------------------

def local_bucket(tmp_path: Path, objects: dict[str, bytes]) -> Path:
    root = tmp_path / "bucket"
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def script_env(tmp_path: Path, root: Path, **settings: str) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**clean_environ(), "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(root),
            "WORK_DIR": str(tmp_path / "work"), "TMPDIR": str(tmp_path / "tmp"),
            "HOME": str(tmp_path), "DEVICE": "cpu", "NUM_WORKERS": "0", "PRETRAINED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true", "IMAGE_SIZE": "32", "BATCH_SIZE": "2",
            "EPOCHS": "1", "TERMINATION_LOG": str(tmp_path / "termination-log"), **settings}


def run(trainer: str, script: str, env: dict[str, str], *args: str,
        timeout: float = 300) -> subprocess.CompletedProcess:
    folder = REPO / "trainers" / trainer
    return subprocess.run([sys.executable, str(folder / f"{script}.py"), *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line]


def one_error_line(result: subprocess.CompletedProcess, exit_code: int) -> str:
    """The run failed with `exit_code`, one error line and no traceback; that line."""
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, errors
    return errors[0]


def trainer_settings(trainer: str, script: str) -> dict[str, str]:
    settings = {"DATASET_ID": "yolo" if trainer == "ultralytics" else "folders",
                "INPUT_PATH": "uploads/image.png", "EXPORT_FORMAT": "onnx"}
    if trainer == "timm":
        settings["MODEL_NAME"] = "test_resnet"
    if trainer == "ultralytics":
        settings["OFFLINE"] = "true"
    if script == "train" and trainer == "pytorch":
        settings["CHECKPOINT_EVERY"] = "1"
    return settings


# ---------------------------------------------------------------------------------------------
# Redirects: the token is sent once, to the configured origin only
# ---------------------------------------------------------------------------------------------

def test_a_redirecting_backend_gets_the_token_once_and_the_other_origin_never(
        utils_module: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = RecordingBackend("elsewhere")
    redirecting = RedirectingBackend("job-1", other.url + "/status")
    try:
        client = utils_module.CallbackClient(redirecting.url, "secret-token-1", "job-1",
                                             tmp_path / "callbacks.jsonl")
        for epoch in (1, 2, 3):
            client.send("POST", "training-metrics", {"epoch": epoch})
        client.send("PATCH", "status", {"status": "completed"})
        client.close(5.0)
    finally:
        redirecting.close()
        other.close()
    assert len(redirecting.rejected) == 1  # the original request, nothing after it
    assert redirecting.rejected[0].headers["X-Internal-Auth"] == "secret-token-1"
    assert other.calls == [] and other.rejected == []  # the token never reached it
    warnings = [r.getMessage() for r in caplog.records if "redirect" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "307" in warnings[0] and f"127.0.0.1:{other.port}" in warnings[0]
    assert "secret-token-1" not in caplog.text
    journal = (tmp_path / "callbacks.jsonl").read_text().splitlines()
    assert len(journal) == 4  # every event kept


# ---------------------------------------------------------------------------------------------
# Checkpoints: code runs only from a trusted source
# ---------------------------------------------------------------------------------------------

MATRIX = [pytest.param(t, s, marks=() if (t, s) in QUICK else pytest.mark.slow)
          for t in TRAINERS for s in SCRIPTS]


@pytest.mark.parametrize(("trainer", "script"), MATRIX)
def test_an_uploaded_checkpoint_that_runs_code_is_refused(tmp_path: Path, trainer: str,
                                                          script: str) -> None:
    marker = tmp_path / "code-ran"
    root = local_bucket(tmp_path, {
        "uploads/evil.pt": code_carrying_checkpoint(marker),
        "uploads/image.png": png(),
        "datasets/folders.zip": zipped(folders_dataset()),
        "datasets/yolo.zip": zipped(yolo_dataset())})
    env = script_env(tmp_path, root, CHECKPOINT_PATH="uploads/evil.pt",
                     **trainer_settings(trainer, script))
    result = run(trainer, script, env)
    line = one_error_line(result, 3)
    assert "refused" in line and "evil.pt" in line, line
    assert not marker.exists(), f"{trainer} {script}.py ran the checkpoint's code"
    failure = (tmp_path / "work" / "failure").read_text().splitlines()
    assert len(failure) == 1 and "refused" in failure[0]
    if trainer == "ultralytics":  # refused before anything was fetched
        assert "TRUSTED_CHECKPOINT_PREFIXES" in line
        assert not (tmp_path / "work" / "cache").exists()
        assert not (tmp_path / "work" / "inputs").exists()


@pytest.mark.parametrize("where", ["checkpoints/job-old/evil.pt", "uploads/vetted/evil.pt"])
def test_the_same_bytes_from_a_trusted_prefix_load_as_before(tmp_path: Path, where: str) -> None:
    """Ultralytics unpickles a trusted checkpoint in full (its format needs it): the code runs,
    as it did before this rule, and the file is then reported as no Ultralytics checkpoint."""
    marker = tmp_path / "code-ran"
    root = local_bucket(tmp_path, {where: code_carrying_checkpoint(marker),
                                   "uploads/image.png": png()})
    env = script_env(tmp_path, root, CHECKPOINT_PATH=where,
                     TRUSTED_CHECKPOINT_PREFIXES="uploads/vetted",
                     **trainer_settings("ultralytics", "predict"))
    line = one_error_line(run("ultralytics", "predict", env), 3)
    assert "not an Ultralytics checkpoint" in line, line
    assert marker.exists()


@pytest.mark.slow
def test_a_weights_only_trainer_refuses_code_even_from_a_trusted_prefix(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    root = local_bucket(tmp_path, {"checkpoints/job-old/evil.pt": code_carrying_checkpoint(marker),
                                   "uploads/image.png": png()})
    env = script_env(tmp_path, root, CHECKPOINT_PATH="checkpoints/job-old/evil.pt",
                     **trainer_settings("timm", "predict"))
    line = one_error_line(run("timm", "predict", env), 3)
    assert "refused" in line and not marker.exists()


def test_checkpoint_trust_follows_the_source(utils_module: ModuleType, tmp_path: Path) -> None:
    storage = utils_module.Storage("s3", "platform")
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    trust = utils_module.checkpoint_trust
    prefixes = "uploads/vetted, s3://models/released/"
    assert trust(storage, "checkpoints/job-1/last.pt", prefixes)
    assert trust(storage, "s3://platform/checkpoints/job-1/best.pt", prefixes)
    assert trust(storage, str(local), prefixes) == "a local file"
    assert trust(storage, "uploads/vetted/a.pt", prefixes)
    assert trust(storage, "s3://models/released/yolo.pt", prefixes)
    for untrusted in ("uploads/a.pt", "uploads/vetted-not/a.pt", "s3://other/checkpoints/a.pt",
                      "checkpoints/../uploads/a.pt", "s3://models/a.pt"):
        assert trust(storage, untrusted, prefixes) is None, untrusted


# ---------------------------------------------------------------------------------------------
# Identifiers never become paths; the local backend stays in its root
# ---------------------------------------------------------------------------------------------

def parse(utils_module: ModuleType, environ: dict[str, str], argv: list[str] | None = None):
    settings = utils_module.merge_settings(utils_module.PLATFORM_SETTINGS,
                                           utils_module.TRAIN_SETTINGS)
    return utils_module.parse_settings(settings, argv or [], environ)


@pytest.mark.parametrize("bad", ["../../../../x", "a/b", "..", ".hidden", "-x", "a b", "x" * 129,
                                 "job\n1"])
def test_a_path_like_identifier_is_a_configuration_error(utils_module: ModuleType,
                                                         bad: str) -> None:
    for name in ("JOB_ID", "DATASET_ID"):
        env = {"DATASET_ID": "d", "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": "/b", name: bad}
        with pytest.raises(utils_module.ConfigError, match=f"{name}=.*not a valid identifier"):
            parse(utils_module, env)
        with pytest.raises(utils_module.ConfigError, match="not a valid identifier"):
            utils_module.check_identifier(name, bad)  # the rule itself, as stage_dataset uses it


@pytest.mark.parametrize("good", ["local-20261207-051230-3f2a", "job_1.2", "A", "x" * 128])
def test_ordinary_identifiers_are_accepted(utils_module: ModuleType, good: str) -> None:
    cfg = parse(utils_module, {"DATASET_ID": good, "JOB_ID": good, "STORAGE_TYPE": "local",
                               "LOCAL_STORAGE_ROOT": "/b"})
    assert cfg.job_id == good and cfg.dataset_id == good
    with pytest.raises(utils_module.ConfigError):  # `$` would let a trailing newline through
        utils_module.check_identifier("DATASET_ID", good + "\n")


def test_a_job_id_with_dots_is_refused_before_any_work(tmp_path: Path) -> None:
    root = local_bucket(tmp_path, {"datasets/folders.zip": zipped(folders_dataset())})
    env = script_env(tmp_path, root, JOB_ID="../../../../escaped", DATASET_ID="folders")
    del env["WORK_DIR"]  # the default work dir is where the id would have escaped to
    line = one_error_line(run("pytorch", "train", env), 2)
    assert "JOB_ID" in line and "not a valid identifier" in line
    default_root = tmp_path / "tmp" / "vision-platform"
    assert not (default_root / "job-../../../../escaped").resolve().exists()
    # The failure record only, in the generated id's own folder (a run without a valid JOB_ID)
    assert [p.name.startswith("job-local-") for p in default_root.iterdir()] == [True]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "datasets/folders.zip"]


def test_the_local_backend_refuses_keys_outside_its_root(utils_module: ModuleType,
                                                         tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    (root / "datasets").mkdir(parents=True)
    (root / "datasets" / "ok.txt").write_text("ok")
    secret = tmp_path / "outside.txt"
    secret.write_text("not in the bucket")
    storage = utils_module.Storage("local", "b", local_root=root)
    source = tmp_path / "payload.txt"
    source.write_text("payload")
    for key in ("../outside.txt", "datasets/../../outside.txt"):
        with pytest.raises(utils_module.StorageError, match="outside LOCAL_STORAGE_ROOT"):
            storage.download(key, tmp_path / "got.txt")
        with pytest.raises(utils_module.StorageError, match="outside LOCAL_STORAGE_ROOT"):
            storage.upload(source, key)
        with pytest.raises(utils_module.StorageError, match="outside LOCAL_STORAGE_ROOT"):
            storage.copy("datasets/ok.txt", key)
    with pytest.raises(utils_module.StorageError, match="outside LOCAL_STORAGE_ROOT"):
        storage.list("../")
    with pytest.raises(utils_module.StorageError, match="outside LOCAL_STORAGE_ROOT"):
        storage.head(secret.as_uri())
    with pytest.raises(utils_module.StorageError, match="not found"):  # a key in the root
        storage.download(str(secret), tmp_path / "got.txt")
    assert secret.read_text() == "not in the bucket" and not (tmp_path / "got.txt").exists()
    assert storage.download("datasets/../datasets/ok.txt", tmp_path / "ok.txt").read_text() == "ok"


# ---------------------------------------------------------------------------------------------
# Images: one policy, checked before training
# ---------------------------------------------------------------------------------------------

def test_image_problems_are_named(utils_module: ModuleType, tmp_path: Path) -> None:
    files = {"ok.png": png(), "ok.jpg": jpeg(), "bomb.png": bomb_png(),
             "truncated.jpg": truncated_jpeg(), "truncated.png": png()[:-30],
             "garbage.png": os.urandom(256), "large.png": bomb_png(9500, 9500)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    problem = utils_module.image_problem
    assert problem(tmp_path / "ok.png") is None and problem(tmp_path / "ok.jpg") is None
    assert "decompression bomb" in problem(tmp_path / "bomb.png")
    assert "oversized" in problem(tmp_path / "large.png")  # just past the limit
    from PIL import Image

    unlimited, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a library lifted it
    try:
        assert "oversized: 9500x9500" in problem(tmp_path / "large.png")  # our own limit holds
    finally:
        Image.MAX_IMAGE_PIXELS = unlimited
    assert "truncated" in problem(tmp_path / "truncated.jpg")
    assert "unreadable" in problem(tmp_path / "truncated.png")
    assert "unreadable" in problem(tmp_path / "garbage.png")


def test_the_verdict_is_cached_with_the_staged_dataset(utils_module: ModuleType,
                                                       tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / "data").mkdir(parents=True)
    (entry / "complete.json").write_text("{}")
    images = []
    for name, data in (("good.png", png()), ("bad.jpg", truncated_jpeg())):
        (entry / "data" / name).write_bytes(data)
        images.append(entry / "data" / name)
    with pytest.raises(utils_module.DatasetError, match=r"1 bad image.*bad\.jpg: truncated"):
        utils_module.check_images(images, root=entry / "data")
    assert (entry / utils_module.IMAGE_CHECK_FILE).is_file()
    (entry / "data" / "bad.jpg").write_bytes(jpeg())  # the cache, not the file, decides now
    kept = utils_module.check_images(images, root=entry / "data", max_bad=1)
    assert kept == [images[0]]


BAD_FOLDERS = {"train/a/bomb.png": bomb_png(), "val/b/cut.jpg": truncated_jpeg()}
BAD_YOLO = {"images/train/bomb.png": bomb_png(), "images/val/cut.jpg": truncated_jpeg()}


@pytest.mark.slow  # a train.py per trainer (~25 s each here); check_images is tested above
@pytest.mark.parametrize("trainer", TRAINERS)
def test_bad_images_fail_the_dataset_check_in_one_line(tmp_path: Path, trainer: str) -> None:
    files = yolo_dataset(BAD_YOLO) if trainer == "ultralytics" else folders_dataset(BAD_FOLDERS)
    root = local_bucket(tmp_path, {f"datasets/{trainer_settings(trainer, 'train')['DATASET_ID']}"
                                   ".zip": zipped(files)})
    env = script_env(tmp_path, root, **trainer_settings(trainer, "train"))
    line = one_error_line(run(trainer, "train", env), 3)
    assert "2 bad image(s)" in line and "MAX_BAD_IMAGES=0" in line, line
    assert "bomb.png: oversized" in line and "cut.jpg: truncated" in line, line
    assert not (tmp_path / "work" / "checkpoints").exists() or not any(
        (tmp_path / "work" / "checkpoints").iterdir())


SKIP_CHECK = {
    "pytorch": "import data; s = data.load_splits(ROOT, 32, 2); "
               "print(json.dumps(sorted(p.name for p, _ in s.train.items + s.val.items)))",
    "timm": "import data; s = data.load_splits(ROOT, max_bad_images=2); "
            "print(json.dumps(sorted(p.name for p, _ in s.train + s.val)))",
    "ultralytics": "import data; d = data.prepare_dataset(ROOT, 'detect', WORK, 2); "
                   "import yaml; y = yaml.safe_load(open(d.data)); "
                   "print(json.dumps(sorted(Path(l).name for s in ('train', 'val') "
                   "for l in open(y[s]).read().split())))",
}


@pytest.mark.parametrize("trainer", [pytest.param(t, marks=() if t == "ultralytics"
                                                  else pytest.mark.slow) for t in TRAINERS])
def test_bad_images_within_max_bad_images_are_skipped_with_one_warning(tmp_path: Path,
                                                                        trainer: str) -> None:
    files = yolo_dataset(BAD_YOLO) if trainer == "ultralytics" else folders_dataset(BAD_FOLDERS)
    root = tmp_path / "dataset"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    code = ("import json, logging, sys; from pathlib import Path; import utils; "
            "utils.configure_logging(); "
            f"ROOT = Path({str(root)!r}); WORK = Path({str(tmp_path / 'work')!r}); "
            + SKIP_CHECK[trainer])
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "trainers" / trainer,
                            capture_output=True, text=True, timeout=120,
                            env={**clean_environ(), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    kept = json.loads(result.stdout.strip().splitlines()[-1])
    assert "bomb.png" not in kept and "cut.jpg" not in kept
    assert len(kept) == (4 if trainer == "ultralytics" else 8)  # every good image stays
    warnings = [line for line in result.stderr.splitlines() if "skipping" in line]
    assert len(warnings) == 1 and "bomb.png" in warnings[0] and "cut.jpg" in warnings[0]


# ---------------------------------------------------------------------------------------------
# Secrets: never flags; NAME_FILE
# ---------------------------------------------------------------------------------------------

def test_every_secret_flag_is_refused_naming_its_variable(utils_module: ModuleType) -> None:
    secrets = [s for s in utils_module.PLATFORM_SETTINGS if s.secret]
    assert {"INTERNAL_AUTH_TOKEN", "MINIO_SECRET_KEY", "R2_SECRET_ACCESS_KEY"} <= {
        s.name for s in secrets}
    env = {"DATASET_ID": "d", "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": "/b"}
    for setting in secrets:
        for argv in ([setting.flag, "s3cr3t-value"], [f"{setting.flag}=s3cr3t-value"]):
            with pytest.raises(utils_module.ConfigError) as refused:
                parse(utils_module, env, argv)
            message = str(refused.value)
            assert setting.flag in message and f"{setting.name}_FILE" in message
            assert "s3cr3t-value" not in message


def test_a_secret_flag_fails_the_script_and_help_says_why(tmp_path: Path) -> None:
    env = script_env(tmp_path, tmp_path / "bucket", DATASET_ID="folders")
    line = one_error_line(run("pytorch", "train", env, "--internal-auth-token", "tok3n-value"), 2)
    assert "INTERNAL_AUTH_TOKEN" in line and "tok3n-value" not in line
    shown = run("pytorch", "train", env, "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "Secrets are not accepted as flags" in text and "NAME_FILE" in text
    assert "--internal-auth-token" not in text and "--minio-secret-key" not in text


def test_a_secret_from_its_file_is_used_and_redacted(utils_module: ModuleType, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-123\n")
    backend = RecordingBackend("job-f")
    environ = {**clean_environ(), **backend.env("job-f"), "STORAGE_TYPE": "local",
               "LOCAL_STORAGE_ROOT": str(tmp_path / "bucket"), "WORK_DIR": str(tmp_path / "w"),
               "INTERNAL_AUTH_TOKEN_FILE": str(token_file), "LOG_LEVEL": "DEBUG"}
    del environ["INTERNAL_AUTH_TOKEN"]

    def work(job):
        utils_module.log.info("token is %s", job.cfg.internal_auth_token)
        return utils_module.JobResult()

    try:
        code = utils_module.run_job("predict", (), work, framework="test", argv=[],
                                    environ=environ)
    finally:
        backend.close()
    assert code == 0
    assert {c.headers["X-Internal-Auth"] for c in backend.calls} == {"file-token-123"}
    logged = capsys.readouterr().err  # what the job's log handler wrote
    assert "token is ***" in logged and "'INTERNAL_AUTH_TOKEN': '<redacted>'" in logged
    assert "file-token-123" not in logged
    cfg = parse(utils_module, {"DATASET_ID": "d", "STORAGE_TYPE": "minio", "MINIO_ENDPOINT": "http://x",
                               "MINIO_ACCESS_KEY": "k", "MINIO_SECRET_KEY_FILE": str(token_file)})
    assert cfg.minio_secret_key == "file-token-123"
    assert cfg.redacted()["MINIO_SECRET_KEY"] == "<redacted>"
    assert "file-token-123" in cfg.secret_values()


def test_a_secret_file_that_cannot_be_read_or_doubles_a_value_is_an_error(
        utils_module: ModuleType, tmp_path: Path) -> None:
    base = {"DATASET_ID": "d", "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": "/b"}
    with pytest.raises(utils_module.ConfigError, match="INTERNAL_AUTH_TOKEN_FILE=.*cannot be read"):
        parse(utils_module, {**base, "INTERNAL_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "t").write_text("x-token")
    with pytest.raises(utils_module.ConfigError, match="both INTERNAL_AUTH_TOKEN and"):
        parse(utils_module, {**base, "INTERNAL_AUTH_TOKEN": "y-token",
                             "INTERNAL_AUTH_TOKEN_FILE": str(tmp_path / "t")})


# ---------------------------------------------------------------------------------------------
# TLS with a private CA
# ---------------------------------------------------------------------------------------------

def private_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test private CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
              .issuer_name(ca_name).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(
                  [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class HttpsBackend:
    """An HTTPS server on loopback answering 200 {"ok": true} and counting the requests that
    got through the TLS handshake."""

    def __init__(self, cert: Path, key: Path):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append(self.path)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PATCH = do_GET

            def do_HEAD(self) -> None:  # an S3 HEAD Object: what storage.head() needs
                server.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.send_header("ETag", '"abc"')
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, free_port()), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://{LOOPBACK}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[HttpsBackend, Path]]:
    ca, cert, key = private_ca(tmp_path)
    server = HttpsBackend(cert, key)
    yield server, ca
    server.close()


def deliver(utils_module: ModuleType, url: str, journal: Path, **kwargs) -> None:
    client = utils_module.CallbackClient(url + "/api/job-t", "tls-token", "job-t", journal,
                                         **kwargs)
    client.send("POST", "training-metrics", {"epoch": 1})
    client.send("PATCH", "status", {"status": "completed"})
    client.close(5.0)


def test_callbacks_to_a_private_ca_fail_in_one_line_then_work_with_the_bundle(
        utils_module: ModuleType, https, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, ca = https
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    deliver(utils_module, server.url, tmp_path / "a.jsonl")
    assert server.requests == []
    failed = [r for r in caplog.records if "certificate" in r.getMessage()]
    assert len(failed) == 1 and server.url in failed[0].getMessage()
    assert failed[0].exc_info is None and "Traceback" not in caplog.text
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2  # journaled all the same
    deliver(utils_module, server.url, tmp_path / "b.jsonl", ca_bundle=str(ca))  # CA_BUNDLE
    assert server.requests == ["/api/job-t/training-metrics", "/api/job-t/status"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))  # the standard variable works too
    deliver(utils_module, server.url, tmp_path / "c.jsonl")
    assert len(server.requests) == 4


def test_mlflow_and_storage_name_a_certificate_failure_in_one_line(
        utils_module: ModuleType, https, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, ca = https
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    tracker = utils_module.Tracker(server.url, "e", tmp_path)
    assert tracker._reachable() is False
    assert "certificate verification failed" in tracker.disabled_reason
    assert utils_module.Tracker(server.url, "e", tmp_path, ca_bundle=str(ca))._reachable()
    assert server.requests == ["/health"]
    storage = utils_module.Storage("minio", "b", endpoint=server.url, access_key="k",
                                   secret_key="s")
    with pytest.raises(utils_module.StorageError) as failed:
        storage.head("datasets/x.zip")
    assert "certificate verification failed" in str(failed.value)
    assert server.url in str(failed.value) and "\n" not in str(failed.value)
    trusting = utils_module.Storage("minio", "b", endpoint=server.url, access_key="k",
                                    secret_key="s", ca_bundle=str(ca))
    assert trusting.head("datasets/x.zip").etag == "abc"
    assert server.requests == ["/health", "/b/datasets/x.zip"]


def test_an_input_key_with_dots_is_never_written_outside_the_inputs(utils_module: ModuleType,
                                                                    s3, tmp_path: Path) -> None:
    s3.put_bytes("inputs/batch/ok.png", png())
    s3.put_bytes("inputs/batch/../../../../escaped.png", png())
    assert "inputs/batch/../../../../escaped.png" in s3.keys("inputs/")  # stored as named
    env = s3.env()
    storage = utils_module.Storage("minio", s3.bucket, endpoint=s3.endpoint,
                                   access_key=env["MINIO_ACCESS_KEY"],
                                   secret_key=env["MINIO_SECRET_KEY"])
    dest = tmp_path / "a" / "b" / "c" / "inputs"
    with pytest.raises(utils_module.DatasetError, match="would be written outside"):
        utils_module.stage_inputs(storage, "inputs/batch/", dest)
    assert not list(tmp_path.rglob("escaped.png"))


def test_the_pre_launch_validator_applies_the_identifier_rule(utils_module: ModuleType) -> None:
    manifest = json.loads((REPO / "trainers" / "pytorch" / "capabilities.json").read_text())
    problems = utils_module.validate_job_settings(manifest, "train", {"DATASET_ID": "../x"})
    assert problems == ["DATASET_ID='../x' is not a valid identifier (it names paths and "
                        "storage keys)"]
    assert utils_module.validate_job_settings(manifest, "train", {"DATASET_ID": "ok-1"}) == []
    secret = manifest["scripts"]["train"]["settings_schema"]["properties"]["INTERNAL_AUTH_TOKEN"]
    assert "x-flag" not in secret  # the manifest offers no flag for a secret
