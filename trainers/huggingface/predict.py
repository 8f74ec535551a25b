"""Predict with a checkpoint (Hugging Face transformers trainer).

CHECKPOINT_PATH + INPUT_PATH (storage key of an image, a .zip of images, or a prefix ending in
/; or a local file/folder: `python predict.py --checkpoint-path best.pt --input-path ./images`)
-> predictions.json with the top-k classes per image, uploaded under
artifacts/job-{JOB_ID}/predictions/.
"""

from __future__ import annotations

import json

import utils

FRAMEWORK = "huggingface"
SETTINGS = utils.PREDICT_SETTINGS


def main(argv: list[str] | None = None) -> int:
    return utils.run_job("predict", SETTINGS, predict, framework=FRAMEWORK, argv=argv,
                         description=__doc__, prog="predict.py")


def predict(job: utils.Job) -> utils.JobResult:
    import torch
    from PIL import Image

    from data import build_transform
    from model import load_checkpoint, model_from_checkpoint, resolve_device

    cfg = job.cfg
    device = resolve_device(cfg.device)
    checkpoint = load_checkpoint(job.fetch_checkpoint())
    class_names = checkpoint["class_names"]
    model = model_from_checkpoint(checkpoint, device)
    transform = build_transform(cfg.image_size or checkpoint["image_size"], train=False,
                                mean=checkpoint["mean"], std=checkpoint["std"])
    images = job.stage_inputs()
    k = min(cfg.top_k, len(class_names))
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(images), cfg.batch_size):
            batch = images[start:start + cfg.batch_size]
            tensors = []
            for path in batch:
                with Image.open(path) as im:
                    tensors.append(transform(im.convert("RGB")))
            probs = model(torch.stack(tensors).to(device)).softmax(1).cpu()
            top = probs.topk(k, 1)
            for path, values, indices in zip(batch, top.values, top.indices, strict=True):
                predictions.append({"image": path.name, "top_k": [
                    {"class_id": int(i), "class_name": class_names[int(i)],
                     "confidence": round(float(v), 6)}
                    for v, i in zip(values, indices, strict=True)]})

    out = job.work_dir / "predictions" / "predictions.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task_type": checkpoint["task_type"], "class_names": class_names,
                               "predictions": predictions}, indent=2, ensure_ascii=False))
    job.upload_artifacts([out], "predictions")
    print(out)
    return utils.JobResult(metrics={"images": len(predictions)})


if __name__ == "__main__":
    utils.exit_process(main())
