"""The YOLO baseline: the bare Ultralytics API, with the settings a trainer run used.

    python tools/benchmarks/bare_yolo.py ARGS_YAML SAVE_DIR

ARGS_YAML is the `args.yaml` Ultralytics wrote for a run of trainers/ultralytics: the same model
config, data and every argument that differs from Ultralytics' defaults are passed to
`YOLO(model).train(...)` -- what a person would type. Ultralytics is made offline and quiet the
way the trainer makes it (private config dir with a font, integrations off), so both sides do the
same work. Prints one JSON line: {"epoch_ends": [unix time at each on_fit_epoch_end], ...}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

INTEGRATIONS = ("clearml", "comet", "dvc", "hub", "mlflow", "neptune", "raytune", "tensorboard",
                "wandb")
OWN = ("model", "mode", "save_dir", "project", "name", "exist_ok")  # set here, per run


def private_config(save_dir: Path) -> None:
    """Offline, no font download, no settings written outside SAVE_DIR (as the trainer does)."""
    import matplotlib

    user_dir = save_dir / "config" / "Ultralytics"
    user_dir.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copyfile(font, user_dir / name)
    os.environ["YOLO_CONFIG_DIR"] = str(save_dir / "config")
    os.environ["YOLO_OFFLINE"] = "1"


def main(argv: list[str] | None = None) -> int:
    args_yaml, save_dir = map(Path, argv if argv is not None else sys.argv[1:])
    private_config(save_dir)
    import yaml
    from ultralytics import YOLO, settings
    from ultralytics.cfg import DEFAULT_CFG_DICT

    settings.update({"sync": False, **{k: False for k in INTEGRATIONS if k in settings}})
    used = yaml.safe_load(args_yaml.read_text(encoding="utf-8"))
    arguments = {k: v for k, v in used.items()
                 if k not in OWN and k in DEFAULT_CFG_DICT and v != DEFAULT_CFG_DICT[k]}
    print(f"YOLO({used['model']!r}).train(**{arguments!r})", file=sys.stderr)
    epoch_ends: list[float] = []

    def on_fit_epoch_end(trainer) -> None:
        if len(epoch_ends) < trainer.epochs:  # not the final validation of best.pt
            epoch_ends.append(time.time())

    model = YOLO(used["model"])
    model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
    model.train(**arguments, project=str(save_dir), name="train", exist_ok=True)
    print(json.dumps({"epoch_ends": epoch_ends, "arguments": arguments}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
