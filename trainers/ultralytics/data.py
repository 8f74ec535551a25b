"""The staged dataset, checked before Ultralytics sees it.

Detection and segmentation: the YOLO layout with a `data.yaml` (`names`, `train`, `val`,
optional `test`; relative paths resolved against the extracted folder). Classification: image
folders `train/<class>/...` and `val/<class>/...` (`valid/`, `validation/` accepted; `test/`
optional). Problems are reported as DatasetError naming what is missing: left to Ultralytics, a
missing folder becomes a download attempt (its `download:` key, or a dataset of the same name from
its servers) or a traceback. Every image passes the contract's image policy first
(`utils.check_images`): bad ones fail the job in one line, or, within MAX_BAD_IMAGES, are left out
of what Ultralytics is given (a list of the rest, or a folder of links to them).

For the YOLO layout a resolved copy of data.yaml is written into the work dir (absolute `path`,
no `download`), and that copy is what Ultralytics reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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


def prepare_dataset(root: Path, task: str, work_dir: Path, max_bad_images: int = 0) -> Dataset:
    if task == "classify":
        return without_bad_images(image_folders(root), work_dir / "dataset-checked",
                                  max_bad_images)
    return yolo_layout(root, work_dir / "data.yaml", max_bad_images)


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


def yolo_layout(root: Path, resolved_yaml: Path, max_bad_images: int = 0) -> Dataset:
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
    splits = listed_without_bad_images(splits, root, resolved_yaml.parent, max_bad_images)
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


def _good_images(splits: dict[str, Path], root: Path, max_bad_images: int
                 ) -> tuple[dict[str, list[Path]], set[Path]]:
    """Every split's images, and those the contract's image policy keeps (one check, so one
    line or one warning for the whole dataset)."""
    images = {split: find_images(path) for split, path in splits.items()}
    every = [image for found in images.values() for image in found]
    return images, set(utils.check_images(every, root=root, max_bad=max_bad_images))


def listed_without_bad_images(splits: dict[str, Path], root: Path, out_dir: Path,
                              max_bad_images: int) -> dict[str, Path]:
    """YOLO layout: a split that lost bad images is given as a .txt list of the rest (labels are
    still found beside the images)."""
    images, good = _good_images(splits, root, max_bad_images)
    kept = dict(splits)
    for split, found in images.items():
        rest = [image for image in found if image in good]
        if len(rest) < len(found):
            kept[split] = out_dir / f"{split}-images.txt"
            with utils.atomic_path(kept[split]) as tmp:
                tmp.write_text("".join(f"{image.resolve()}\n" for image in rest),
                               encoding="utf-8")
    return kept


def without_bad_images(dataset: Dataset, out_dir: Path, max_bad_images: int) -> Dataset:
    """Image folders: when bad images are skipped, Ultralytics gets a folder of links to the rest
    (same class folders), never the bad files."""
    images, good = _good_images(dataset.splits, dataset.root, max_bad_images)
    if all(image in good for found in images.values() for image in found):
        return dataset
    splits = {}
    for split, found in images.items():
        splits[split] = out_dir / split
        for image in found:
            if image in good:
                link = out_dir / split / image.relative_to(dataset.splits[split])
                link.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):  # another rank made it
                    os.symlink(image.resolve(), link)
    return dataclasses.replace(dataset, data=str(out_dir), splits=splits)


def require_split(dataset: Dataset, split: str) -> Path:
    if split not in dataset.splits:
        raise utils.DatasetError(f"the dataset has no {split} split (it has "
                                 f"{', '.join(dataset.splits)})")
    return dataset.splits[split]
