"""The platform's own datasets (issue 13, contract §2 and §2a): a dataset as a folder of objects
staged in parallel and cached by its manifest, the platform-annotations reader (both variants,
splits, negatives, clipping, bad files), and the timm and template trainers trained and evaluated
from platform annotations in a zip and in a folder. Real S3 server, backend and MLflow."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.support import platform_data
from tests.support.servers import REPO
from tests.support.trainer_jobs import guarded, of_job, run_script


def s3_storage(utils, s3):
    cfg = utils.parse_settings(utils.PLATFORM_SETTINGS, [], s3.env())
    return utils.Storage.from_config(cfg)


def put_folder(s3, root: Path, prefix: str) -> list[str]:
    keys = []
    for file in sorted(root.rglob("*")):
        if file.is_file():
            key = prefix + file.relative_to(root).as_posix()
            s3.put_file(key, file)
            keys.append(key)
    return keys


def gets_under(s3, prefix: str) -> list[str]:
    return [path for method, path in s3.requests if method == "GET" and f"/{prefix}" in path
            and "list-type" not in path and "prefix=" not in path]


# --- staging a folder ---------------------------------------------------------------------------

def test_folder_is_staged_in_parallel_and_cached_by_its_manifest(utils_module, s3, tmp_path,
                                                                  caplog):
    source = tmp_path / "src"
    platform_data.classification(source, per_class=4)
    keys = put_folder(s3, source, "datasets/ds-folder/")
    storage = s3_storage(utils_module, s3)
    root, version = utils_module.stage_dataset_version(storage, "ds-folder", tmp_path / "cache")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == \
        sorted(k.removeprefix("datasets/ds-folder/") for k in keys)
    assert (root / "annotations_classification.json").read_bytes() == \
        (source / "annotations_classification.json").read_bytes()
    assert root.parent.name == f"folder-{version}"  # cache/datasets/{id}/{manifest digest}/
    assert len(gets_under(s3, "datasets/ds-folder/")) == len(keys)

    s3.requests.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        again, same = utils_module.stage_dataset_version(storage, "ds-folder", tmp_path / "cache")
    assert (again, same) == (root, version)
    assert gets_under(s3, "datasets/ds-folder/") == []  # a retried job downloads nothing
    assert "cache hit" in caplog.text

    s3.put_bytes(keys[0], b"changed")  # any changed object: a new version, staged again
    changed, other = utils_module.stage_dataset_version(storage, "ds-folder", tmp_path / "cache")
    assert other != version and (changed / keys[0].removeprefix("datasets/ds-folder/")
                                 ).read_bytes() == b"changed"


def test_many_objects_are_fetched_at_once(utils_module, s3, tmp_path, monkeypatch):
    import threading

    for i in range(40):
        s3.put_bytes(f"datasets/many/f{i:02d}.bin", bytes([i]) * 100)
    storage = s3_storage(utils_module, s3)
    active, peak, lock = [0], [0], threading.Lock()
    fetch = utils_module._fetch_small_object

    def counting(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return fetch(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(utils_module, "_fetch_small_object", counting)
    s3.requests.clear()
    root = utils_module.stage_dataset(storage, "many", tmp_path / "cache")
    assert len(list(root.iterdir())) == 40 and (root / "f07.bin").read_bytes() == b"\x07" * 100
    assert peak[0] > 1
    # The listing gave every size and ETag: one GET per object, no HEAD of any of them.
    assert len(gets_under(s3, "datasets/many/")) == 40
    assert not [path for method, path in s3.requests
                if method == "HEAD" and "datasets/many/" in path]


def test_a_stalled_folder_fails_within_its_deadline(utils_module, s3, tmp_path, monkeypatch):
    import threading
    import time

    s3.put_bytes("datasets/stalled/a.bin", b"a")
    storage = s3_storage(utils_module, s3)
    storage.call_s = 0.5  # the folder's deadline: this plus its bytes at STORAGE_MIN_RATE
    release = threading.Event()
    monkeypatch.setattr(utils_module, "_fetch_small_object", lambda *args: release.wait(30))
    started = time.monotonic()
    try:
        with pytest.raises(utils_module.StorageError, match="too slow while downloading"):
            utils_module.stage_dataset(storage, "stalled", tmp_path / "cache")
        assert time.monotonic() - started < 10
    finally:
        release.set()
    assert not list((tmp_path / "cache").rglob("complete.json"))  # never taken for finished


def test_a_broken_stream_of_a_small_object_resumes_from_its_last_byte(utils_module, tmp_path,
                                                                       monkeypatch):
    import threading

    from botocore.exceptions import IncompleteReadError

    class Body:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        def read(self, size):
            chunk = self.chunks.pop(0) if self.chunks else b""
            if isinstance(chunk, Exception):
                raise chunk
            return chunk

    calls = []

    class Client:
        def get_object(self, **kwargs):
            calls.append(kwargs.get("Range"))
            if len(calls) == 1:  # the first GET breaks after 4 bytes
                return {"Body": Body([b"0123", IncompleteReadError(actual_bytes=4,
                                                                   expected_bytes=10)])}
            return {"Body": Body([b"456789"])}

    storage = utils_module.Storage("minio", "bucket", endpoint="http://127.0.0.1:9")
    storage._client = Client()
    monkeypatch.setattr(utils_module.time, "sleep", lambda s: None)
    target = tmp_path / "obj.bin"
    utils_module._fetch_small_object(storage, utils_module.ObjectInfo("k", 10, "e"), str(target),
                                     threading.Event())
    assert target.read_bytes() == b"0123456789"
    assert calls == [None, "bytes=4-9"]  # one plain GET, then the rest only


def test_the_archive_wins_over_the_folder(utils_module, s3, tmp_path):
    s3.put_bytes("datasets/both/from-folder.txt", b"folder")
    s3.put_bytes("datasets/both.zip", _zip({"from-zip.txt": b"zip"}))
    root = utils_module.stage_dataset(s3_storage(utils_module, s3), "both", tmp_path / "c")
    assert [p.name for p in root.iterdir()] == ["from-zip.txt"]


def test_a_missing_dataset_names_both_places(utils_module, s3, tmp_path):
    with pytest.raises(utils_module.StorageError, match="not found") as caught:
        utils_module.stage_dataset(s3_storage(utils_module, s3), "absent", tmp_path / "c")
    assert "datasets/absent.zip" in str(caught.value) and "datasets/absent/" in str(caught.value)


def test_unsafe_folder_keys_are_refused_before_any_download(utils_module, s3, tmp_path):
    objects = [utils_module.ObjectInfo("datasets/evil/ok.txt", 1, "a"),
               utils_module.ObjectInfo("datasets/evil/../../escaped.txt", 1, "b")]
    storage = s3_storage(utils_module, s3)
    with pytest.raises(utils_module.DatasetError, match=r"unsafe.*'\.\.' path"):
        utils_module.stage_folder(storage, "evil", "datasets/evil/", objects, tmp_path / "c")
    outside = [utils_module.ObjectInfo("datasets/evilness/x.txt", 1, "a")]
    with pytest.raises(utils_module.DatasetError, match="outside the prefix"):
        utils_module.stage_folder(storage, "evil", "datasets/evil/", outside, tmp_path / "c")
    absolute = [utils_module.ObjectInfo("datasets/evil//etc/passwd", 1, "a")]
    with pytest.raises(utils_module.DatasetError, match="absolute"):
        utils_module.stage_folder(storage, "evil", "datasets/evil/", absolute, tmp_path / "c")
    assert not gets_under(s3, "datasets/evil")


def test_local_storage_stages_a_folder(utils_module, tmp_path):
    bucket = tmp_path / "bucket"
    platform_data.classification(bucket / "datasets" / "local-ds", per_class=4)
    storage = utils_module.Storage("local", "b", local_root=bucket)
    root, version = utils_module.stage_dataset_version(storage, "local-ds", tmp_path / "cache")
    assert (root / "annotations_classification.json").is_file() and version
    dataset = utils_module.read_platform_annotations(root, "image_classification")
    assert len(dataset.images) == 12


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# --- reading platform annotations ---------------------------------------------------------------

@pytest.mark.parametrize("nested", [False, True], ids=["standard", "nested"])
def test_both_variants_read_the_same(utils_module, tmp_path, nested):
    platform_data.detection(tmp_path, images=5, boxes=2, nested=nested)
    dataset = utils_module.read_platform_annotations(tmp_path, "object_detection")
    assert dataset.annotation_file.name == "annotations_detection.json"
    assert dataset.class_names == ("cat", "dog")
    assert dataset.split_source == "per-image"
    assert [image.id for image in dataset.split("val")] == ["5"]
    first = dataset.images[0]
    assert first.file_name == "img_00000.png" and first.path == tmp_path / "images/img_00000.png"
    assert [(o.class_id, o.bbox) for o in first.objects] == [(0, (4.0, 6.0, 20.0, 16.0)),
                                                             (1, (5.0, 6.0, 20.0, 16.0))]


def test_split_config_wins_then_per_image_then_a_seeded_split(utils_module, tmp_path):
    data = platform_data.detection(tmp_path, images=10)
    data["split_config"] = {"splits": {"1": "val", "2": "test"}}
    platform_data.write_json(tmp_path / "annotations_detection.json", data)
    dataset = utils_module.read_platform_annotations(tmp_path, "object_detection")
    assert dataset.split_source == "split_config"
    assert {i.id for i in dataset.split("val")} == {"1", "5", "10"}  # 5, 10: their own split
    assert [i.id for i in dataset.split("test")] == ["2"]

    for record in data["images"]:
        record.pop("split")
    data.pop("split_config")
    platform_data.write_json(tmp_path / "annotations_detection.json", data)
    runs = [utils_module.read_platform_annotations(tmp_path, "object_detection",
                                                   val_fraction=0.3, split_seed=7)
            for _ in range(2)]
    assert runs[0].split_source == "seeded"
    assert [i.id for i in runs[0].split("val")] == [i.id for i in runs[1].split("val")]
    assert len(runs[0].split("val")) == 3
    data["images"].reverse()  # the file's order does not change the split
    platform_data.write_json(tmp_path / "annotations_detection.json", data)
    reordered = utils_module.read_platform_annotations(tmp_path, "object_detection",
                                                       val_fraction=0.3, split_seed=7)
    assert {i.id for i in reordered.split("val")} == {i.id for i in runs[0].split("val")}


def test_background_images_are_negatives_not_a_class(utils_module, tmp_path):
    platform_data.classification(tmp_path, per_class=4, background=2)
    dataset = utils_module.read_platform_annotations(tmp_path, "image_classification")
    assert dataset.class_names == ("red", "green", "blue")
    negatives = [image for image in dataset.images if image.file_name.startswith("bg_")]
    assert len(negatives) == 2 and all(i.label is None and not i.objects for i in negatives)
    assert {image.label for image in dataset.images} == {0, 1, 2, None}


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped(utils_module, tmp_path,
                                                                     caplog):
    data = platform_data.detection(tmp_path, images=2, boxes=1, size=64)
    data["annotations"][0]["bbox"] = [-4, 50, 20, 30]  # clipped to x 0..16, y 50..64
    data["annotations"][1]["bbox"] = [70, 10, 5, 5]  # wholly outside: nothing left
    platform_data.write_json(tmp_path / "annotations_detection.json", data)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        dataset = utils_module.read_platform_annotations(tmp_path, "object_detection")
    assert dataset.images[0].objects[0].bbox == (0.0, 50.0, 16.0, 14.0)
    assert dataset.images[1].objects == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 box(es)" in warnings[0] and "1 zero-area" in warnings[0]


def test_keypoints_names_and_a_zero_based_skeleton(utils_module, tmp_path):
    platform_data.detection(tmp_path, images=2, keypoints=True, file="annotations_pose.json")
    (tmp_path / "annotations.json").write_text("{}")  # the task's own file comes first
    dataset = utils_module.read_platform_annotations(tmp_path, "pose_estimation")
    assert dataset.keypoint_names == ("nose", "left_eye", "right_eye")
    assert dataset.skeleton == ((0, 1), (0, 2))
    assert dataset.images[0].objects[0].keypoints == ((10.0, 10.0, 2), (8.0, 8.0, 1),
                                                      (12.0, 8.0, 0))


def test_images_may_be_named_from_the_dataset_root_and_live_in_subfolders(utils_module,
                                                                          tmp_path):
    data = platform_data.classification(tmp_path, per_class=4)
    data["images"][0]["file_name"] = "images/" + data["images"][0]["file_name"]
    platform_data.write_json(tmp_path / "annotations_classification.json", data)
    dataset = utils_module.read_platform_annotations(tmp_path, "image_classification")
    assert dataset.images[0].file_name == "red/red_0.png" and dataset.images[0].path.is_file()


def _bad(kind: str, root: Path) -> str:
    """Writes a classification dataset with one bad annotation; returns the id it must name."""
    data = platform_data.classification(root, per_class=4)
    file = root / "annotations_classification.json"
    if kind == "malformed-json":
        file.write_text(json.dumps(data)[:-20])
        return "line 1"
    if kind == "unknown-category":
        data["annotations"][2]["category_id"] = 77
        platform_data.write_json(file, data)
        return "77"
    if kind == "missing-image":
        (root / "images" / data["images"][1]["file_name"]).unlink()
        return data["images"][1]["file_name"]
    if kind == "keypoints-length":
        data["categories"][0]["keypoints"] = ["a", "b"]
        data["annotations"][0]["keypoints"] = [1, 2, 2, 3]
        data["annotations"][0]["bbox"] = [1, 1, 5, 5]
        platform_data.write_json(file, data)
        return f"annotation {data['annotations'][0]['id']}"
    if kind == "split-names-no-image":
        data["split_config"]["splits"]["4242"] = "val"
        platform_data.write_json(file, data)
        return "4242"
    raise AssertionError(kind)


BAD_ANNOTATIONS = ("malformed-json", "unknown-category", "missing-image", "keypoints-length",
                   "split-names-no-image")


@pytest.mark.parametrize("kind", BAD_ANNOTATIONS)
def test_bad_annotations_are_one_line_naming_the_file_and_the_id(utils_module, tmp_path, kind):
    named = _bad(kind, tmp_path)
    with pytest.raises(utils_module.DatasetError) as caught:
        utils_module.read_platform_annotations(tmp_path, "image_classification")
    message = str(caught.value)
    assert "\n" not in message
    assert "annotations_classification.json" in message and named in message, message


def test_a_dataset_in_no_format_names_what_it_found_and_every_format(utils_module, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    layouts = list(utils_module.DATASET_LAYOUTS.values())
    message = str(utils_module.dataset_format_error(tmp_path, layouts))
    assert "notes/" in message and "readme.txt" in message
    assert all(layout.name in message for layout in layouts)


# --- the trainers, from platform annotations ---------------------------------------------------

CLASS_NAMES = ["red", "green", "blue"]  # the file's order, not sorted
TRAINERS = {
    "timm": {"MODEL_NAME": "test_resnet", "PRETRAINED": "false", "IMAGE_SIZE": "32"},
    "pytorch": {"MODEL_NAME": "tinycnn", "PRETRAINED": "false", "IMAGE_SIZE": "32"},
}


def _upload_dataset(s3, tmp_path: Path, source: str, *, nested: bool) -> str:
    root = tmp_path / "platform-ds"
    platform_data.classification(root, per_class=8, nested=nested, split_config=not nested,
                                 background=1)
    if source == "zip":
        s3.put_file("datasets/platform.zip", platform_data.zip_folder(root, tmp_path / "p.zip"))
    else:
        put_folder(s3, root, "datasets/platform/")
    shutil.rmtree(root)
    return "platform"


@pytest.mark.slow
@pytest.mark.parametrize(("trainer", "source", "nested"), [
    ("timm", "zip", False), ("timm", "folder", True),
    ("pytorch", "zip", True), ("pytorch", "folder", False),
])
def test_trainer_trains_and_evaluates_from_platform_annotations(
        trainer, source, nested, job_env, s3, backend, mlflow_server, tmp_path):
    experiment = f"platform-{trainer}-{source}"
    env = guarded({**job_env, **TRAINERS[trainer], "EPOCHS": "1", "BATCH_SIZE": "6",
                   "OMP_NUM_THREADS": "1", "MLFLOW_EXPERIMENT_NAME": experiment,
                   "DATASET_ID": _upload_dataset(s3, tmp_path, source, nested=nested)},
                  tmp_path / "guard.log")
    trainer_dir = REPO / "trainers" / trainer
    result = run_script(trainer_dir, "train.py", env)
    assert result.returncode == 0, result.stderr[-4000:]

    [validation] = of_job(backend, "validation-results", "job-1")
    assert validation["class_names"] == CLASS_NAMES
    assert list(validation["per_class_metrics"]) == CLASS_NAMES
    # exactly the file's val split: 2 images a class (the negative is a train image)
    assert [m["support"] for m in validation["per_class_metrics"].values()] == [2, 2, 2]

    [run] = [r for r in mlflow_server.runs(experiment) if r.data.tags.get("job_id") == "job-1"]
    assert run.data.params["split_source"] == ("per-image" if nested else "split_config")
    assert run.data.params["split_val_images"] == "6"
    assert run.data.params["split_train_images"] == "19"
    from mlflow.tracking import MlflowClient

    listing = json.loads(Path(MlflowClient(mlflow_server.uri).download_artifacts(
        run.info.run_id, "split.json", str(tmp_path))).read_text())
    assert len(listing["val"]) == 6 and len(listing["train"]) == 19

    evaluated = run_script(trainer_dir, "evaluate.py", {
        **env, "JOB_ID": "job-eval", "CHECKPOINT_PATH": "checkpoints/job-job-1/best.pt",
        "WORK_DIR": str(tmp_path / "eval")})
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    [evaluation] = [v for v in backend.bodies("validation-results") if v not in [validation]]
    assert list(evaluation["per_class_metrics"]) == CLASS_NAMES
    assert sum(m["support"] for m in evaluation["per_class_metrics"].values()) == 6


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unknown-category", "missing-image"])
def test_a_bad_annotation_fails_the_job_in_one_line_with_exit_3(kind, job_env, s3, backend,
                                                                tmp_path):
    root = tmp_path / "bad"
    named = _bad(kind, root)
    s3.put_file("datasets/bad.zip", platform_data.zip_folder(root, tmp_path / "bad.zip"))
    env = guarded({**job_env, **TRAINERS["timm"], "EPOCHS": "1", "DATASET_ID": "bad"},
                  tmp_path / "guard.log")
    result = run_script(REPO / "trainers" / "timm", "train.py", env)
    assert result.returncode == 3, result.stderr[-3000:]
    failure = (Path(job_env["WORK_DIR"]) / "failure").read_text().strip()
    assert "\n" not in failure and "annotations_classification.json" in failure and named in failure
    statuses = of_job(backend, "status", "job-1")
    assert statuses[-1]["status"] == "failed" and statuses[-1]["error"] == failure
