"""The benchmark's baseline: transformers' own `Trainer` on the model and data the trainer used.

    python bench/bare_trainer.py DATA_ROOT OUT_DIR --from-run WORK_DIR --epochs 3 \
        --batch-size 32 --lr 0.001

What a person writes with transformers alone for image folders (`train/<class>/`,
`val/<class>/`): torchvision's ImageFolder resized (and flipped in training) and normalised as
the trainer's checkpoint says, the same architecture built from the configuration in WORK_DIR's
checkpoint (random weights, no download), Trainer's defaults otherwise (AdamW, linear decay,
gradient clipping at 1), evaluation and a checkpoint every epoch.
Prints one JSON line: {"epoch_ends": [unix time after each epoch's save]}. Run by
`tools/bench.py` (declared in bench.toml); not part of the image.
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
    parser.add_argument("--from-run", type=Path, required=True,
                        help="the trainer's work dir: its checkpoints/last.pt names the model")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.001)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    trained = torch.load(args.from_run / "checkpoints" / "last.pt", map_location="cpu",
                         weights_only=True)
    config = dict(trained["model_config"])
    model = AutoModelForImageClassification.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config))
    size = trained["image_size"]
    resize = transforms.Resize((size, size))
    normalise = [transforms.ToTensor(), transforms.Normalize(trained["mean"], trained["std"])]
    train_set = ImageFolder(str(args.data_root / "train"), transforms.Compose(
        [resize, transforms.RandomHorizontalFlip(), *normalise]))
    val_set = ImageFolder(str(args.data_root / "val"), transforms.Compose([resize, *normalise]))

    def collate(items):
        return {"pixel_values": torch.stack([image for image, _ in items]),
                "labels": torch.tensor([label for _, label in items])}

    epoch_ends: list[float] = []

    class EpochEnds(TrainerCallback):
        def on_save(self, *_args, **_kwargs):
            epoch_ends.append(time.time())

    torch.manual_seed(0)
    trainer = Trainer(
        model=model, train_dataset=train_set, eval_dataset=val_set, data_collator=collate,
        callbacks=[EpochEnds()],
        args=TrainingArguments(
            output_dir=str(args.out_dir), num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
            eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
            report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
            seed=0))
    trainer.train()
    print(f"val: {trainer.evaluate()}", file=sys.stderr)
    print(json.dumps({"epoch_ends": epoch_ends}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
