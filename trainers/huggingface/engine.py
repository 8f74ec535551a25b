"""The one training loop every task shares, on Hugging Face `accelerate`.

Why `accelerate` and not transformers' `Trainer`: the platform contract owns the checkpoint
(self-describing `last.pt` written atomically each epoch, weights-only `epoch-N.pt`/`best.pt`
made by the upload worker, resume from an interrupted job's `last.pt`), the per-epoch reports
and the stop paths (SIGTERM -> upload `last`, `cancelled`, exit 143; a backend `{"cancel": true}`
at the end of an epoch). `Trainer` brings its own checkpoint folders, resume logic, signal-free
loop and callbacks that can only ask it to stop at its next step, so every one of those would be
a fight against it. `accelerate` gives exactly the parts wanted - device placement, DDP under
`torchrun` (NCCL on GPUs, gloo on CPUs), AMP with loss scaling, gradient accumulation and
`gather_for_metrics` - and leaves the loop, which stays as short as the other trainers'.

`train_one_epoch` and `validate` each return the epoch's metrics; the task supplies the batches
(`collate`), the metrics (`Validator`) and, optionally, the training accuracy (`batch_accuracy`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import utils

log = logging.getLogger(f"trainer.{__name__}")


def build_accelerator(device: str | None, amp: str, *, gradient_accumulation_steps: int = 1,
                      seed: int = 0):
    """DEVICE (auto, cpu, cuda, cuda:N, N or a list N,M: under torchrun each process takes the
    GPU of its local rank from the list) and AMP (auto: bf16 where the GPU has it, else fp16)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    wanted = (device or "auto").strip().lower()
    cpu = wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available())
    if not cpu:
        if not torch.cuda.is_available():
            raise utils.ConfigError(f"DEVICE={device!r} asks for a GPU but CUDA is not available")
        if wanted not in ("auto", "cuda"):
            select_gpus(device, wanted)
    precision = "no"
    if not cpu and amp != "off":
        precision = amp if amp != "auto" else ("bf16" if torch.cuda.is_bf16_supported()
                                               else "fp16")
    elif cpu and amp not in ("auto", "off"):
        log.info("AMP=%s: mixed precision is for CUDA; training in float32 on the CPU", amp)
    return Accelerator(cpu=cpu, mixed_precision=precision, step_scheduler_with_optimizer=False,
                       gradient_accumulation_steps=gradient_accumulation_steps,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                 data_seed=seed))


def select_gpus(setting: str | None, wanted: str) -> None:
    """Make the GPUs DEVICE lists the visible ones (before CUDA starts): accelerate then gives
    local rank i the i-th of them."""
    ids = [part.strip().removeprefix("cuda:") for part in wanted.split(",") if part.strip()]
    if not all(i.isdigit() for i in ids):
        raise utils.ConfigError(f"DEVICE={setting!r} is not auto, cpu, cuda, cuda:N or a list "
                                "of GPU indices")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)


def train_one_epoch(accelerator, model, loader, optimizer, scheduler, *, task: Any,
                    max_grad_norm: float) -> utils.TrainingMetrics:
    """One pass over the training set; the scheduler steps with every optimizer update. Sums
    stay on the device (no sync per step) and are reduced across processes once."""
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    accuracy = getattr(task, "batch_accuracy", None)
    started = time.monotonic()
    for batch in loader:
        with accelerator.accumulate(model):
            outputs = model(**batch)
            loss = outputs.loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        n = batch_size(batch)
        loss_sum += loss.detach().float() * n
        seen += n
        if accuracy is not None:
            hits, _ = accuracy(batch, outputs)
            correct += hits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.monotonic() - started
    totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), "sum").tolist()
    total_loss, total_correct, total_seen = totals
    return utils.TrainingMetrics(
        loss=total_loss / max(total_seen, 1),
        accuracy=total_correct / max(total_seen, 1) if accuracy is not None else None,
        learning_rate=optimizer.param_groups[0]["lr"],
        extra_metrics={"throughput_img_s": round(total_seen / max(elapsed, 1e-9), 1),
                       "train_time_s": round(elapsed, 3), "images": int(total_seen)})


def validate(accelerator, model, loader, validator) -> utils.ValidationResult:
    """The validator sees every image of the split once, in the split's order, on every
    process: under DDP each batch's labels and outputs are gathered first (`gather_for_metrics`
    drops the padding that evens out the shards). The mean model loss (reduced across processes)
    fills `overall_loss` when the validator leaves it empty."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    seen = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.inference_mode():
        for batch in loader:
            outputs = model(**batch)
            if getattr(outputs, "loss", None) is not None:
                n = batch_size(batch)
                loss_sum += outputs.loss.double() * n
                seen += n
            if accelerator.num_processes > 1:
                batch, outputs = gathered(accelerator, batch, outputs)
            validator.update(batch, outputs)
    result = validator.result()
    total_loss, total_seen = accelerator.reduce(torch.stack([loss_sum, seen]), "sum").tolist()
    if result.overall_loss is None and total_seen > 0:
        result = dataclasses.replace(result, overall_loss=total_loss / total_seen)
    return result


def gathered(accelerator, batch: dict[str, Any], outputs: Any) -> tuple[dict[str, Any], Any]:
    """Every process's share of one batch as one batch, in the loader's order (pixels left
    out: validators read labels and outputs); `outputs` keeps its class."""
    kept = {k: v for k, v in outputs.items() if per_image_output(k)}
    per_image = split_samples({"batch": without_pixels(batch), "outputs": kept})
    merged = join_samples(accelerator.gather_for_metrics(per_image, use_gather_object=True))
    return merged["batch"], type(outputs)(**merged["outputs"])


# Outputs that are not one entry per image (losses, intermediate states, per-layer auxiliary
# predictions): left out of what validation gathers across processes.
NOT_PER_IMAGE = ("loss", "hidden_state", "attentions", "auxiliary", "encoder_", "intermediate")


def per_image_output(name: str) -> bool:
    return not any(part in name for part in NOT_PER_IMAGE)


def without_pixels(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_mask")}


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["pixel_values"])


def split_samples(tree: dict[str, dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """A batch of tensors/lists (dim 0: the images) as one such dict per image, on the CPU."""
    n = None
    for part in tree.values():
        for value in part.values():
            if isinstance(value, (torch.Tensor, list)) and n is None:
                n = len(value)
    samples: list[dict[str, dict[str, Any]]] = [{k: {} for k in tree} for _ in range(n or 0)]
    for name, part in tree.items():
        for key, value in part.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == n:
                value = value.detach().cpu()
            elif not (isinstance(value, list) and len(value) == n):
                continue  # not per image (e.g. a scalar): left out
            for i in range(len(samples)):
                item = value[i]
                samples[i][name][key] = (item.detach().cpu() if isinstance(item, torch.Tensor)
                                         else _to_cpu(item))
    return samples


def _to_cpu(item: Any) -> Any:
    if isinstance(item, dict):
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in item.items()}
    return item


def join_samples(samples: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The inverse of `split_samples`: tensors stacked, anything else as a list."""
    if not samples:
        return {}
    joined: dict[str, dict[str, Any]] = {}
    for name, part in samples[0].items():
        joined[name] = {}
        for key, first in part.items():
            values = [sample[name][key] for sample in samples]
            joined[name][key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return joined


def main_first(accelerator, fn: Callable[[], Any]) -> Any:
    """`fn` on each node's local main process first, then on the others (downloads once per
    node). A TrainerError on the local main process is raised on every process, so none waits
    for a peer that is gone."""
    if accelerator.num_processes == 1:
        return fn()
    import torch.distributed as torch_dist

    failure = None
    value = None
    if accelerator.is_local_main_process:
        try:
            value = fn()
        except utils.TrainerError as exc:
            failure = exc
    failures: list = [None] * accelerator.num_processes
    torch_dist.all_gather_object(failures, failure)
    for exc in failures:
        if exc is not None:
            raise exc
    return value if accelerator.is_local_main_process else fn()


def from_main(accelerator, flag: bool) -> bool:
    """The main process's `flag` on every process (e.g. "the platform asked us to stop")."""
    if accelerator.num_processes == 1:
        return flag
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([float(flag)], device=accelerator.device),
                          from_process=0).item())
