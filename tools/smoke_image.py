"""Smoke-test a trainer image before it is pushed: no GPU, no network, a few seconds.

    python tools/smoke_image.py IMAGE trainers/<slug> [--max-size-gb 8]

From the host (needs docker): the image runs as a non-root user and fits the size budget; each of
train.py, evaluate.py, predict.py (and export.py) answers --help through the image's entrypoint,
and `train.py --capabilities` prints the trainer's manifest; and, inside the
image (this same file, mounted read-only), torch is a CUDA build of the CUDA major the trainer's
pixi.toml declares, whose libraries load, and every module of the trainer and every PyPI
dependency of its production environment imports.
The images workflow runs this between the build and the push; run it by hand the same way.

    python smoke_image.py [--cuda-major N] --inside DIST [DIST ...]    the in-image half
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

SCRIPTS = ("train.py", "evaluate.py", "predict.py")  # the platform's job kinds
OPTIONAL_SCRIPTS = ("export.py",)
MOUNTED_AT = "/opt/smoke/smoke_image.py"
GB = 1000**3


class SmokeError(Exception):
    pass


# ---- host side -------------------------------------------------------------------------------

def production_environment(trainer: Path) -> tuple[list[str], str]:
    """PyPI distributions and CUDA major of the environment the image installs (the slug's)."""
    import tomllib

    manifest = tomllib.loads((trainer / "pixi.toml").read_text(encoding="utf-8"))
    env = manifest.get("environments", {}).get(trainer.name)
    if env is None:
        raise SmokeError(f"{trainer}/pixi.toml has no environment {trainer.name!r}: "
                         "the image installs that one")
    features = [manifest.get("feature", {}).get(f, {})
                for f in (env if isinstance(env, list) else env.get("features", []))]
    dists = {name for table in [manifest] + features
             for name in table.get("pypi-dependencies", {})}
    cuda = [f["system-requirements"]["cuda"] for f in features
            if "cuda" in f.get("system-requirements", {})]
    if not cuda:
        raise SmokeError(f"{trainer}/pixi.toml: environment {trainer.name!r} declares no "
                         "[system-requirements] cuda")
    return sorted(dists), str(cuda[0]).split(".")[0]


def docker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def check_config(image: str, max_size_gb: float) -> None:
    result = docker("image", "inspect", image)
    if result.returncode != 0:
        raise SmokeError(f"docker image inspect {image}: {result.stderr.strip()}")
    info = json.loads(result.stdout)[0]
    user = (info.get("Config") or {}).get("User") or ""
    if user.split(":")[0] in ("", "0", "root"):
        raise SmokeError(f"the image runs as root (USER {user!r}); it must name a non-root user")
    size_gb = info["Size"] / GB
    print(f"ok  runs as user {user}; {size_gb:.2f} GB uncompressed (budget {max_size_gb} GB)")
    if size_gb > max_size_gb:
        raise SmokeError(f"the image is {size_gb:.2f} GB, over its {max_size_gb} GB budget")


def check_scripts(image: str, trainer: Path) -> None:
    """Each entry script answers --help through the entrypoint; train.py --capabilities too."""
    missing = [s for s in SCRIPTS if not (trainer / s).is_file()]
    if missing:
        raise SmokeError(f"{trainer} lacks {', '.join(missing)}")
    for script in SCRIPTS + tuple(s for s in OPTIONAL_SCRIPTS if (trainer / s).is_file()):
        result = docker("run", "--rm", "--network", "none", image, script, "--help")
        if result.returncode != 0 or "usage:" not in result.stdout:
            raise SmokeError(f"`{script} --help` in the image exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
        print(f"ok  {script} --help")
    if (trainer / "capabilities.py").is_file():
        result = docker("run", "--rm", "--network", "none", image, "train.py", "--capabilities")
        try:
            manifest = json.loads(result.stdout) if result.returncode == 0 else {}
        except ValueError:
            manifest = {}
        if manifest.get("trainer") != trainer.name:
            raise SmokeError(f"`train.py --capabilities` in the image exited {result.returncode}"
                             f" without this trainer's manifest:\n{result.stdout[:2000]}"
                             f"{result.stderr}")
        print("ok  train.py --capabilities")


def check_inside(image: str, dists: list[str], cuda_major: str) -> None:
    result = docker("run", "--rm", "--network", "none",
                    "--volume", f"{Path(__file__).resolve()}:{MOUNTED_AT}:ro",
                    image, MOUNTED_AT, "--cuda-major", cuda_major, "--inside", *dists)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise SmokeError(f"the in-image checks failed (exit {result.returncode}):\n"
                         f"{result.stderr}")


# ---- inside the image ------------------------------------------------------------------------

def top_level_modules(dist_name: str) -> list[str]:
    """Import names a distribution installs (top_level.txt, else its RECORD)."""
    dist = importlib.metadata.distribution(dist_name)
    listed = dist.read_text("top_level.txt")
    if listed:
        names = set(listed.split())
    else:
        names = set()
        for file in dist.files or []:
            parts = PurePosixPath(str(file)).parts
            if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".data")):
                continue
            if len(parts) > 1 or parts[0].endswith((".py", ".so")):
                names.add(parts[0].split(".", 1)[0])
    return sorted(n for n in names if n.isidentifier() and not n.startswith("_"))


def inside(dists: list[str], cuda_major: str | None) -> int:
    # The scripts run as `python train.py` from the image's workdir: it is their import path.
    sys.path.insert(0, os.getcwd())
    import torch

    cuda = torch.version.cuda
    if not cuda:
        print(f"FAIL torch {torch.__version__} was built without CUDA", file=sys.stderr)
        return 1
    if cuda_major and cuda.split(".")[0] != cuda_major:
        print(f"FAIL torch {torch.__version__} carries CUDA {cuda}, but the environment declares "
              f"cuda = {cuda_major} (pixi.toml [system-requirements]): hosts whose driver "
              f"supports only CUDA {cuda_major} cannot run it", file=sys.stderr)
        return 1
    cudnn = torch.backends.cudnn.version()  # loads libcudnn: the CUDA wheels are in place
    print(f"ok  torch {torch.__version__}, CUDA {cuda}, cuDNN {cudnn}, "
          f"GPU visible: {torch.cuda.is_available()}")
    failures: list[str] = []
    scripts = sorted(p.stem for p in Path.cwd().glob("*.py"))
    for dist in dists:
        try:
            modules = top_level_modules(dist)
        except importlib.metadata.PackageNotFoundError:
            failures.append(f"{dist}: not installed")
            continue
        if not modules:
            failures.append(f"{dist}: installs no importable module")
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # report every broken import, not the first
                failures.append(f"{dist}: import {module}: {type(exc).__name__}: {exc}")
    for module in scripts:
        try:
            importlib.import_module(module)
        except Exception as exc:
            failures.append(f"{module}.py: {type(exc).__name__}: {exc}")
    for label, folder in (("HOME", os.environ.get("HOME", "")), ("temp", tempfile.gettempdir())):
        try:
            tempfile.TemporaryFile(dir=folder or None).close()
        except OSError as exc:
            failures.append(f"{label} folder {folder!r} is not writable: {exc}")
    if failures:
        print("FAIL " + "\nFAIL ".join(failures), file=sys.stderr)
        return 1
    print(f"ok  imported {len(dists)} dependencies and {', '.join(scripts)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", nargs="+", metavar="DIST",
                        help="run the in-image checks for these distributions")
    parser.add_argument("--cuda-major", help="with --inside: the CUDA major torch must carry")
    parser.add_argument("image", nargs="?", help="image reference to test")
    parser.add_argument("trainer", nargs="?", type=Path,
                        help="the trainer folder it was built from")
    parser.add_argument("--max-size-gb", type=float, default=8.0,
                        help="uncompressed size budget in GB (default: 8; the images measure "
                             "6.5-7, and a second CUDA runtime or a leaked build stage would "
                             "pass 9)")
    args = parser.parse_args(argv)
    if args.inside:
        return inside(args.inside, args.cuda_major)
    if not (args.image and args.trainer):
        parser.error("IMAGE and TRAINER are required (or --inside DIST ...)")
    try:
        dists, cuda_major = production_environment(args.trainer)
        check_config(args.image, args.max_size_gb)
        check_scripts(args.image, args.trainer)
        check_inside(args.image, dists, cuda_major)
    except SmokeError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    print(f"ok  {args.image} passed the smoke test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
