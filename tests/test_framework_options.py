"""Framework options: EXTRA_ARGS typed field by field in each manifest, derived from the framework
and checked against the installed one, validated before any work, and presets that resolve
as documented and reach the framework (docs/framework-options.md)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import clean_environ
from tests.support.servers import REPO

TRAINERS = ("pytorch", "timm", "ultralytics")


def manifest(trainer: str) -> dict:
    return json.loads((REPO / "trainers" / trainer / "capabilities.json").read_text())


def extra_args_schema(trainer: str) -> dict:
    return manifest(trainer)["scripts"]["train"]["settings_schema"]["properties"]["EXTRA_ARGS"]


def options_of(trainer: str) -> dict:
    """The trainer's OPTIONS as plain data, read in a subprocess beside its own modules."""
    code = ("import json, options; o = options.OPTIONS; print(json.dumps({'properties': "
            "o.properties, 'excluded': o.excluded, 'presets': {n: dict(p.values) for n, p in "
            "o.presets.items()}}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "trainers" / trainer,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- the schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", TRAINERS)
def test_each_trainers_options_are_a_valid_json_schema_of_typed_grouped_fields(
        trainer: str) -> None:
    schema = extra_args_schema(trainer)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert schema["additionalProperties"] is False and schema["properties"]
    for name, prop in schema["properties"].items():
        assert {"type", "default", "description", "x-group"} <= set(prop), name
        assert list(validator.iter_errors({name: prop["default"]})) == [], name
    framework = manifest(trainer)["framework_options"]
    assert not set(framework["excluded"]) & set(schema["properties"])
    presets = manifest(trainer)["scripts"]["train"]["settings_schema"]["properties"]["PRESET"]
    assert presets["enum"] == list(framework["presets"]) and len(presets["enum"]) >= 2
    for name, preset in framework["presets"].items():
        assert preset["description"], name
        assert list(validator.iter_errors(preset["values"])) == [], name


def test_ultralytics_options_are_its_own_train_arguments_with_its_defaults() -> None:
    from ultralytics.cfg import (
        CFG_BOOL_KEYS,
        CFG_FRACTION_KEYS,
        CFG_INT_KEYS,
        CFG_INT_MIN,
        DEFAULT_CFG_DICT,
    )

    framework = manifest("ultralytics")["framework_options"]
    props = extra_args_schema("ultralytics")["properties"]
    # Every option Ultralytics has is a field or deliberately excluded, with why.
    assert set(props) <= set(DEFAULT_CFG_DICT) <= set(props) | set(framework["excluded"])
    for name, prop in props.items():
        assert prop["default"] == DEFAULT_CFG_DICT[name], name
        if name in CFG_FRACTION_KEYS:
            assert (prop["minimum"], prop["maximum"]) == (0.0, 1.0), name
        if name in CFG_BOOL_KEYS:
            assert prop["type"] in ("boolean", ["boolean", "null"]), name
        if name in CFG_INT_KEYS:
            assert prop["type"] == "integer" and prop.get("minimum") == CFG_INT_MIN.get(name)
    assert {"mosaic", "mixup", "hsv_h", "degrees", "close_mosaic", "cos_lr"} <= set(props)
    assert props["mosaic"]["x-group"] == "augmentation"
    assert props["cos_lr"]["x-group"] == "optimization"
    assert framework["excluded"]["epochs"] == "set by the job: use EPOCHS"
    assert "mosaic augmentation probability" in props["mosaic"]["description"]


def test_timm_options_defaults_are_those_of_the_timm_calls_they_go_to() -> None:
    from timm.data import Mixup, create_transform
    from timm.models.resnet import ResNet

    props = extra_args_schema("timm")["properties"]

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert props["drop_path_rate"]["default"] == default(ResNet.__init__, "drop_path_rate")
    assert props["color_jitter"]["default"] == default(create_transform, "color_jitter")
    assert props["re_mode"]["default"] == default(create_transform, "re_mode")
    assert props["re_mode"]["default"] in props["re_mode"]["enum"]
    assert props["mixup_switch_prob"]["default"] == default(Mixup.__init__, "switch_prob")
    assert props["mixup_mode"]["default"] == default(Mixup.__init__, "mode")


# --- the checks ----------------------------------------------------------------------------------

BAD = [  # (EXTRA_ARGS, what the one line must name)
    ({"mosaic": "high"}, "EXTRA_ARGS.mosaic='high' is not a number from 0 to 1"),
    ({"mosaic": 5}, "EXTRA_ARGS.mosaic=5 is not a number from 0 to 1"),
    ({"close_mosaic": 2.5}, "EXTRA_ARGS.close_mosaic=2.5 is not an integer"),
    ({"cos_lr": "yes"}, "EXTRA_ARGS.cos_lr='yes' is not a boolean"),
    ({"mosiac": 0.5}, "EXTRA_ARGS.mosiac is not an option of this trainer (did you mean "
                      "'mosaic'?)"),
    ({"epochs": 3}, "EXTRA_ARGS.epochs cannot be set: set by the job: use EPOCHS"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=lambda v: str(v)[:30])
def test_validate_job_settings_names_each_bad_option(utils_module, extra: dict,
                                                      message: str) -> None:
    problems = utils_module.validate_job_settings(
        manifest("ultralytics"), "train", {"DATASET_ID": "d", "EXTRA_ARGS": json.dumps(extra)})
    assert problems == [message]
    stock = jsonschema.Draft202012Validator(extra_args_schema("ultralytics"))
    assert list(stock.iter_errors(extra)), "the stock validator agrees it is wrong"


def test_every_problem_and_a_bad_preset_are_reported_at_once(utils_module) -> None:
    problems = utils_module.validate_job_settings(manifest("ultralytics"), "train", {
        "DATASET_ID": "d", "PRESET": "turbo",
        "EXTRA_ARGS": {"mosaic": "high", "mosiac": 1, "epochs": 3, "mixup": 0.2}})
    assert problems == [
        "PRESET='turbo' is not one of fast, balanced, accurate",
        "EXTRA_ARGS.mosaic='high' is not a number from 0 to 1",
        "EXTRA_ARGS.mosiac is not an option of this trainer (did you mean 'mosaic'?)",
        "EXTRA_ARGS.epochs cannot be set: set by the job: use EPOCHS"]
    assert utils_module.validate_job_settings(manifest("timm"), "train", {
        "DATASET_ID": "d", "PRESET": "accurate", "EXTRA_ARGS": {"re_prob": 0.5}}) == []


def test_a_preset_resolves_with_single_values_overridden(utils_module) -> None:
    Preset, FrameworkOptions = utils_module.Preset, utils_module.FrameworkOptions
    options = FrameworkOptions(
        {"a": {"type": "number", "default": 0.0, "minimum": 0, "maximum": 1,
               "description": "a", "x-group": "augmentation"},
         "b": {"type": "string", "enum": ["x", "y"], "default": "x", "description": "b",
               "x-group": "data"}},
        {"c": "set by the job: use C"}, {"fast": Preset("Fast.", {"a": 0.5, "b": "y"})})
    assert options.resolve("fast", {"a": 0.25}) == {"a": 0.25, "b": "y"}
    assert options.resolve(None, {"b": "x"}) == {"b": "x"}
    with pytest.raises(utils_module.ConfigError) as caught:
        options.resolve("slow", {"b": "z", "c": 1})
    assert str(caught.value) == ("PRESET='slow' is not a preset of this trainer (presets: "
                                 "fast); EXTRA_ARGS.b='z' is not one of 'x', 'y'; "
                                 "EXTRA_ARGS.c cannot be set: set by the job: use C")


def test_a_preset_outside_the_schema_is_refused_at_declaration(utils_module) -> None:
    caps = utils_module.Capabilities(
        framework="X", package="x", tasks=(utils_module.TaskInfo.standard(
            "image_classification"),), models=(),
        dataset_layouts=(utils_module.DATASET_LAYOUTS["image_folder"],),
        options=utils_module.FrameworkOptions({}, {}, {"fast": utils_module.Preset(
            "Fast.", {"mosaic": 0.5})}))
    with pytest.raises(ValueError, match=r"preset fast: EXTRA_ARGS.mosaic is not an option"):
        utils_module.build_manifest("x", caps, {"train": utils_module.TRAIN_SETTINGS})


# --- the scripts: exit 2 before any work ---------------------------------------------------------

SCRIPT_CASES = [
    ("ultralytics", {"EXTRA_ARGS": '{"mosaic": "high"}'}, "EXTRA_ARGS.mosaic='high'"),
    ("ultralytics", {"EXTRA_ARGS": '{"degrees": 10, "fliplr": 2}'}, "EXTRA_ARGS.fliplr=2 is not "
                                                                    "a number from 0 to 1"),
    ("ultralytics", {"EXTRA_ARGS": '{"mosiac": 0.5}'}, "EXTRA_ARGS.mosiac is not an option"),
    ("ultralytics", {"PRESET": "turbo"}, "PRESET='turbo' is not a preset"),
    ("timm", {"EXTRA_ARGS": '{"re_mode": "noise"}'}, "EXTRA_ARGS.re_mode='noise' is not one of"),
    ("timm", {"EXTRA_ARGS": '{"num_classes": 3}'}, "EXTRA_ARGS.num_classes cannot be set"),
    ("pytorch", {"EXTRA_ARGS": '{"width": 0}'}, "EXTRA_ARGS.width=0 is not an integer from 1 "
                                                "to 256"),
]


@pytest.mark.parametrize(("trainer", "settings", "message"), SCRIPT_CASES,
                         ids=[f"{c[0]}-{next(iter(c[1].values()))[:20]}" for c in SCRIPT_CASES])
def test_a_bad_option_fails_the_job_before_staging_with_exit_2(
        trainer: str, settings: dict, message: str, tmp_path: Path) -> None:
    bucket, work = tmp_path / "bucket", tmp_path / "work"
    bucket.mkdir()
    env = {**clean_environ(), "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket),
           "DATASET_ID": "no-such-dataset", "WORK_DIR": str(work), "DEVICE": "cpu", **settings}
    result = subprocess.run([sys.executable, "train.py"], cwd=REPO / "trainers" / trainer,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert message in (work / "failure").read_text()
    assert "no-such-dataset" not in result.stderr, "failed on the option, not the dataset"
    assert list(bucket.iterdir()) == [], "nothing touched in storage"


# --- a preset reaches the framework and MLflow --------------------------------------------------


@pytest.mark.slow
def test_ultralytics_preset_and_override_reach_its_saved_arguments_and_mlflow(
        tmp_path: Path) -> None:
    import yaml

    trainer = REPO / "trainers" / "ultralytics"
    bucket, work = tmp_path / "bucket", tmp_path / "work"
    subprocess.run([sys.executable, str(trainer / "sample_data.py"), str(bucket), "--task",
                    "detect", "--name", "shapes", "--train", "8", "--val", "4", "--size", "64"],
                   check=True, capture_output=True, timeout=120)
    env = {**clean_environ(), "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": str(bucket),
           "DATASET_ID": "shapes", "WORK_DIR": str(work), "DEVICE": "cpu", "EPOCHS": "1",
           "IMAGE_SIZE": "64", "BATCH_SIZE": "4", "NUM_WORKERS": "0", "PRETRAINED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "JOB_ID": "preset",
           "PRESET": "fast", "EXTRA_ARGS": '{"mosaic": 0.25, "plots": false}'}
    result = subprocess.run([sys.executable, "train.py"], cwd=trainer, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    saved = yaml.safe_load((work / "ultralytics" / "train" / "args.yaml").read_text())
    # The preset's values, EXTRA_ARGS' mosaic over the preset's 0.5 (docs/framework-options.md)
    assert saved["mosaic"] == 0.25 and saved["plots"] is False
    assert (saved["close_mosaic"], saved["patience"], saved["warmup_epochs"]) == (2, 10, 1.0)
    assert (saved["hsv_s"], saved["hsv_v"]) == (0.5, 0.3)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    params = run.data.params
    assert params["PRESET"] == "fast"
    assert (params["extra.mosaic"], params["extra.close_mosaic"]) == ("0.25", "2")
    assert params["extra.plots"] == "False"


def test_timm_preset_and_override_reach_its_transform_mixup_and_model_keywords() -> None:
    probe = """
import json, data, engine, options
calls = options.split(options.OPTIONS.resolve("accurate", {"re_count": 2, "mixup_mode": "elem"}))
config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3,
          "std": [0.5] * 3}
transform = data.train_transform(config, hflip=0.5, crop_scale=0.08, auto_augment=None,
                                 **calls["transform"])
[erasing] = [t for t in transform.transforms if type(t).__name__ == "RandomErasing"]
mixup = engine.build_mixup(0.2, 0.0, 0.1, 10, **calls["mixup"])
print(json.dumps({"model": calls["model"], "erasing": [erasing.probability, erasing.mode,
                  erasing.max_count], "mixup": [mixup.mode, mixup.mix_prob]}))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO / "trainers" / "timm",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout.splitlines()[-1])
    assert built["model"] == {"drop_path_rate": 0.1, "drop_rate": 0.1}  # to create_model
    assert built["erasing"] == [0.25, "pixel", 2]  # the preset's, re_count overridden
    assert built["mixup"] == ["elem", 1.0]  # overridden; prob keeps Mixup's default


def test_the_manifest_schema_rejects_an_untyped_or_ungrouped_option() -> None:
    schema = json.loads((REPO / "schemas" / "capabilities.schema.json").read_text())
    broken = manifest("ultralytics")
    options = broken["scripts"]["train"]["settings_schema"]["properties"]["EXTRA_ARGS"]
    del options["properties"]["mosaic"]["x-group"]
    options["properties"]["hsv_h"]["type"] = "float"
    del broken["framework_options"]["presets"]["fast"]["description"]
    paths = {"/".join(map(str, e.absolute_path))
             for e in jsonschema.Draft202012Validator(schema).iter_errors(broken)}
    prefix = "scripts/train/settings_schema/properties/EXTRA_ARGS/properties"
    assert {f"{prefix}/mosaic", f"{prefix}/hsv_h/type", "framework_options/presets/fast"} <= paths
