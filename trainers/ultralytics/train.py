"""Train Ultralytics YOLO (detection, segmentation, pose, classification) on the platform
contract.

The platform runs this as a job configured by environment variables (see --help; a flag wins
over its variable). It stages datasets/{DATASET_ID}.zip (the platform's annotations; or the
YOLO layout with data.yaml, image folders for classification), trains, reports every epoch to
the backend and MLflow with the platform's metric names, uploads
checkpoints/job-{JOB_ID}/{epoch-N,best,last}.pt, validates best.pt at the end, uploads its plots
and results to artifacts/job-{JOB_ID}/ and ends with a `completed`, `failed` or `cancelled`
status.

MODEL_NAME (or TASK_TYPE) picks the task: yolo11n detects, yolo11n-seg segments, yolo11n-pose
finds keypoints, yolo11n-cls classifies. CHECKPOINT_PATH resumes an interrupted run's last.pt at
its next epoch, or fine-tunes a finished model. DEVICE=0,1,... trains on several GPUs under
torchrun (rank 0 reports).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import distributed

import options
import utils

log = logging.getLogger(f"trainer.{__name__}")

FRAMEWORK = "ultralytics"
OPTIMIZERS = ("AdamW", "Adam", "Adamax", "NAdam", "RAdam", "RMSprop", "SGD", "MuSGD", "auto")
ARTIFACTS = ("results.csv", "results.png", "results.json", "args.yaml", "confusion_matrix*.png",
             "*PR_curve.png", "*F1_curve.png", "*P_curve.png", "*R_curve.png")

SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.TRAIN_SETTINGS, MODEL_NAME="yolo11n", EPOCHS=10, BATCH_SIZE=16,
                        IMAGE_SIZE=640, NUM_WORKERS=8),
    (
        # Ultralytics checks lr0 against [0, 1] (a CFG_FRACTION_KEY) only once training starts,
        # after the download: checked up front here (a test keeps this equal to its range).
        dataclasses.replace(next(s for s in utils.TRAIN_SETTINGS if s.name == "LEARNING_RATE"),
                            maximum=1.0),
        utils.Setting("OPTIMIZER", "str", "AdamW", "Ultralytics optimizer (`auto` chooses its "
                      "own and ignores LEARNING_RATE).", choices=OPTIMIZERS, group="advanced"),
        utils.Setting("AMP", "bool", True, "Mixed precision on GPU (always off on CPU).",
                      group="advanced"),
        utils.Setting("OFFLINE", "bool", False, "Never download anything: PRETRAINED=true then "
                      "needs {MODEL_NAME}.pt in WEIGHTS_DIR.", group="advanced"),
        utils.Setting("WEIGHTS_DIR", help="Folder of pretrained weights ({MODEL_NAME}.pt; "
                      "downloads land here); default: CACHE_DIR/weights.", group="advanced"),
    ),
)


def main(argv: list[str] | None = None) -> int:
    processes = distributed.processes_to_launch(SETTINGS, argv, prog="train.py",
                                                description=__doc__)
    if processes > 1:
        distributed.relaunch_under_torchrun(Path(__file__).resolve(),
                                            sys.argv[1:] if argv is None else argv, processes)
    return utils.run_job("train", SETTINGS, train, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="train.py", options=options.OPTIONS)


def train(job: utils.Job) -> utils.JobResult:
    with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints its progress to stdout
        trainer, reporter, dataset = fit(job)
    return finish(job, trainer, reporter, dataset)


def fit(job: utils.Job):
    """Check everything, stage the inputs, train; Ultralytics' trainer and our reporter."""
    import reporting
    import runtime

    import model
    from data import prepare_dataset

    cfg = job.cfg
    job.require_trusted_checkpoint()  # before any work: Ultralytics unpickles a whole model
    spec = model.resolve_model(cfg.model_name, cfg.task_type)
    weights_dir = Path(cfg.weights_dir).resolve() if cfg.weights_dir else job.cache_dir / "weights"
    log.info("loading Ultralytics (%s)", "offline" if cfg.offline else "downloads allowed")
    runtime.prepare(job.work_dir, weights_dir, cpu_threads=runtime.cpu_threads(cfg.device),
                    offline=cfg.offline, rank=job.rank)
    device = model.ultralytics_device(cfg.device)
    extra = options.check_extra_args(cfg.extra_args)

    start = choose_start(job, spec, weights_dir)
    root = distributed.rank_zero_first(job, "dataset", lambda: str(job.stage_dataset()))
    dataset = prepare_dataset(Path(root), start.task, job.work_dir, cfg.max_bad_images,
                              val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if dataset.annotations is not None:
        job.record_split(dataset.annotations)
    if start.resume and dataset.class_names != start.checkpoint.class_names:
        raise utils.DatasetError(
            f"cannot resume: the checkpoint's classes {start.checkpoint.class_names} differ "
            f"from the dataset's {dataset.class_names} (a finished model would be fine-tuned)")

    from ultralytics import YOLO

    save_dir = job.work_dir / "ultralytics" / "train"
    if start.resume:
        if extra:
            log.warning("EXTRA_ARGS ignored: a resumed run keeps its own arguments")
        restore_results_csv(start.checkpoint.train_results, save_dir / "results.csv")
        arguments = options.resume_arguments(cfg, data=dataset.data, device=device,
                                             save_dir=save_dir)
    else:
        arguments = options.train_arguments(cfg, data=dataset.data, device=device,
                                            save_dir=save_dir, extra=extra,
                                            world_size=job.world_size)
        arguments["pretrained"] = start.source.endswith(".pt")
    log.info("building %s from %s", spec.name if not cfg.checkpoint_path else
             start.checkpoint.model_name, Path(start.source).name)
    yolo = YOLO(start.source, task=start.task)
    reporter = reporting.EpochReporter(job, start.task, job.work_dir / "checkpoints")
    if job.is_main:
        reporter.attach(yolo)
    trainer = reporting.platform_trainer(yolo.task_map[start.task]["trainer"], start.task)
    yolo.train(trainer=trainer, **arguments)
    return yolo.trainer, reporter, dataset


@dataclasses.dataclass(frozen=True)
class Start:
    """Where training starts: a model YAML, pretrained weights, or a checkpoint."""

    source: str  # what YOLO() loads: {name}.yaml or a .pt file
    task: str  # Ultralytics task
    checkpoint: Any = None  # model.CheckpointInfo when CHECKPOINT_PATH is set
    resume: bool = False  # continue an interrupted run (else: a new run from `source`)


def choose_start(job: utils.Job, spec, weights_dir: Path) -> Start:
    import model

    cfg = job.cfg
    if not cfg.checkpoint_path:
        if not cfg.pretrained:
            model.check_model_config(spec)
            return Start(spec.config, spec.task)
        weights = distributed.rank_zero_first(job, "weights", lambda: str(
            model.pretrained_weights(spec, weights_dir, offline=cfg.offline)))
        return Start(weights, spec.task)
    path = Path(distributed.rank_zero_first(job, "checkpoint",
                                            lambda: str(job.fetch_checkpoint(trusted_only=True))))
    info = model.inspect_checkpoint(path)
    utils.check_checkpoint_model(cfg, info.model_name,
                                 lambda wanted, held: model.same_model(wanted, held, info.task))
    job.refuse_weights_only_resume(not info.resumable)
    if cfg.task_type and model.TASKS.get(cfg.task_type) != info.task:
        raise utils.ConfigError(f"TASK_TYPE={cfg.task_type} but CHECKPOINT_PATH holds a "
                                f"{info.task_type} model")
    finished = not info.resumable or info.trained_epochs >= (info.total_epochs or 0)
    if finished:
        log.info("fine-tuning %s, a finished %s model (%d epochs)", path.name,
                       info.task, info.trained_epochs)
        return Start(str(path), info.task, info)
    log.info("resuming %s after epoch %d of %d (its hyperparameters stand)", path.name,
                   info.trained_epochs, info.total_epochs)
    if cfg.epochs != info.total_epochs:
        log.warning("EPOCHS=%d ignored: the interrupted run continues to its %d epochs",
                          cfg.epochs, info.total_epochs)
    return Start(str(path), info.task, info, resume=True)


def restore_results_csv(columns: dict[str, list], csv_path: Path) -> None:
    """results.csv as the interrupted run left it, so the resumed run appends its epochs."""
    if not columns:
        return
    names = list(columns)
    rows = zip(*(columns[name] for name in names), strict=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with utils.atomic_path(csv_path) as tmp:
        tmp.write_text(",".join(names) + "\n" + "".join(
            ",".join(f"{value:.6g}" if isinstance(value, float) else str(value)
                     for value in row) + "\n" for row in rows), encoding="utf-8")


def finish(job: utils.Job, trainer, reporter, dataset) -> utils.JobResult:
    """Upload the run's plots, results and per-image results; the job's final metrics.

    The checkpoints were published epoch by epoch (`job.end_epoch`), and the contract makes
    last.pt weights-only when the job completes: Ultralytics' own stripped best.pt/last.pt in
    its save_dir are the same weights and are not uploaded again.
    """
    import image_results

    import model

    if not job.is_main:
        return utils.JobResult()
    save_dir = Path(trainer.save_dir)
    best, last = Path(trainer.best), Path(trainer.last)
    for model_file in (best, last):  # the finished models kept locally carry it too
        if model_file.is_file():
            model.write_with_provenance(model_file, model_file, job.provenance())
    kept = keep_finished_models(job.work_dir / "checkpoints", best, last)
    if reporter.epochs_reported:  # last.pt holds the weights of the last validation sent
        image_results.send(job, last, trainer.args.task, dataset.splits["val"],
                           dataset.class_names, split="val", imgsz=job.cfg.image_size,
                           device=model.ultralytics_device(job.cfg.device))
    final = reporter.final or reporter.last
    metrics = dict(final.metrics) if final else {}
    if reporter.best_epoch is not None:
        metrics["best_epoch"] = reporter.best_epoch
    if final:
        (save_dir / "results.json").write_text(json.dumps({
            "task_type": final.task_type, "metrics": metrics,
            "primary_metric": {final.primary_metric_name: final.primary_metric_value},
            "per_class_metrics": final.per_class_metrics,
            "confusion_matrix": final.confusion_matrix, "class_names": final.class_names,
            "epochs": reporter.epochs_reported, "best_checkpoint": job.best_checkpoint_uri,
        }, indent=2, ensure_ascii=False), encoding="utf-8")
        step = reporter.epochs_reported[-1] if reporter.epochs_reported else None
        job.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=step)
    artifacts = sorted({p for pattern in ARTIFACTS for p in save_dir.glob(pattern)})
    job.upload_artifacts(artifacts)
    print(f"best checkpoint: {kept.get('best.pt', '-')} ({job.best_checkpoint_uri})")
    print(f"artifacts: {job.storage.uri(job.artifact_key(''))}")
    print(f"work dir: {job.work_dir}")
    return utils.JobResult(metrics=metrics, checkpoint_path=job.best_checkpoint_uri)


def keep_finished_models(folder: Path, *models: Path) -> dict[str, Path]:
    """Copies of the finished models in WORK_DIR/checkpoints/, where every trainer keeps its
    best.pt and last.pt: copies, as Ultralytics rewrites its own files in place."""
    import shutil

    kept = {}
    for source in models:
        if source.is_file():
            with utils.atomic_path(folder / source.name) as tmp:
                shutil.copyfile(source, tmp)
            kept[source.name] = folder / source.name
    return kept


if __name__ == "__main__":
    utils.exit_process(main())
