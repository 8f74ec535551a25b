"""The timm baseline: a bare timm training loop, the same model, data, batch and recipe.

    python tools/benchmarks/bare_timm.py DATA_ROOT OUT_DIR --model resnet18 --image-size 64 \
        --batch-size 32 --epochs 4

What a person writes from timm's parts, with the timm trainer's defaults: `create_model`, timm's
train/eval transforms at the model's data config, AdamW (create_optimizer_v2, weight decay
0.05), a per-update cosine schedule with one warmup epoch, label smoothing 0.1, channels-last.
Each epoch trains, validates and saves a plain `torch.save` checkpoint, as timm's own train.py
does. Prints one JSON line: {"epoch_ends": [unix time after each epoch], "train_images": N}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="folder with train/<class>/, val/<class>/")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    classes = sorted(p.name for p in (args.data_root / "train").iterdir() if p.is_dir())
    model = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
    config = resolve_data_config({"input_size": (3, args.image_size, args.image_size)},
                                 model=model)
    train_set = ImageFolder(str(args.data_root / "train"), create_transform(
        **config, is_training=True, scale=(0.08, 1.0), hflip=0.5))
    val_set = ImageFolder(str(args.data_root / "val"), create_transform(**config))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size,
                                             num_workers=args.workers,
                                             persistent_workers=args.workers > 0)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                       warmup_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    epoch_ends: list[float] = []
    updates = 0
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            images = images.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
        model.eval()
        correct = seen = 0
        with torch.inference_mode():
            for images, labels in val_loader:
                images = images.contiguous(memory_format=torch.channels_last)
                correct += (model(images).argmax(1) == labels).sum().item()
                seen += len(labels)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch}, args.out_dir / "last.pt")
        epoch_ends.append(time.time())
        print(f"epoch {epoch + 1}: val acc {correct / max(seen, 1):.3f}", file=sys.stderr)
    print(json.dumps({"epoch_ends": epoch_ends, "train_images": len(train_set)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
