"""Storage in template/utils.py against a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import time
import zipfile
from pathlib import Path

import pytest

from tests.support.servers import ACCESS_KEY, SECRET_KEY, closed_port_url, wait_until

DATASET_FILES = {
    "data.yaml": b"names: [cat, dog]\ntrain: images/train\nval: images/val\n",
    "images/train/a.jpg": b"\xff\xd8jpeg-a",
    "images/train/B.PNG": b"\x89PNGb",
    "labels/train/a.txt": b"0 0.5 0.5 0.2 0.2\n",
}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def zip_with_member(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr(info, data)
    return buffer.getvalue()


def with_declared_size(archive: bytes, declared: int) -> bytes:
    """Rewrite every header's uncompressed size: a tiny archive that claims a huge content."""
    patched = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = patched.find(signature)
        while start != -1:
            struct.pack_into("<I", patched, start + offset, declared)
            start = patched.find(signature, start + 4)
    return bytes(patched)


def s3_storage(utils, s3, **overrides):
    cfg = utils.parse_settings(utils.PLATFORM_SETTINGS, [], {**s3.env(), **overrides})
    return utils.Storage.from_config(cfg)


def dataset_requests(s3, dataset_id: str) -> list[str]:
    return [method for method, path in s3.requests if path.endswith(f"/{dataset_id}.zip")]


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- datasets ---------------------------------------------------------------------------------


def test_dataset_round_trip(utils_module, s3, tmp_path):
    s3.put_bytes("datasets/ds-1.zip", zip_bytes(DATASET_FILES))
    root = utils_module.stage_dataset(s3_storage(utils_module, s3), "ds-1", tmp_path / "cache")
    assert read_tree(root) == DATASET_FILES
    assert root.is_relative_to(tmp_path / "cache")
    assert not list(root.parent.parent.rglob("archive.zip*"))  # the archive is not kept


def test_second_staging_is_a_cache_hit_without_download(utils_module, s3, tmp_path, caplog):
    s3.put_bytes("datasets/ds-1.zip", zip_bytes(DATASET_FILES))
    storage = s3_storage(utils_module, s3)
    first = utils_module.stage_dataset(storage, "ds-1", tmp_path / "cache")
    assert "GET" in dataset_requests(s3, "ds-1")
    s3.requests.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        second = utils_module.stage_dataset(storage, "ds-1", tmp_path / "cache")
    assert second == first
    assert dataset_requests(s3, "ds-1") == ["HEAD"]  # the ETag is checked, nothing fetched
    assert "cache hit" in caplog.text


def test_changed_object_is_fetched_again(utils_module, s3, tmp_path):
    storage = s3_storage(utils_module, s3)
    s3.put_bytes("datasets/ds-1.zip", zip_bytes({"v.txt": b"one"}))
    utils_module.stage_dataset(storage, "ds-1", tmp_path / "cache")
    s3.put_bytes("datasets/ds-1.zip", zip_bytes({"v.txt": b"two"}))
    root = utils_module.stage_dataset(storage, "ds-1", tmp_path / "cache")
    assert (root / "v.txt").read_bytes() == b"two"


def test_single_top_level_folder_is_unwrapped(utils_module, s3, tmp_path):
    wrapped = {f"my-dataset/{name}": data for name, data in DATASET_FILES.items()}
    wrapped["__MACOSX/._data.yaml"] = b"finder junk"  # ignored when deciding the root
    s3.put_bytes("datasets/wrapped.zip", zip_bytes(wrapped))
    root = utils_module.stage_dataset(s3_storage(utils_module, s3), "wrapped", tmp_path / "c")
    assert root.name == "my-dataset"
    assert read_tree(root) == DATASET_FILES


def test_non_ascii_file_names_survive(utils_module, s3, tmp_path):
    names = {"train/猫/ñandú.jpg": b"1", "train/chien/Æble.JPEG": b"2", "val/猫/é.webp": b"3"}
    s3.put_bytes("datasets/unicode.zip", zip_bytes(names))
    root = utils_module.stage_dataset(s3_storage(utils_module, s3), "unicode", tmp_path / "c")
    assert read_tree(root) == names
    assert len(utils_module.list_images(root)) == 3


def symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("passwd-link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("archive", "reason"), [
    (zip_with_member(zipfile.ZipInfo("/etc/evil.txt")), "an absolute path"),
    (zip_with_member(zipfile.ZipInfo("../evil.txt")), "a '..' path"),
    (zip_with_member(zipfile.ZipInfo("data/../../evil.txt")), "a '..' path"),
    (zip_with_member(symlink_member(), b"/etc/passwd"), "a symbolic link"),
    (with_declared_size(zip_bytes({"big.bin": b"\0" * 1000}), 3 * 2**30), "zip bomb"),
    (b"this is not a zip archive at all", "not a valid zip archive"),
], ids=["absolute", "dotdot", "nested-dotdot", "symlink", "bomb", "not-a-zip"])
def test_unsafe_archive_is_rejected(utils_module, s3, tmp_path, archive, reason):
    s3.put_bytes("datasets/bad.zip", archive)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(utils_module.DatasetError, match=reason) as caught:
        utils_module.stage_dataset(s3_storage(utils_module, s3), "bad", cache)
    assert f"s3://{s3.bucket}/datasets/bad.zip" in str(caught.value)
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("passwd-link"))
    assert not list(cache.rglob("complete.json"))  # a later run will not take it as staged


def test_member_larger_than_declared_is_rejected(utils_module, s3, tmp_path):
    # Declares 10 bytes but inflates to 100 kB: extraction stops instead of filling the disk.
    s3.put_bytes("datasets/liar.zip", with_declared_size(zip_bytes({"a": b"\0" * 100_000}), 10))
    with pytest.raises(utils_module.DatasetError) as caught:
        utils_module.stage_dataset(s3_storage(utils_module, s3), "liar", tmp_path / "c")
    assert "liar.zip" in str(caught.value)
    extracted = list((tmp_path / "c").rglob("data/a"))
    assert all(p.stat().st_size <= 10 for p in extracted)


def test_corrupt_member_data_is_a_dataset_error(utils_module, s3, tmp_path):
    archive = bytearray(zip_bytes({"a.txt": os.urandom(4096)}))
    middle = archive.find(b"a.txt") + 5 + 100  # inside the first member's data
    archive[middle:middle + 64] = bytes(64)
    s3.put_bytes("datasets/corrupt.zip", bytes(archive))
    with pytest.raises(utils_module.DatasetError, match="corrupt"):
        utils_module.stage_dataset(s3_storage(utils_module, s3), "corrupt", tmp_path / "c")


@pytest.mark.parametrize("dataset_id", ["../escape", "a/b", "", ".hidden"])
def test_invalid_dataset_id_is_a_config_error(utils_module, s3, tmp_path, dataset_id):
    with pytest.raises(utils_module.ConfigError, match="DATASET_ID"):
        utils_module.stage_dataset(s3_storage(utils_module, s3), dataset_id, tmp_path / "c")


def test_disk_budget_smaller_than_archive_is_a_dataset_error(utils_module, s3, tmp_path):
    s3.put_bytes("datasets/ds.zip", zip_bytes(DATASET_FILES))
    s3.requests.clear()
    with pytest.raises(utils_module.DatasetError, match="not enough disk space for"):
        utils_module.stage_dataset(s3_storage(utils_module, s3), "ds", tmp_path / "c",
                                   disk_budget_mb=0)
    assert dataset_requests(s3, "ds") == ["HEAD"]  # refused before downloading anything


def test_disk_budget_smaller_than_extracted_size_is_a_dataset_error(utils_module, s3, tmp_path):
    s3.put_bytes("datasets/zeros.zip", zip_bytes({"zeros.bin": bytes(3 * 2**20)}))  # ~3 kB zip
    with pytest.raises(utils_module.DatasetError, match="not enough disk space to extract"):
        utils_module.stage_dataset(s3_storage(utils_module, s3), "zeros", tmp_path / "c",
                                   disk_budget_mb=1)


# -- errors: one StorageError naming bucket and key ---------------------------------------------


def assert_one_line_storage_error(error: Exception, bucket: str, key: str) -> None:
    message = str(error)
    assert f"s3://{bucket}/{key}" in message
    assert "\n" not in message and "botocore" not in message and "Traceback" not in message


def test_missing_object_is_a_storage_error(utils_module, s3, tmp_path):
    with pytest.raises(utils_module.StorageError, match="not found") as caught:
        utils_module.stage_dataset(s3_storage(utils_module, s3), "absent", tmp_path / "c")
    assert_one_line_storage_error(caught.value, s3.bucket, "datasets/absent.zip")


def test_missing_bucket_is_a_storage_error(utils_module, s3, tmp_path):
    storage = s3_storage(utils_module, s3, STORAGE_BUCKET="no-such-bucket")
    with pytest.raises(utils_module.StorageError) as caught:
        storage.download("checkpoints/x.pt", tmp_path / "x.pt")
    assert_one_line_storage_error(caught.value, "no-such-bucket", "checkpoints/x.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.part").exists()


def test_refused_credentials_are_a_storage_error(utils_module, s3, tmp_path):
    s3.put_bytes("datasets/ds.zip", zip_bytes(DATASET_FILES))
    storage = s3_storage(utils_module, s3)
    with s3.auth_enforced(), pytest.raises(utils_module.StorageError) as caught:
        utils_module.stage_dataset(storage, "ds", tmp_path / "c")
    assert "access denied" in str(caught.value)
    assert "credentials" in str(caught.value)
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)
    assert_one_line_storage_error(caught.value, s3.bucket, "datasets/ds.zip")


def test_refused_upload_is_a_storage_error(utils_module, s3, tmp_path):
    local = tmp_path / "best.pt"
    local.write_bytes(b"weights")
    storage = s3_storage(utils_module, s3)
    with s3.auth_enforced(), pytest.raises(utils_module.StorageError, match="access denied") \
            as caught:
        storage.upload(local, "checkpoints/job-1/best.pt")
    assert_one_line_storage_error(caught.value, s3.bucket, "checkpoints/job-1/best.pt")
    assert str(local) not in str(caught.value)


def test_upload_to_missing_bucket_is_a_storage_error(utils_module, s3, tmp_path):
    local = tmp_path / "best.pt"
    local.write_bytes(b"weights")
    storage = s3_storage(utils_module, s3, STORAGE_BUCKET="no-such-bucket")
    with pytest.raises(utils_module.StorageError, match="does not exist") as caught:
        storage.upload(local, "checkpoints/job-1/best.pt")
    assert_one_line_storage_error(caught.value, "no-such-bucket", "checkpoints/job-1/best.pt")


@pytest.mark.slow
def test_unreachable_endpoint_is_a_storage_error(utils_module, s3, tmp_path):
    storage = s3_storage(utils_module, s3, MINIO_ENDPOINT=closed_port_url())
    started = time.monotonic()
    with pytest.raises(utils_module.StorageError, match="unreachable") as caught:
        utils_module.stage_dataset(storage, "ds", tmp_path / "c")
    assert time.monotonic() - started < 40  # bounded retries, not a hang
    assert_one_line_storage_error(caught.value, s3.bucket, "datasets/ds.zip")
    assert storage.endpoint in str(caught.value)


# -- uploads and other backends ---------------------------------------------------------------


def test_upload_returns_s3_uri_and_stores_bytes(utils_module, s3, tmp_path):
    local = tmp_path / "best.pt"
    local.write_bytes(b"weights" * 1000)
    storage = s3_storage(utils_module, s3)
    uri = storage.upload(local, "checkpoints/job-1/best.pt")
    assert uri == f"s3://{s3.bucket}/checkpoints/job-1/best.pt"
    assert s3.get_bytes("checkpoints/job-1/best.pt") == local.read_bytes()
    assert storage.list("checkpoints/job-1/") == ["checkpoints/job-1/best.pt"]
    fetched = storage.download(uri, tmp_path / "back" / "best.pt")  # by URI as well as by key
    assert fetched.read_bytes() == local.read_bytes()


def test_one_upload_then_server_side_copies(utils_module, s3, tmp_path):
    # epoch-N, last and best hold the same checkpoint: its bytes cross the network once.
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(os.urandom(40 * 2**20))  # past the 32 MiB multipart threshold
    uploader = utils_module.Uploader(s3_storage(utils_module, s3), tmp_path / "staging")
    keys = [f"checkpoints/job-1/{name}.pt" for name in ("epoch-3", "last", "best")]
    uri = uploader.submit(checkpoint, keys[0], copies=keys[1:])
    uploader.flush(timeout=120)
    assert uri == f"s3://{s3.bucket}/{keys[0]}"
    for key in keys:
        assert s3.get_bytes(key) == checkpoint.read_bytes(), key
    copied = sorted({path.rsplit("/", 1)[-1] for path in s3.copies})
    assert copied == ["best.pt", "last.pt"]  # written by copies, not by uploads of the file


def test_local_backend_round_trip(utils_module, tmp_path):
    bucket_root = tmp_path / "bucket"
    (bucket_root / "datasets").mkdir(parents=True)
    (bucket_root / "datasets" / "ds.zip").write_bytes(zip_bytes(DATASET_FILES))
    cfg = utils_module.parse_settings(utils_module.PLATFORM_SETTINGS, [], {
        "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket_root)})
    storage = utils_module.Storage.from_config(cfg)
    root = utils_module.stage_dataset(storage, "ds", tmp_path / "cache")
    assert read_tree(root) == DATASET_FILES

    local = tmp_path / "last.pt"
    local.write_bytes(b"weights")
    uri = storage.upload(local, "checkpoints/job-1/last.pt")
    assert uri == (bucket_root / "checkpoints/job-1/last.pt").as_uri()
    assert storage.list("checkpoints/") == ["checkpoints/job-1/last.pt"]
    assert storage.download(uri, tmp_path / "back.pt").read_bytes() == b"weights"
    copy = storage.copy("checkpoints/job-1/last.pt", "checkpoints/job-1/best.pt")
    assert Path(copy.removeprefix("file://")).read_bytes() == b"weights"
    with pytest.raises(utils_module.StorageError, match="not found"):
        storage.head("checkpoints/job-1/missing.pt")


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-copy"])
def test_link_or_copy_keeps_the_bytes_when_the_source_is_replaced(utils_module, tmp_path,
                                                                 monkeypatch, links):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    with utils_module.atomic_path(last) as tmp:
        tmp.write_bytes(b"epoch 1")
    best.write_bytes(b"older best")
    if not links:
        def refuse(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(utils_module.os, "link", refuse)
    assert utils_module.link_or_copy(last, best) == best
    assert best.read_bytes() == b"epoch 1"
    assert (best.stat().st_ino == last.stat().st_ino) is links
    with utils_module.atomic_path(last) as tmp:  # the next epoch replaces last.pt
        tmp.write_bytes(b"epoch 2")
    assert best.read_bytes() == b"epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_stage_inputs_from_a_prefix(utils_module, s3, tmp_path):
    s3.put_bytes("inputs/batch/one.jpg", b"1")
    s3.put_bytes("inputs/batch/sub/two.PNG", b"2")
    s3.put_bytes("inputs/batch/notes.txt", b"not an image")
    images = utils_module.stage_inputs(s3_storage(utils_module, s3), "inputs/batch/",
                                       tmp_path / "in")
    assert sorted(p.relative_to(tmp_path / "in").as_posix() for p in images) == [
        "one.jpg", "sub/two.PNG"]


@pytest.mark.slow
def test_uploader_retries_through_a_storage_outage(utils_module, s3, tmp_path, caplog):
    storage = s3_storage(utils_module, s3)
    uploader = utils_module.Uploader(storage, tmp_path / "staging", retry_for_s=120)
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"epoch-1 weights")
    s3.stop()
    try:
        uri = uploader.submit(checkpoint, "checkpoints/job-1/last.pt")
        # The training loop replaces its checkpoint while the upload waits: the snapshot holds.
        replacement = tmp_path / "last.pt.tmp"
        replacement.write_bytes(b"epoch-2 weights")
        os.replace(replacement, checkpoint)
        with caplog.at_level(logging.WARNING, logger="trainer"):
            assert wait_until(lambda: "failed, retrying" in caplog.text, timeout=40)
    finally:
        s3.start()
    uploader.flush(timeout=60)
    assert uri == f"s3://{s3.bucket}/checkpoints/job-1/last.pt"
    assert s3.get_bytes("checkpoints/job-1/last.pt") == b"epoch-1 weights"
    assert list((tmp_path / "staging").iterdir()) == []  # snapshots cleaned up
