"""How long is the training loop blocked per checkpoint? Ours vs a plain local `torch.save`.

    python tools/benchmarks/checkpoint_probe.py --bench-checkpoint-mb 25 --epochs 6

A real job (template/utils.py's `run_job`, wired by the environment to storage, the backend and
MLflow) saves a checkpoint of the given size each epoch -- weights plus AdamW's two moments, a third
each -- and times two things, in alternating order: *ours* -- an atomic `torch.save`
(utils.atomic_path) plus `Job.end_epoch`, which snapshots and queues the last/epoch-N/best uploads
(the weights-only form of epoch-N and best made by the upload worker) and reports the epoch;
*baseline* -- a plain `torch.save` of the same state to a local file. Between checkpoints it
computes for BENCH_TRAIN_S seconds, as training would, while the uploads run in the background.
BENCH_WEIGHTS_FORM=false publishes as before weights-only checkpoints (the one checkpoint under
every key). Prints one JSON line: both lists, and the bytes the uploads sent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "template"))

import utils  # noqa: E402  (the template's copy: the source of truth)

SETTINGS = utils.merge_settings(
    utils.with_defaults(utils.TRAIN_SETTINGS, DATASET_ID="unused", EPOCHS=6),
    (utils.Setting("BENCH_CHECKPOINT_MB", "int", 25, "Checkpoint size in MB.", minimum=1),
     utils.Setting("BENCH_TRAIN_S", "float", 1.0, "Compute between checkpoints, seconds.",
                   minimum=0),
     utils.Setting("BENCH_WEIGHTS_FORM", "bool", True, "Publish weights-only epoch-N/best.")),
)


def make_state(megabytes: int):
    """A state dict shaped like a model's plus its optimizer's: many tensors of mixed sizes,
    the weights a third of the bytes and AdamW's two moments the rest."""
    import torch

    generator = torch.Generator().manual_seed(0)
    sizes = [4096 * (1 + i % 16) for i in range(256)]  # float32 elements per tensor
    scale = megabytes * 2**20 / 4 / sum(sizes) / 3
    tensors = {f"layer{i}.weight": torch.randn(max(int(n * scale), 1), generator=generator)
               for i, n in enumerate(sizes)}
    moments = {i: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
               for i, t in enumerate(tensors.values())}
    return {"model": tensors, "optimizer": {"state": moments}, "epoch": 0,
            "config": {"model_name": "bench"}}


def weights_only(source: Path, dest: Path) -> None:
    import torch

    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer"}, dest)


def count_uploaded_bytes() -> list[int]:
    """Instrument Storage.upload: the sizes of the files it sends (server-side copies send none)."""
    sent: list[int] = []
    upload = utils.Storage.upload

    def counting(self, local_path, path, **kwargs):
        sent.append(Path(local_path).stat().st_size)
        return upload(self, local_path, path, **kwargs)

    utils.Storage.upload = counting
    return sent


def compute_for(seconds: float) -> None:
    import torch

    a = torch.randn(256, 256)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


def work(job: utils.Job) -> utils.JobResult:
    state = make_state(job.cfg.bench_checkpoint_mb)
    ours_path = job.work_dir / "checkpoints" / "last.pt"
    plain_path = job.work_dir / "plain" / "last.pt"
    plain_path.parent.mkdir(parents=True, exist_ok=True)
    ours: list[float] = []
    baseline: list[float] = []
    epochs = job.cfg.epochs
    sent = count_uploaded_bytes()
    weights = weights_only if job.cfg.bench_weights_form else None

    def save_ours(epoch: int) -> None:
        import torch

        started = time.perf_counter()
        with utils.atomic_path(ours_path) as tmp:
            torch.save(state, tmp)
        result = utils.ValidationResult(
            task_type="image_classification", metrics={"accuracy": 0.5},
            primary_metric_name="accuracy", primary_metric_value=0.5, overall_loss=1.0)
        job.end_epoch(epoch, epochs, utils.TrainingMetrics(loss=1.0, accuracy=0.5), result,
                      checkpoint=ours_path, is_best=True, weights=weights)
        ours.append(time.perf_counter() - started)

    def save_plain(epoch: int) -> None:
        import torch

        started = time.perf_counter()
        torch.save(state, plain_path)
        baseline.append(time.perf_counter() - started)

    for epoch in range(1, epochs + 1):
        job.start_epoch()
        compute_for(job.cfg.bench_train_s)
        steps = (save_ours, save_plain) if epoch % 2 else (save_plain, save_ours)
        for step in steps:
            step(epoch)
    job.uploads.flush(timeout=3600)  # every epoch's uploads, before the completed job's copy
    print(json.dumps({"ours": ours, "baseline": baseline, "epochs": epochs,
                      "uploaded_bytes": sum(sent), "megabytes": job.cfg.bench_checkpoint_mb}))
    return utils.JobResult()


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("train", SETTINGS, work, framework="bench", argv=argv,
                         prog="checkpoint_probe.py")


if __name__ == "__main__":
    sys.exit(main())
