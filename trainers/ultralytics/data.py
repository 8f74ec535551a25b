"""The staged dataset, checked before Ultralytics sees it.

Detection and segmentation: the YOLO layout with a `data.yaml` (`names`, `train`, `val`,
optional `test`; relative paths resolved against the extracted folder). Classification: image
folders `train/<class>/...` and `val/<class>/...` (`valid/`, `validation/` accepted; `test/`
optional). Problems are reported as DatasetError naming what is missing: left to Ultralytics, a
missing folder becomes a download attempt (its `download:` key, or a dataset of the same name from
its servers) or a traceback.

For the YOLO layout a resolved copy of data.yaml is written into the work dir (absolute `path`,
no `download`), and that copy is what Ultralytics reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import utils

YAML_NAMES = ("data.yaml", "data.yml")
VAL_FOLDERS = ("val", "valid", "validation")


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: Path
    data: str  # what Ultralytics' `data=` gets: the resolved data.yaml, or the folder (classify)
    class_names: list[str]
    splits: dict[str, Path]  # train, val and test when present


def prepare_dataset(root: Path, task: str, work_dir: Path) -> Dataset:
    if task == "classify":
        return image_folders(root)
    return yolo_layout(root, work_dir / "data.yaml")


def find_images(path: Path) -> list[Path]:
    if path.is_file():  # a .txt list of image paths, as Ultralytics allows
        return [Path(line) for line in path.read_text(encoding="utf-8").split() if line]
    return utils.list_images(path)


def _listing(root: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "nothing"


def read_names(raw: dict[str, Any]) -> list[str]:
    names = raw.get("names")
    if isinstance(names, dict) and names:
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise utils.DatasetError("data.yaml: `names` keys must be class ids 0..n-1") from None
        if ids != list(range(len(ids))):
            raise utils.DatasetError("data.yaml: `names` must number the classes 0..n-1")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise utils.DatasetError("data.yaml has no `names` (the class names, a list or {id: name})")


def yolo_layout(root: Path, resolved_yaml: Path) -> Dataset:
    import yaml

    found = [root / name for name in YAML_NAMES if (root / name).is_file()]
    if not found:
        raise utils.DatasetError(f"the dataset has no data.yaml at its root (found: "
                                 f"{_listing(root)}); detection and segmentation need the YOLO "
                                 "layout: data.yaml, images/, labels/")
    try:
        raw = yaml.safe_load(found[0].read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise utils.DatasetError(f"data.yaml is not valid YAML ({utils.one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise utils.DatasetError("data.yaml must be a mapping with names, train and val")
    names = read_names(raw)
    base = root
    if raw.get("path") and not Path(str(raw["path"])).is_absolute():
        base = (root / str(raw["path"])).resolve()
        if root.resolve() not in (base, *base.parents):
            raise utils.DatasetError(f"data.yaml: path {raw['path']!r} leaves the dataset")
    splits: dict[str, Path] = {}
    problems = []
    for split in ("train", "val", "test"):
        value = raw.get(split)
        if value in (None, "") and split == "test":
            continue
        if value in (None, ""):
            problems.append(f"no `{split}` entry")
            continue
        if isinstance(value, list):
            problems.append(f"`{split}` lists several folders; give one folder per split")
            continue
        path = (base / str(value)).resolve()
        if root.resolve() not in (path, *path.parents):
            problems.append(f"{split} path {value!r} leaves the dataset")
        elif not path.exists():
            problems.append(f"{split} folder {value!r} does not exist")
        elif not find_images(path):
            problems.append(f"{split} folder {value!r} holds no images")
        else:
            splits[split] = path
    if problems:
        raise utils.DatasetError("data.yaml: " + "; ".join(problems))
    resolved = {"path": str(base), **{k: str(v) for k, v in splits.items()},
                "names": dict(enumerate(names))}
    resolved_yaml.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(resolved_yaml) as tmp:
        tmp.write_text("# Resolved from the dataset's data.yaml by data.py (absolute paths, no "
                       "download).\n" + yaml.safe_dump(resolved, sort_keys=False,
                                                       allow_unicode=True), encoding="utf-8")
    return Dataset(root, str(resolved_yaml), names, splits)


def image_folders(root: Path) -> Dataset:
    train = root / "train"
    if not train.is_dir():
        raise utils.DatasetError(f"the dataset has no train/ folder (found: {_listing(root)}); "
                                 "classification needs train/<class>/ and val/<class>/ folders")
    names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise utils.DatasetError("train/ has no class folders (train/<class>/image.jpg)")
    splits = {"train": train}
    val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if val is not None:
        splits["val"] = val
    if (root / "test").is_dir():
        splits["test"] = root / "test"
    if "val" not in splits:
        raise utils.DatasetError("the dataset has no val/ folder (val/, valid/ or validation/)")
    empty = [f"{split}/" for split, path in splits.items() if not utils.list_images(path)]
    if empty:
        raise utils.DatasetError(f"no images in {', '.join(empty)}")
    return Dataset(root, str(root), names, splits)


def require_split(dataset: Dataset, split: str) -> Path:
    if split not in dataset.splits:
        raise utils.DatasetError(f"the dataset has no {split} split (it has "
                                 f"{', '.join(dataset.splits)})")
    return dataset.splits[split]
