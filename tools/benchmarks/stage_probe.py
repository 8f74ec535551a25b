"""Stage one dataset the way a job does (template/utils.py's `stage_dataset`); print its time.

    python tools/benchmarks/stage_probe.py DATASET_ID CACHE_DIR
    python tools/benchmarks/stage_probe.py --get KEY     # the server's own speed: one plain GET
    python tools/benchmarks/stage_probe.py --gets PREFIX # the floor: list, GET all, keep nothing

Storage comes from the environment (STORAGE_TYPE, MINIO_*, STORAGE_BUCKET), parsed by the same
settings table a job uses. Prints one JSON line: {"client_s": <boto3's import and client
set-up>, "seconds": <the stage_dataset call>, ...}: a job pays the first once, when it first
touches storage, which is when it stages its dataset.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "template"))

import utils  # noqa: E402  (the template's copy: the source of truth)


def plain_get(storage: utils.Storage, key: str) -> dict:
    """Read one object with a single GET and throw it away: what the server itself delivers."""
    started = time.monotonic()
    body = storage.client.get_object(Bucket=storage.bucket, Key=key)["Body"]
    size = 0
    while chunk := body.read(1 << 20):
        size += len(chunk)
    return {"mib_s": size / 2**20 / (time.monotonic() - started), "bytes": size}


def bare_gets(storage: utils.Storage, prefix: str) -> dict:
    """The least any client does for a folder: list it and GET every object, 32 at a time on
    pooled connections, bodies read and thrown away (no file, no check, no retry of ours)."""
    from concurrent.futures import ThreadPoolExecutor

    client = storage.client

    def get(key: str) -> int:
        return len(client.get_object(Bucket=storage.bucket, Key=key)["Body"].read())

    keys = [obj.key for obj in storage.list_objects(prefix)]
    with ThreadPoolExecutor(32) as pool:
        return {"objects": len(keys), "bytes": sum(pool.map(get, keys))}


def main(argv: list[str] | None = None) -> int:
    first, second = (argv if argv is not None else sys.argv[1:])
    cfg = utils.parse_settings(utils.PLATFORM_SETTINGS, [])
    storage = utils.Storage.from_config(cfg)
    started = time.monotonic()
    storage.client  # noqa: B018  (boto3's import and client set-up, timed on their own)
    client_s = time.monotonic() - started
    if first == "--get":
        print(json.dumps(plain_get(storage, second)))
        return 0
    if first == "--gets":
        print(json.dumps(bare_gets(storage, second)))
        return 0
    dataset_id, cache_dir = first, second
    started = time.monotonic()
    root = utils.stage_dataset(storage, dataset_id, Path(cache_dir))
    seconds = time.monotonic() - started
    files = sum(len(names) for _, _, names in os.walk(root))  # no stat per file
    print(json.dumps({"client_s": client_s, "seconds": seconds, "root": str(root),
                      "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
