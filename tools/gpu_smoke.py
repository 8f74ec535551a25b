"""One command that shows every trainer works on a GPU: train, evaluate, predict, export.

    python tools/gpu_smoke.py                       every trainer on CUDA (at most ~8 minutes)
    python tools/gpu_smoke.py --trainer timm        one trainer (repeat the flag for more)
    python tools/gpu_smoke.py --dry-run             print each step's command and settings only
    python tools/gpu_smoke.py --device cpu --epochs 1 --trainer pytorch
                                                    the same steps on the CPU: tests the plumbing

For each trainer (tools/list_trainers.py lists them), on its bundled sample (the dataset command
and the cheap settings of its conformance.toml), each step a subprocess of its own, configured by
environment variables as the platform runs a job:

  sample      write the dataset into a local bucket (STORAGE_TYPE=local: no network at all)
  train       EPOCHS=2 on CUDA with mixed precision (AMP, where the trainer declares it)
  evaluate    the trained last.pt on the validation split
  predict     the trained last.pt on two of the sample's images
  export-X    onnx, and TensorRT where the trainer offers it and `tensorrt` imports; each
              export runs the exported model and fails if it disagrees with PyTorch's
  torchrun    timm only: train under `torchrun --nproc_per_node 1` (NCCL on CUDA, gloo on CPU)

Prints a table (trainer, step, seconds, result) on stdout, progress on stderr, and keeps every
step's log and output in the work dir it names. Exit: 0 every step passed, 1 a step failed or the
time budget ran out, 2 no CUDA device (one line on stderr) or bad arguments. Needs no network:
MLflow writes to each job's work dir, no callback URL is set, weights are never downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINERS_DIR = REPO / "trainers"
CONVENTION_FILE = "conformance.toml"  # how each trainer declares its sample and cheapest settings
MANIFEST_FILE = "capabilities.json"
BUDGET_S = 480  # the whole run, all trainers: the "at most 8 minutes on one GPU"
STEP_TIMEOUT_S = 300
# Trainers whose train.py is also run under torchrun. Ultralytics is not: its train.py starts
# torchrun itself for DEVICE=0,1,... (trainers/ultralytics/README.md, "Several GPUs"), which
# needs two GPUs.
TORCHRUN_TRAINERS = ("timm",)
# A format is the TensorRT one when its exporter needs this package (from the manifest).
TENSORRT = "tensorrt"
PREDICT_IMAGES = 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 2


@dataclass
class Step:
    trainer: str
    name: str
    command: list[str]
    env: dict[str, str]  # the job's settings: added to the cleaned environment
    check: str = ""  # a line the step's log must contain (e.g. the DDP backend)
    after: str = "train"  # the step that must have passed first ("" for none)
    skip: str = ""  # why the step is not run here (a toolchain that is not installed)


@dataclass
class Outcome:
    step: Step
    seconds: float = 0.0
    ok: bool = False
    result: str = ""


@dataclass
class Trainer:
    slug: str
    folder: Path
    manifest: dict
    convention: dict
    steps: list[Step] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_smoke.py", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", action="append", metavar="SLUG",
                        help="only this trainer (repeatable; default: every trainer)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default; exits 2 without one) or cpu, to test the plumbing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each step's command and settings; run nothing")
    parser.add_argument("--work-dir", type=Path,
                        help="where buckets, work dirs and logs go (default: a new temp folder)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"time for the whole run; steps left after it fail (default "
                             f"{BUDGET_S})")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def discover(only: list[str] | None) -> list[Trainer]:
    listed = subprocess.run([sys.executable, str(REPO / "tools" / "list_trainers.py")],
                            capture_output=True, text=True, check=True)
    slugs = [entry["slug"] for entry in json.loads(listed.stdout)["include"]]
    unknown = sorted(set(only or ()) - set(slugs))
    if unknown:
        raise SystemExit(f"gpu_smoke.py: unknown trainer(s) {', '.join(unknown)}; "
                         f"known: {', '.join(slugs)}")
    trainers = []
    for slug in slugs:
        if only and slug not in only:
            continue
        folder = TRAINERS_DIR / slug
        trainers.append(Trainer(
            slug, folder, json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")),
            tomllib.loads((folder / CONVENTION_FILE).read_text(encoding="utf-8"))))
    return trainers


def settings_of(trainer: Trainer, script: str) -> dict:
    return trainer.manifest["scripts"][script]["settings_schema"]["properties"]


def mixed_precision(trainer: Trainer, device: str) -> dict[str, str]:
    """AMP on, in the trainer's own spelling of it: `true`, or `auto` (bf16 where supported)."""
    amp = settings_of(trainer, "train").get("AMP")
    if amp is None or device != "cuda":
        return {}
    return {"AMP": "true" if amp.get("type") == "boolean" else "auto"}


def export_formats(trainer: Trainer) -> list[tuple[str, str]]:
    """(format, why it is skipped or ""): onnx, and the TensorRT format where it is offered."""
    formats = []
    for fmt in trainer.manifest["export_formats"]:
        if fmt["name"] == "onnx":
            formats.append(("onnx", ""))
        elif TENSORRT in fmt.get("requires", ()):
            missing = importlib.util.find_spec(TENSORRT) is None
            formats.append((fmt["name"], "tensorrt is not installed" if missing else ""))
    return formats


def plan(trainer: Trainer, root: Path, args: argparse.Namespace) -> list[Step]:
    """Every step of one trainer, in order; each a subprocess run in the trainer's folder."""
    slug, python = trainer.slug, sys.executable
    bucket = root / "bucket"
    dataset = trainer.convention["dataset"]
    cheap = trainer.convention.get("train", {}).get("env", {})
    job = f"smoke-{slug}"
    last = f"checkpoints/job-{job}/last.pt"

    all_settings = {name for script in trainer.manifest["scripts"]
                    for name in settings_of(trainer, script)}

    def env(script: str, job_id: str, **settings: str) -> dict[str, str]:
        declared = settings_of(trainer, script)
        # The cheap settings this script declares, and the variables that are not settings
        # (OMP_NUM_THREADS, ...): train's MODEL_NAME means nothing to predict.py.
        chosen = {k: v for k, v in cheap.items() if k in declared or k not in all_settings}
        return {**chosen, "JOB_ID": job_id, "DEVICE": args.device, "STORAGE_TYPE": "local",
                "LOCAL_STORAGE_ROOT": str(bucket), "WORK_DIR": str(root / "work" / job_id),
                **settings}

    sample_command = [part.replace("{python}", python).replace("{root}", str(bucket))
                      for part in dataset["command"]]
    steps = [Step(slug, "sample", sample_command, {}, after="")]
    steps.append(Step(slug, "train", [python, "train.py"], env(
        "train", job, DATASET_ID=dataset["id"], EPOCHS=str(args.epochs),
        **mixed_precision(trainer, args.device)), after="sample"))
    steps.append(Step(slug, "evaluate", [python, "evaluate.py"], env(
        "evaluate", f"{job}-eval", DATASET_ID=dataset["id"], CHECKPOINT_PATH=last)))
    steps.append(Step(slug, "predict", [python, "predict.py"], env(
        "predict", f"{job}-predict", CHECKPOINT_PATH=last, INPUT_PATH="smoke-inputs/")))
    for fmt, skipped in export_formats(trainer):
        steps.append(Step(slug, f"export-{fmt}", [python, "export.py"], env(
            "export", f"{job}-export-{fmt}", CHECKPOINT_PATH=last, EXPORT_FORMAT=fmt),
            skip=skipped))
    if slug in TORCHRUN_TRAINERS:
        backend = "nccl" if args.device == "cuda" else "gloo"
        steps.append(Step(slug, "torchrun", [
            python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "train.py"], env("train", f"{job}-ddp", DATASET_ID=dataset["id"],
                             EPOCHS=str(args.epochs), **mixed_precision(trainer, args.device)),
            check=f"backend {backend}", after="sample"))
    return steps


def base_environ(trainers: list[Trainer], root: Path) -> dict[str, str]:
    """This process's environment without any setting a trainer declares (a job's settings come
    only from its step), isolated and offline."""
    declared = {name for t in trainers for script in t.manifest["scripts"]
                for name in settings_of(t, script)}
    env = {k: v for k, v in os.environ.items() if k not in declared}
    env.update({"HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
                "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"})
    return env


def cuda_device() -> str | None:
    """The first GPU's name, or None: asked in a subprocess so --help never imports torch."""
    probe = ("import torch\n"
             "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def stage_inputs(bucket: Path) -> None:
    """A few of the sample's images under the local bucket's `smoke-inputs/` for predict."""
    dest = bucket / "smoke-inputs"
    dest.mkdir(parents=True, exist_ok=True)
    for archive in sorted((bucket / "datasets").glob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES)]
            for index, name in enumerate(sorted(names)[:PREDICT_IMAGES]):
                (dest / f"{index}{Path(name).suffix.lower()}").write_bytes(zf.read(name))


def run_step(step: Step, folder: Path, base: dict[str, str], logs: Path,
             timeout: float) -> Outcome:
    outcome = Outcome(step)
    if step.skip:
        outcome.ok, outcome.result = True, f"skipped: {step.skip}"
        return outcome
    log_file = logs / f"{step.trainer}-{step.name}.log"
    started = time.monotonic()
    try:
        done = subprocess.run(step.command, cwd=folder, env={**base, **step.env},
                              capture_output=True, text=True, timeout=timeout)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = None, _text(exc.stdout), _text(exc.stderr)
    outcome.seconds = time.monotonic() - started
    log_file.write_text(f"$ {' '.join(step.command)}\n--- stdout\n{out}\n--- stderr\n{err}",
                        encoding="utf-8")
    if code is None:
        outcome.result = f"timed out after {timeout:.0f} s (log: {log_file})"
    elif code != 0:
        last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
        outcome.result = f"exit {code}: {last[:160]} (log: {log_file})"
    elif step.check and step.check not in out + err:
        outcome.result = f"'{step.check}' not in its log (log: {log_file})"
    else:
        outcome.ok, outcome.result = True, summary(step, out)
    return outcome


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def summary(step: Step, stdout: str) -> str:
    """One short word on a passed step: the AMP used, the export's numeric check."""
    if step.name in ("train", "torchrun"):
        amp = step.env.get("AMP")
        return f"ok, AMP={amp}" if amp else "ok, float32 (no AMP setting or on CPU)"
    if step.name.startswith("export-"):
        archive = Path(step.env["LOCAL_STORAGE_ROOT"]) / "artifacts" / \
            f"job-{step.env['JOB_ID']}" / "export" / f"export-{step.env['EXPORT_FORMAT']}.zip"
        try:
            with zipfile.ZipFile(archive) as zf:
                check = json.loads(zf.read("metadata.json"))["verification"]
            return (f"ok, {check['status']}: max |diff| {check['max_abs_diff']:.2g} "
                    f"<= {check['tolerance']:g}")
        except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            return f"ok (no verification read from {archive.name}: {type(exc).__name__})"
    return "ok"


def print_plan(trainers: list[Trainer]) -> None:
    for trainer in trainers:
        print(f"# {trainer.slug}  (in {trainer.folder.relative_to(REPO)})")
        for step in trainer.steps:
            if step.skip:
                print(f"{step.name:<18} skipped: {step.skip}")
                continue
            settings = " ".join(f"{k}={v}" for k, v in step.env.items())
            print(f"{step.name:<18} {settings} {' '.join(step.command)}"
                  + (f"   [log must say '{step.check}']" if step.check else ""))


def print_table(outcomes: list[Outcome]) -> None:
    rows = [("trainer", "step", "seconds", "result")] + [
        (o.step.trainer, o.step.name, f"{o.seconds:.1f}", o.result) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
        if index == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 6)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trainers = discover(args.trainer)
    if args.dry_run:
        root = args.work_dir or Path(tempfile.gettempdir()) / "gpu-smoke-XXXXXXXX"
        for trainer in trainers:
            trainer.steps = plan(trainer, root.resolve() / trainer.slug, args)
        print_plan(trainers)
        return EXIT_OK
    gpu = cuda_device() if args.device == "cuda" else "cpu"
    if gpu is None:
        print("gpu_smoke.py: no CUDA device here (torch.cuda.is_available() is False); "
              "nothing was run", file=sys.stderr)
        return EXIT_NO_CUDA
    root = (args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))).resolve()
    for trainer in trainers:
        trainer.steps = plan(trainer, root / trainer.slug, args)
    print(f"gpu_smoke: {len(trainers)} trainer(s) on {gpu}, work dir {root}", file=sys.stderr)
    base = base_environ(trainers, root)
    for folder in ("home", "tmp", "logs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    outcomes = []
    for trainer in trainers:
        passed: set[str] = {""}
        for step in trainer.steps:
            left = deadline - time.monotonic()
            if step.after not in passed:
                outcome = Outcome(step, result=f"not run: {step.after} did not pass")
            elif left <= 0:
                outcome = Outcome(step, result=f"not run: the {args.budget_s:.0f} s budget "
                                               "is spent")
            else:
                outcome = run_step(step, trainer.folder, base, root / "logs",
                                   min(left, STEP_TIMEOUT_S))
            if step.name == "sample" and outcome.ok:
                stage_inputs(root / trainer.slug / "bucket")
            if outcome.ok:
                passed.add(step.name)
            outcomes.append(outcome)
            print(f"  {trainer.slug} {step.name}: {outcome.result} ({outcome.seconds:.1f} s)",
                  file=sys.stderr)
    print_table(outcomes)
    failed = [o for o in outcomes if not o.ok]
    print(f"gpu_smoke: {len(outcomes) - len(failed)} of {len(outcomes)} steps passed; "
          f"logs in {root / 'logs'}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
