"""Bad-input scenarios: each gives one clear error line naming the cause, a `failed` status
carrying it, the line in `failure` and in the termination log, the documented exit code, and
nothing written outside the work dir.

The inputs are generic (a zip of text files is the wrong layout for every trainer; a torch
checkpoint tagged with another format is another framework's), so a new trainer needs no
per-case knowledge here.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import stat
import zipfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from tests.conformance.checks import (
    check_clean_exit,
    check_delivered_in_order,
    check_no_secrets,
    scenario,
)
from tests.conformance.harness import (
    EXIT_CONFIG,
    EXIT_DATA,
    Backend,
    RunResult,
    Subject,
    files_under,
    run_to_end,
)
from tests.support.servers import closed_port_url

Overrides = Callable[[Subject], dict[str, str | None]]
FOREIGN = "checkpoints/job-elsewhere"  # where the not-ours checkpoints are put
UNTRUSTED_CHECKPOINT = "uploads/code-carrying.pt"  # outside every trusted prefix


@dataclasses.dataclass(frozen=True)
class BadInput:
    name: str
    exit_code: int
    mentions: tuple[str, ...]  # patterns the error line must match (case-insensitive)
    overrides: Overrides


def dataset(dataset_id: str) -> Overrides:
    return lambda subject: {"DATASET_ID": dataset_id}


def _unreachable(subject: Subject) -> dict[str, str | None]:
    return {"MINIO_ENDPOINT": closed_port_url()}


def _wrong_credentials(subject: Subject) -> dict[str, str | None]:
    return subject.r2_env(subject.strict_s3.endpoint)  # a server that refuses every key


CASES: tuple[BadInput, ...] = (
    BadInput("missing-settings", EXIT_CONFIG, ("DATASET_ID", "JOB_ID", "MINIO_SECRET_KEY"),
             lambda s: {"DATASET_ID": None, "JOB_ID": None, "MINIO_SECRET_KEY": None}),
    BadInput("ill-typed-settings", EXIT_CONFIG,
             ("EPOCHS", "'ten'", "PRETRAINED", "'maybe'", "LEARNING_RATE", "'fast'"),
             lambda s: {"EPOCHS": "ten", "PRETRAINED": "maybe", "LEARNING_RATE": "fast"}),
    BadInput("unknown-storage-type", EXIT_CONFIG, ("STORAGE_TYPE", "ftp"),
             lambda s: {"STORAGE_TYPE": "ftp"}),
    BadInput("no-such-dataset", EXIT_DATA, ("no-such-dataset", "not found|does not exist"),
             dataset("no-such-dataset")),
    BadInput("wrong-credentials", EXIT_DATA, ("denied|credential|forbidden",),
             _wrong_credentials),
    BadInput("unreachable-storage", EXIT_DATA, ("unreachable|could not connect",),
             _unreachable),
    BadInput("corrupt-zip", EXIT_DATA, ("zip|corrupt",), dataset("corrupt")),
    BadInput("zip-parent-path", EXIT_DATA, (r"\.\.",), dataset("parent-path")),
    BadInput("zip-absolute-path", EXIT_DATA, ("absolute",), dataset("absolute-path")),
    BadInput("zip-symlink", EXIT_DATA, ("symbolic link|symlink",), dataset("symlink")),
    BadInput("zip-bomb", EXIT_DATA, ("bomb|too large|declared",), dataset("bomb")),
    BadInput("wrong-layout", EXIT_DATA, ("dataset|layout",), dataset("wrong-layout")),
    BadInput("not-a-checkpoint", EXIT_DATA, ("checkpoint",),
             lambda s: {"CHECKPOINT_PATH": f"{FOREIGN}/garbage.pt"}),
    BadInput("foreign-checkpoint", EXIT_DATA, ("checkpoint",),
             lambda s: {"CHECKPOINT_PATH": f"{FOREIGN}/other-framework.pt"}),
    BadInput("disk-full", EXIT_DATA, ("disk|space",), lambda s: {"DISK_BUDGET_MB": "0"}),
    # A user's upload that runs code when unpickled (issue 18): never run (its payload would
    # write escape_target, which check_nothing_outside_work_dir looks for), refused in one line.
    BadInput("untrusted-checkpoint", EXIT_DATA, ("refused", "code-carrying.pt"),
             lambda s: {"CHECKPOINT_PATH": UNTRUSTED_CHECKPOINT}),
    # Platform annotations (issue 13, contract §2a), in annotations.json: the file every trainer
    # reads when its task's own file is absent. One line naming the file and the id.
    BadInput("annotations-malformed-json", EXIT_DATA, ("annotations.json", "malformed JSON"),
             dataset("ann-malformed")),
    BadInput("annotations-unknown-category", EXIT_DATA, ("annotations.json", "category id 77"),
             dataset("ann-category")),
    BadInput("annotations-missing-image", EXIT_DATA, ("annotations.json", "missing.png"),
             dataset("ann-image")),
    BadInput("annotations-keypoints-length", EXIT_DATA, ("annotations.json", "annotation 9"),
             dataset("ann-keypoints")),
    BadInput("annotations-split-names-no-image", EXIT_DATA, ("annotations.json", "4242"),
             dataset("ann-split")),
)


# ---------------------------------------------------------------------------------------------
# The inputs
# ---------------------------------------------------------------------------------------------

def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def _bomb() -> bytes:
    """A 1 KB archive declaring a ~4 GiB member (headers patched; never extracted)."""
    data = bytearray(_zip([("bomb/train/a/zeros.bin", b"\0" * 65536)]))
    huge = (0xFFFFFFF0).to_bytes(4, "little")
    local = data.find(b"PK\x03\x04")
    data[local + 22:local + 26] = huge
    central = data.find(b"PK\x01\x02")
    data[central + 24:central + 28] = huge
    return bytes(data)


def _symlink() -> bytes:
    link = zipfile.ZipInfo("data/train/a/link.png")
    link.create_system = 3  # unix: external_attr carries the mode
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip([("data/train/a/real.txt", b"x"), (link, b"/etc/passwd")])


class _RunsCode:
    """Unpickling this writes `target`: what a checkpoint carrying code does when loaded."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo code-ran > {self.target}",))


def _code_carrying_checkpoint(target: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"format": "vision-platform/any/1", "model": _RunsCode(target)}, buffer)
    return buffer.getvalue()


def _bad_annotations() -> dict[str, bytes]:
    """Datasets in the platform's format, each with one bad annotation (see CASES)."""
    import json

    from tests.support.platform_data import COLOURS, image_bytes

    def annotations(change: Callable[[dict], None] = lambda data: None) -> dict:
        data = {"categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
                "images": [{"id": i, "file_name": f"img{i}.png", "width": 32, "height": 32,
                            "split": "val" if i % 2 else "train"} for i in range(1, 5)],
                "annotations": [{"id": i + 10, "image_id": i, "category_id": 1 + i % 2,
                                 "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0}
                                for i in range(1, 5)]}
        change(data)
        return data

    def dataset_zip(text: str) -> bytes:
        images = [(f"ds/images/img{i}.png", image_bytes(COLOURS["red"])) for i in range(1, 5)]
        return _zip([("ds/annotations.json", text.encode()), *images])

    def bad_category(data: dict) -> None:
        data["annotations"][1]["category_id"] = 77

    def missing_image(data: dict) -> None:
        data["images"][2]["file_name"] = "missing.png"

    def bad_keypoints(data: dict) -> None:
        data["categories"][0].update(keypoints=["a", "b"], skeleton=[[1, 2]])
        data["annotations"].append({"id": 9, "image_id": 1, "category_id": 1,
                                    "bbox": [1, 1, 5, 5], "keypoints": [1, 2, 2, 3]})

    def bad_split(data: dict) -> None:
        data["split_config"] = {"splits": {"1": "train", "4242": "val"}}

    return {
        "datasets/ann-malformed.zip": dataset_zip(json.dumps(annotations())[:-15]),
        "datasets/ann-category.zip": dataset_zip(json.dumps(annotations(bad_category))),
        "datasets/ann-image.zip": dataset_zip(json.dumps(annotations(missing_image))),
        "datasets/ann-keypoints.zip": dataset_zip(json.dumps(annotations(bad_keypoints))),
        "datasets/ann-split.zip": dataset_zip(json.dumps(annotations(bad_split))),
    }


def escape_target(subject: Subject) -> Path:
    """Where the `..` and absolute-path archives try to write (must never exist)."""
    return subject.root / "escaped-by-archive.txt"


def upload_bad_inputs(subject: Subject) -> None:
    import torch

    target = escape_target(subject)
    dotdots = "../" * (len(target.parts) + 8)
    text = [(f"notes/readme-{i}.txt", os.urandom(64).hex().encode()) for i in range(3)]
    inputs = {
        "datasets/corrupt.zip": b"PK\x03\x04" + os.urandom(2048),
        "datasets/parent-path.zip": _zip([("data/train/a/x.txt", b"x"),
                                          (dotdots + str(target).lstrip("/"), b"escaped")]),
        "datasets/absolute-path.zip": _zip([("data/train/a/x.txt", b"x"),
                                            (str(target), b"escaped")]),
        "datasets/symlink.zip": _symlink(),
        "datasets/bomb.zip": _bomb(),
        "datasets/wrong-layout.zip": _zip(text),
        f"{FOREIGN}/garbage.pt": os.urandom(4096),
    }
    buffer = io.BytesIO()
    torch.save({"format": "vision-platform/another-framework/1", "epoch": 1, "epochs": 3,
                "class_names": ["a", "b", "c"], "model": {"weight": torch.zeros(3, 3)}}, buffer)
    inputs[f"{FOREIGN}/other-framework.pt"] = buffer.getvalue()
    inputs.update(_bad_annotations())
    for key, data in inputs.items():
        subject.put(key, data)
    subject.put(UNTRUSTED_CHECKPOINT, _code_carrying_checkpoint(escape_target(subject)))
    # The absolute member must be stored as such (zipfile keeps the leading slash on write).
    with zipfile.ZipFile(io.BytesIO(inputs["datasets/absolute-path.zip"])) as zf:
        assert any(n.startswith("/") for n in zf.namelist())


# ---------------------------------------------------------------------------------------------
# Running one and checking it (schedule.py runs them beside the other scenarios)
# ---------------------------------------------------------------------------------------------

CASE_BY_NAME = {case.name: case for case in CASES}


def run_bad_input(subject: Subject, case: BadInput) -> RunResult:
    job = f"{subject.name}-{case.name}"
    with closing(Backend(job)) as backend:
        env = subject.env(subject.run_dir(case.name), job, backend, **case.overrides(subject))
        return run_to_end(subject, case.name, env, backend=backend, timeout=240)


def check_bad_input(subject: Subject, case: BadInput, result: RunResult) -> None:
    with scenario(subject, case.name) as sc:
        sc.record(result)
        check_clean_exit(sc, result, case.exit_code)
        failure = result.work_dir / "failure"
        sc.check(failure.is_file(), "no `failure` file in the work dir", result)
        lines = failure.read_text(encoding="utf-8").splitlines()
        sc.check(len(lines) == 1 and lines[0].strip(), f"`failure` is not one line: {lines}")
        line = lines[0]
        for pattern in case.mentions:
            sc.check(re.search(pattern, line, re.IGNORECASE),
                     f"the error does not name the cause (/{pattern}/): {line!r}", result)
        errors = result.error_lines()
        sc.check(len(errors) == 1 and line in errors[0],
                 f"expected the failure as the log's one error line, got {errors}", result)
        statuses = result.routes("status")
        sc.check(statuses and statuses[-1].get("status") == "failed"
                 and statuses[-1].get("error") == line,
                 f"the last status is {statuses[-1:]}, expected failed carrying {line!r}")
        check_delivered_in_order(sc, result)
        logged = (result.run_dir / "termination-log").read_text(encoding="utf-8").strip()
        sc.check(logged == line, f"the termination log holds {logged!r}, expected {line!r}")
        for run in sc.subject.mlflow_runs(result.job_id):
            sc.check(run.info.status == "FAILED",
                     f"MLflow run {run.info.run_name} ended {run.info.status}, expected FAILED")
        check_nothing_outside_work_dir(sc, result)
        check_no_secrets(sc, result)


def check_nothing_outside_work_dir(sc, result: RunResult) -> None:
    """HOME and TMPDIR empty, nothing beside the work dir in the run's folder, and nothing
    where the archives with `..` or absolute members point."""
    outside = [p for sub in ("home", "tmp") for p in files_under(result.run_dir / sub)]
    allowed = {"work", "home", "tmp", "termination-log", f"{result.scenario}.stdout",
               f"{result.scenario}.stderr"}
    outside += [p for p in result.run_dir.iterdir() if p.name not in allowed]
    outside += [escape_target(sc.subject)] if escape_target(sc.subject).exists() else []
    sc.check(not outside, "written outside the work dir: "
             + ", ".join(str(p) for p in outside[:10]))
