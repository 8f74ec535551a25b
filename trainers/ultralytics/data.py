"""The staged dataset, checked before Ultralytics sees it.

Detection, segmentation and pose: the YOLO layout with a `data.yaml` (`names`, `train`, `val`,
optional `test`; relative paths resolved against the extracted folder; pose adds `kpt_shape`,
`flip_idx` and, optionally, `kpt_names` and a 0-based `skeleton`). Classification: image
folders `train/<class>/...` and `val/<class>/...` (`valid/`, `validation/` accepted; `test/`
optional). Problems are reported as DatasetError naming what is missing: left to Ultralytics, a
missing folder becomes a download attempt (its `download:` key, or a dataset of the same name from
its servers) or a traceback. Every image passes the contract's image policy first
(`utils.check_images`): bad ones fail the job in one line, or, within MAX_BAD_IMAGES, are left out
of what Ultralytics is given (a list of the rest, or a folder of links to them).

For the YOLO layout a resolved copy of data.yaml is written into the work dir (absolute `path`,
no `download`), and that copy is what Ultralytics reads.

The platform's own annotations (contract section 2a, read by `utils.read_platform_annotations`)
are converted first, by `platform_layout`, into the layout above, beside the staged dataset in
the cache: once per dataset version, annotation file, task and split settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import utils
from model import TASK_TYPES  # Ultralytics' task -> the platform's

log = logging.getLogger(f"trainer.{__name__}")

YAML_NAMES = ("data.yaml", "data.yml")
CONVERTER_VERSION = 3  # a change to what platform_layout writes: bump, so caches are rebuilt
# Ultralytics' own convention for class folders named by class id ({split}/{id}/), which keeps
# the classes in the dataset's order rather than sorted by name: their names in this file.
CLASS_NAMES_FILE = ".ndjson.yaml"
VAL_FOLDERS = ("val", "valid", "validation")


@dataclasses.dataclass(frozen=True)
class Dataset:
    root: Path
    data: str  # what Ultralytics' `data=` gets: the resolved data.yaml, or the folder (classify)
    class_names: list[str]
    splits: dict[str, Path]  # train, val and test when present
    kpt_shape: tuple[int, int] | None = None  # pose: keypoints per object, values per keypoint
    annotations: Any = None  # utils.PlatformDataset when converted from platform annotations


def prepare_dataset(root: Path, task: str, work_dir: Path, max_bad_images: int = 0, *,
                    val_fraction: float = 0.2, split_seed: int = 42) -> Dataset:
    annotations = None
    if utils.find_platform_annotations(root, TASK_TYPES[task]) is not None:
        annotations = utils.read_platform_annotations(
            root, TASK_TYPES[task], val_fraction=val_fraction, split_seed=split_seed)
        root = platform_layout(root, task, annotations)
    elif not any((root / name).is_file() for name in YAML_NAMES) and not (
            root / "train").is_dir():  # neither Ultralytics' layout nor image folders
        raise no_known_format(root, task)
    if task == "classify":
        dataset = without_bad_images(image_folders(root), work_dir / "dataset-checked",
                                     max_bad_images)
    else:
        dataset = yolo_layout(root, work_dir / "data.yaml", max_bad_images, pose=task == "pose")
    return dataclasses.replace(dataset, annotations=annotations)


def no_known_format(root: Path, task: str) -> utils.DatasetError:
    """What the dataset holds and every format this trainer accepts for the task."""
    from capabilities import CAPABILITIES

    return utils.dataset_format_error(root, [layout for layout in CAPABILITIES.dataset_layouts
                                             if TASK_TYPES[task] in layout.task_types])


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


def yolo_layout(root: Path, resolved_yaml: Path, max_bad_images: int = 0, *,
                pose: bool = False) -> Dataset:
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
    keypoints = pose_keys(raw, problems) if pose else {}
    if problems:
        raise utils.DatasetError("data.yaml: " + "; ".join(problems))
    splits = listed_without_bad_images(splits, root, resolved_yaml.parent, max_bad_images)
    resolved = {"path": str(base), **{k: str(v) for k, v in splits.items()},
                "names": dict(enumerate(names)), **keypoints}
    resolved_yaml.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(resolved_yaml) as tmp:
        tmp.write_text("# Resolved from the dataset's data.yaml by data.py (absolute paths, no "
                       "download).\n" + yaml.safe_dump(resolved, sort_keys=False,
                                                       allow_unicode=True), encoding="utf-8")
    shape = tuple(keypoints["kpt_shape"]) if keypoints else None
    return Dataset(root, str(resolved_yaml), names, splits, shape)


def pose_keys(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The pose entries of data.yaml, checked: `kpt_shape` [count, 2 or 3], `flip_idx` (a
    permutation of the keypoints; identity when absent), optional `kpt_names` (a list, or
    Ultralytics' {class id: list}), `skeleton` (0-based pairs) and `kpt_oks_sigmas`."""
    shape = raw.get("kpt_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)
            and shape[0] > 0 and shape[1] in (2, 3)):
        problems.append(f"pose needs `kpt_shape: [keypoints, 2 or 3]` (found {shape!r})")
        return {}
    count = shape[0]
    keys: dict[str, Any] = {"kpt_shape": shape}
    flip = raw.get("flip_idx", list(range(count)))
    if not isinstance(flip, list) or sorted(flip) != list(range(count)):
        problems.append(f"`flip_idx` must order the {count} keypoints 0..{count - 1} "
                        f"(found {flip!r})")
    keys["flip_idx"] = flip
    names = raw.get("kpt_names")
    if isinstance(names, list):
        names = {class_id: names for class_id in range(len(read_names(raw)))}
    if names is not None:
        if not isinstance(names, dict) or any(not isinstance(v, list) or len(v) != count
                                              for v in names.values()):
            problems.append(f"`kpt_names` must list {count} names (per class, or once)")
        else:
            keys["kpt_names"] = {int(k): [str(n) for n in v] for k, v in names.items()}
    skeleton = raw.get("skeleton")
    if skeleton is not None:
        if not isinstance(skeleton, list) or not all(
                isinstance(pair, list) and len(pair) == 2
                and all(isinstance(i, int) and 0 <= i < count for i in pair)
                for pair in skeleton):
            problems.append(f"`skeleton` must be pairs of keypoint indexes 0..{count - 1}")
        else:
            keys["skeleton"] = skeleton
    if raw.get("kpt_oks_sigmas") is not None:
        keys["kpt_oks_sigmas"] = raw["kpt_oks_sigmas"]
    return keys


def image_folders(root: Path) -> Dataset:
    train = root / "train"
    if not train.is_dir():
        raise utils.DatasetError(f"the dataset has no train/ folder (found: {_listing(root)}); "
                                 "classification needs train/<class>/ and val/<class>/ folders")
    names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / CLASS_NAMES_FILE).is_file():  # folders named by class id (platform_layout)
        import yaml

        named = yaml.safe_load((root / CLASS_NAMES_FILE).read_text(encoding="utf-8"))["names"]
        names = [str(named[i]) for i in sorted(named)]
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
    if (dataset.root / CLASS_NAMES_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dataset.root / CLASS_NAMES_FILE, out_dir / CLASS_NAMES_FILE)
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


# --- the platform's annotations, converted to what Ultralytics reads ------------------------------


def platform_layout(root: Path, task: str, dataset: Any) -> Path:
    """The staged dataset's platform annotations (`dataset`, a utils.PlatformDataset) as the YOLO
    layout (or, to classify, as class folders), written once beside it in the cache and reused
    while the annotation file, its split and this converter stay the same.

    The folder is built under a temporary name and renamed into place, so a job killed half-way
    leaves nothing that a retry would take for a finished conversion.
    """
    file = dataset.annotation_file
    splits = {split: [image.id for image in dataset.split(split)] for split in ("val", "test")}
    digest = utils.json_digest([utils.file_sha256(file), CONVERTER_VERSION, task, splits])
    # A hidden sibling of the dataset's root: in the cache entry of this dataset version, and
    # never inside the dataset, which the reader and the image checks walk.
    target = root.parent / f".{root.name}.ultralytics-{task}-{digest[:16]}"
    for split in ("train", "val"):
        if not dataset.split(split):
            raise utils.DatasetError(f"{file.name}: the {split} split has no images "
                                     f"(splits from {dataset.split_source or 'nowhere'})")
    if target.is_dir():
        log.info("platform annotations %s: converted layout reused (%s)", file.name, target)
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.converting-", dir=root.parent))
    try:
        if task == "classify":
            write_class_folders(dataset, staging)
        else:
            write_yolo(dataset, task, staging)
        try:
            staging.rename(target)
        except OSError:  # another rank finished first: theirs is the same
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = ", ".join(f"{len(dataset.split(s))} {s}" for s in ("train", "val", "test")
                       if dataset.split(s))
    log.info("platform annotations %s: %d classes, %s images (split from %s) -> %s", file.name,
             len(dataset.class_names), counts, dataset.split_source, target)
    return target


def link(source: Path, destination: str | Path) -> None:
    """A hard link (the cache's own file, no copy), or a symbolic one across file systems."""
    try:
        os.link(source, destination)
    except OSError:
        os.symlink(source.resolve(), destination)


def flat_names(images: list[Any]) -> dict[str, str]:
    """A file name per image, unique in its split: its path under images/ with `/` as `__`
    (Ultralytics finds a label by the image path's last `/images/`, which must be ours). Unique
    without the extension too: `a.png` and `a.jpg` would share the label `a.txt`."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for index, image in enumerate(images):
        name = re.sub(r"[^\w.-]", "_", image.file_name.replace("/", "__"))
        if name.rsplit(".", 1)[0].lower() in taken:
            name = f"{index:06d}_{name}"
        taken.add(name.rsplit(".", 1)[0].lower())
        names[image.id] = name
    return names


def write_class_folders(dataset: Any, out: Path) -> None:
    """{split}/{class id}/{image} with the names in CLASS_NAMES_FILE (sorted folder names would
    reorder the classes): every labelled image, linked; unlabelled ones are left out."""
    import yaml

    unlabelled = 0
    for split in ("train", "val", "test"):
        images = dataset.split(split)
        if not images:
            continue
        for class_id in range(len(dataset.class_names)):  # every class in every split it reads
            (out / split / str(class_id)).mkdir(parents=True)
        names = flat_names(images)
        for image in images:
            if image.label is None:
                unlabelled += 1
                continue
            link(image.path, out / split / str(image.label) / names[image.id])
    (out / CLASS_NAMES_FILE).write_text(yaml.safe_dump(
        {"names": dict(enumerate(dataset.class_names))}, allow_unicode=True), encoding="utf-8")
    if unlabelled:
        log.warning("%s: %d image(s) without a class left out", dataset.annotation_file.name,
                    unlabelled)


def write_yolo(dataset: Any, task: str, out: Path) -> None:
    """images/{split}/ (links), labels/{split}/*.txt and data.yaml, as Ultralytics reads them."""
    import yaml

    splits = [s for s in ("train", "val", "test") if dataset.split(s)]
    kpt_count = 0  # keypoints per object: pose only (every object of every image, read once)
    if task == "pose":
        kpt_count = len(dataset.keypoint_names) or max(
            (len(o.keypoints) for image in dataset.images for o in image.objects), default=0)
    if task == "pose" and not kpt_count:
        raise utils.DatasetError(f"{dataset.annotation_file.name}: pose estimation needs "
                                 "keypoints, and no category or annotation has any")
    for split in splits:
        images = dataset.split(split)
        names = flat_names(images)
        image_dir, label_dir = out / "images" / split, out / "labels" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        # Thousands of small files: plain strings and os-level calls, no Path or file object
        # per image (they cost more than the file system's own work here).
        images_at, labels_at = f"{image_dir}{os.sep}", f"{label_dir}{os.sep}"
        for image in images:
            name = names[image.id]
            link(image.path, images_at + name)
            if not image.objects:  # no label file: Ultralytics' background image
                continue
            utils.write_file(f"{labels_at}{name.rsplit('.', 1)[0]}.txt",
                             label_text(task, image, kpt_count), new=True)
    data: dict[str, Any] = {"path": ".", **{s: f"images/{s}" for s in splits},
                            "names": dict(enumerate(dataset.class_names))}
    if task == "pose":
        import pose

        keypoint_names = list(dataset.keypoint_names) or [str(i) for i in range(kpt_count)]
        data.update(kpt_shape=[kpt_count, 3], flip_idx=pose.flip_index(keypoint_names),
                    kpt_names={i: keypoint_names for i in range(len(dataset.class_names))},
                    skeleton=[list(pair) for pair in dataset.skeleton])
    (out / "data.yaml").write_text(
        f"# Converted from {dataset.annotation_file.name} by data.py (platform annotations).\n"
        + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def label_text(task: str, image: Any, kpt_count: int) -> bytes:
    """An image's YOLO label file: one line per object (`label_line`), built in one pass."""
    width, height = image.width, image.height
    if task == "detect":  # the common case, inlined: boxes were clipped to the image by the
        # reader, so their centres and sizes are already within 0..1 (label_line clamps)
        return "".join([f"{o.class_id} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                        f"{w / width:.6f} {h / height:.6f}\n"
                        for o in image.objects for x, y, w, h in (o.bbox,)]).encode()
    return "".join([label_line(task, o, width, height, kpt_count) + "\n"
                    for o in image.objects]).encode()


def label_line(task: str, obj: Any, width: int, height: int, kpt_count: int) -> str:
    """One object as a YOLO label line, coordinates normalised to 0..1."""

    def norm(x: float, y: float) -> str:
        return f"{min(max(x / width, 0.0), 1.0):.6f} {min(max(y / height, 0.0), 1.0):.6f}"

    x, y, w, h = obj.bbox
    if task == "segment":
        polygon = segment_outline(obj)
        return " ".join([str(obj.class_id), *(norm(px, py) for px, py in polygon)])
    line = f"{obj.class_id} {norm(x + w / 2, y + h / 2)} {w / width:.6f} {h / height:.6f}"
    if task == "pose":
        points = list(obj.keypoints) + [(0.0, 0.0, 0)] * (kpt_count - len(obj.keypoints))
        line += "".join(f" {norm(px, py) if v else '0.000000 0.000000'} {int(v)}"
                        for px, py, v in points)
    return line


def segment_outline(obj: Any) -> list[tuple[float, float]]:
    """One polygon per object, as YOLO labels hold: several parts joined by Ultralytics' own
    `merge_multi_segment` (as its COCO converter does); no polygon at all: the box."""
    if not obj.polygons:
        x, y, w, h = obj.bbox
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if len(obj.polygons) == 1:
        flat = obj.polygons[0]
        return list(zip(flat[0::2], flat[1::2], strict=True))
    import numpy as np
    from ultralytics.data.converter import merge_multi_segment

    merged = np.concatenate(merge_multi_segment([list(p) for p in obj.polygons]), axis=0)
    return [(float(px), float(py)) for px, py in merged]
