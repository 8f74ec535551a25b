"""The capabilities manifest: generated from code, valid against its schema, kept current by
tools/sync.py, and the validator a platform calls on a job's settings before launch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import clean_environ
from tests.support.servers import REPO

SCHEMA = REPO / "schemas" / "capabilities.schema.json"
TRAINERS = sorted(p.parent for p in REPO.glob("trainers/*/.copier-answers.yml"))
DECLARED = [t for t in TRAINERS if (t / "capabilities.py").is_file()]
SCRIPTS = ("train", "evaluate", "predict", "export")
JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
              "json": "object"}
PYTORCH = REPO / "trainers" / "pytorch"
HEAVY = ("torch", "torchvision", "numpy", "PIL", "boto3", "requests", "mlflow", "onnx",
         "onnxruntime", "ultralytics", "timm")


def committed(trainer: Path) -> dict:
    return json.loads((trainer / "capabilities.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return committed(PYTORCH)


@pytest.fixture(scope="module")
def manifest_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# --- every trainer ----------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_every_trainer_declares_its_capabilities_and_exports(trainer: Path) -> None:
    for name in ("capabilities.py", "capabilities.json", "export.py"):
        assert (trainer / name).is_file(), f"trainers/{trainer.name} has no {name}"


@pytest.mark.parametrize("trainer", DECLARED, ids=lambda t: t.name)
def test_the_committed_manifest_matches_the_schema(trainer: Path, manifest_schema) -> None:
    manifest = committed(trainer)
    assert [f"{list(e.absolute_path)}: {e.message}"
            for e in manifest_schema.iter_errors(manifest)] == []
    assert manifest["trainer"] == trainer.name
    for script in manifest["scripts"].values():  # each one a schema a stock validator takes
        jsonschema.Draft202012Validator.check_schema(script["settings_schema"])
    # the framework's version is the one the trainer pins (its image's), not this machine's
    framework = manifest["framework"]
    pin = f"{framework['package']}=={framework['version']}"
    assert pin in (trainer / "requirements.txt").read_text().splitlines()


@pytest.mark.parametrize("package, lines, expected", [
    ("torch", ["torchvision==0.29.1", "torch==2.14.1"], "2.14.1"),
    ("torch", ["# torch==1.0 in a comment", "  Torch == 2.14.1 ; python_version >= '3.11'"],
     "2.14.1"),
    ("ultralytics", ["ultralytics[export]==8.4.190  # the framework"], "8.4.190"),
    ("scikit_learn", ["scikit-learn==1.5.0"], "1.5.0"),
    ("torch", ["torchvision==0.29.1", "torch>=2.0"], None),  # no pin: the installed version
    ("torch", [], None),
])
def test_the_framework_version_is_the_pinned_one(utils_module, tmp_path: Path, package: str,
                                                 lines: list[str], expected: str | None) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    assert utils_module.pinned_version(requirements, package) == expected
    assert utils_module.pinned_version(tmp_path / "absent.txt", package) is None


@pytest.mark.parametrize("trainer", DECLARED, ids=lambda t: t.name)
def test_manifest_settings_are_exactly_the_settings_tables(trainer: Path, utils_module) -> None:
    """Each script's schema is its settings table (with the platform's), field by field."""
    read_tables = textwrap.dedent("""
        import dataclasses, importlib, json, utils
        tables = {}
        for name in ("train", "evaluate", "predict", "export"):
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            tables[name] = [dataclasses.asdict(s) for s in
                            utils.merge_settings(utils.PLATFORM_SETTINGS, module.SETTINGS)]
        print(json.dumps(tables))
    """)
    result = subprocess.run([sys.executable, "-c", read_tables], cwd=trainer,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    tables, manifest = json.loads(result.stdout), committed(trainer)
    assert list(manifest["scripts"]) == list(tables)
    for script, settings in tables.items():
        schema = manifest["scripts"][script]["settings_schema"]
        assert list(schema["properties"]) == [s["name"] for s in settings], script
        assert schema["required"] == [s["name"] for s in settings if s["required"]], script
        for s in settings:
            prop = schema["properties"][s["name"]]
            if s["name"] == "EXTRA_ARGS":  # typed field by field: the trainer's options.py
                prop = {k: v for k, v in prop.items()
                        if k not in ("properties", "additionalProperties")}
            if s["name"] == "PRESET":  # its choices: the trainer's presets
                assert prop.pop("enum") == list(manifest["framework_options"]["presets"])
            condition = s["required_if"]
            assert prop == {k: v for k, v in {
                "type": JSON_TYPES[s["kind"]], "description": s["help"],
                "default": None if s["secret"] else s["default"],
                "enum": list(s["choices"]) or None, "minimum": s["minimum"],
                "maximum": s["maximum"], "writeOnly": True if s["secret"] else None,
                "x-secret": s["secret"], "x-group": s["group"],
                "x-flag": None if s["secret"] else "--" + s["name"].lower().replace("_", "-"),
                "pattern": utils_module.IDENTIFIER.pattern if s["identifier"] else None,
                "x-required-if": {"setting": condition[0], "value": condition[1]}
                if condition else None,
            }.items() if v is not None}, f"{script}: {s['name']}"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("trainer", DECLARED, ids=lambda t: t.name)
def test_every_script_prints_the_manifest_reading_no_setting_nor_framework(trainer: Path,
                                                                          script: str) -> None:
    env = {**clean_environ(), "EPOCHS": "ten", "STORAGE_TYPE": "floppy"}  # a job would fail
    result = subprocess.run([sys.executable, "-X", "importtime", f"{script}.py",
                             "--capabilities"], cwd=trainer, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == committed(trainer)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "utils" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_lists_the_capabilities_flag() -> None:
    result = subprocess.run([sys.executable, "export.py", "--help"], cwd=PYTORCH,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--capabilities" in result.stdout
    assert "--export-format" in result.stdout and "--dynamic-batch" in result.stdout


def test_the_schema_rejects_a_broken_manifest(manifest: dict, manifest_schema) -> None:
    broken = json.loads(json.dumps(manifest))
    del broken["tasks"]
    train = broken["scripts"]["train"]["settings_schema"]["properties"]
    train["EPOCHS"]["type"] = "float"
    train["SEED"]["x-group"] = "expert"
    train["INTERNAL_AUTH_TOKEN"]["default"] = "a-token"
    broken["scripts"]["serve"] = broken["scripts"]["train"]
    paths = {"/".join(map(str, e.absolute_path)) for e in manifest_schema.iter_errors(broken)}
    assert "" in paths  # tasks missing, serve not a script
    assert {"scripts/train/settings_schema/properties/EPOCHS/type",
            "scripts/train/settings_schema/properties/SEED/x-group",
            "scripts/train/settings_schema/properties/INTERNAL_AUTH_TOKEN"} <= paths


# --- the validator ----------------------------------------------------------------------------


def test_a_valid_job_has_no_problems(utils_module, manifest: dict) -> None:
    validate = utils_module.validate_job_settings
    assert validate(manifest, "train", {
        "DATASET_ID": "ds-1", "EPOCHS": 5, "LEARNING_RATE": 0.01, "PRETRAINED": False,
        "EXTRA_ARGS": {"width": 8}, "MODEL_NAME": "tinycnn", "DEVICE": "cuda",
        "TASK_TYPE": "image_classification"}) == []
    # the same as the strings the job's environment will hold
    assert validate(manifest, "train", {
        "DATASET_ID": "ds-1", "EPOCHS": "5", "LEARNING_RATE": "1e-2", "PRETRAINED": "no",
        "EXTRA_ARGS": '{"width": 8}'}) == []
    assert validate(manifest, "export", {
        "CHECKPOINT_PATH": "checkpoints/job-1/best.pt", "EXPORT_FORMAT": "onnx", "OPSET": 13,
        "DYNAMIC_BATCH": True}) == []
    # None and "" are unset; an int is a number
    assert validate(manifest, "predict", {"CHECKPOINT_PATH": "k", "INPUT_PATH": "images/",
                                          "TOP_K": None, "IMAGE_SIZE": "",
                                          "CONF_THRESHOLD": 1}) == []


TRAIN = {"DATASET_ID": "ds-1"}
EXPORT = {"CHECKPOINT_PATH": "checkpoints/job-1/best.pt"}


@pytest.mark.parametrize("script, settings, expected", [
    ("train", {**TRAIN, "EPOCHS": "ten"}, ["EPOCHS='ten' is not an integer"]),
    ("train", {**TRAIN, "EPOCHS": 2.5}, ["EPOCHS=2.5 is not an integer"]),
    ("train", {**TRAIN, "EPOCHS": True}, ["EPOCHS=True is not an integer"]),
    ("train", {**TRAIN, "PRETRAINED": "maybe"},
     ["PRETRAINED='maybe' is not a boolean (true/false/1/0/yes/no)"]),
    ("train", {"DATASET_ID": 7}, ["DATASET_ID=7 is not a string"]),
    ("train", {**TRAIN, "EXTRA_ARGS": [1]}, ["EXTRA_ARGS=[1] is not a JSON object"]),
    ("train", {**TRAIN, "EPOCHS": 0}, ["EPOCHS=0 is below the minimum 1"]),
    ("predict", {**EXPORT, "INPUT_PATH": "x.jpg", "CONF_THRESHOLD": 1.5},
     ["CONF_THRESHOLD=1.5 is above the maximum 1"]),
    ("export", {**EXPORT, "EXPORT_FORMAT": "onnx", "OPSET": "99"},
     ["OPSET='99' is above the maximum 20"]),
    ("evaluate", {**EXPORT, **TRAIN, "SPLIT": "train"}, ["SPLIT='train' is not one of val, test"]),
    ("export", {**EXPORT, "EXPORT_FORMAT": "tflite"},
     ["EXPORT_FORMAT='tflite' is not one of onnx, torchscript"]),
    ("train", {**TRAIN, "EPOCHZ": 3}, ["EPOCHZ is not a setting of train.py"]),
    ("train", {**TRAIN, "TOP_K": 3}, ["TOP_K is not a setting of train.py"]),
    ("train", {"EPOCHS": 3}, ["DATASET_ID is required"]),
    ("export", EXPORT, ["EXPORT_FORMAT is required"]),
    ("train", {**TRAIN, "CALLBACK_URL": "http://backend/api/v1/internal/training/1"},
     ["JOB_ID is required when CALLBACK_URL is set",
      "INTERNAL_AUTH_TOKEN is required when CALLBACK_URL is set"]),
    ("train", {**TRAIN, "STORAGE_TYPE": "r2"},
     ["R2_ENDPOINT is required when STORAGE_TYPE=r2",
      "R2_ACCESS_KEY_ID is required when STORAGE_TYPE=r2",
      "R2_SECRET_ACCESS_KEY is required when STORAGE_TYPE=r2"]),
    ("train", {**TRAIN, "MODEL_NAME": "resnet9"},
     ["MODEL_NAME='resnet9' is not a model of this trainer (tinycnn)"]),
    ("train", {**TRAIN, "PRETRAINED": "true"},
     ["PRETRAINED=true but tinycnn has no pretrained weights"]),
    ("train", {**TRAIN, "TASK_TYPE": "object_detection", "MODEL_NAME": "tinycnn"},
     ["TASK_TYPE='object_detection' is not a task of this trainer (image_classification)",
      "MODEL_NAME='tinycnn' is for image_classification, not TASK_TYPE='object_detection'"]),
    ("serve", {}, ["serve.py is not a script of this trainer "
                   "(it has: train.py, evaluate.py, predict.py, export.py)"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_problem_is_named(utils_module, manifest: dict, script: str, settings: dict,
                               expected: list[str]) -> None:
    assert utils_module.validate_job_settings(manifest, script, settings) == expected


def test_a_model_name_pattern_admits_names_beyond_the_catalogue(utils_module,
                                                               manifest: dict) -> None:
    opened = {**manifest, "model_name_pattern": r"tinycnn-\d+"}
    validate = utils_module.validate_job_settings
    assert validate(opened, "train", {**TRAIN, "MODEL_NAME": "tinycnn-2"}) == []
    assert validate(opened, "train", {**TRAIN, "MODEL_NAME": "resnet9"}) == [
        r"MODEL_NAME='resnet9' is not a model of this trainer (tinycnn or a name matching "
        r"tinycnn-\d+)"]


def test_a_default_model_is_left_to_the_trainer_to_fit_the_task(utils_module) -> None:
    # Ultralytics turns its default yolo11n into yolo11n-cls for TASK_TYPE=image_classification;
    # a model the job names must fit the task.
    ultralytics = json.loads((REPO / "trainers/ultralytics/capabilities.json").read_text())
    validate = utils_module.validate_job_settings
    assert validate(ultralytics, "train", {**TRAIN, "TASK_TYPE": "image_classification"}) == []
    assert validate(ultralytics, "train", {**TRAIN, "TASK_TYPE": "image_classification",
                                           "MODEL_NAME": "yolo11n"}) == [
        "MODEL_NAME='yolo11n' is for object_detection, not TASK_TYPE='image_classification'"]


def test_every_problem_is_reported_at_once(utils_module, manifest: dict) -> None:
    problems = utils_module.validate_job_settings(manifest, "train", {
        "EPOCHS": "ten", "BATCH_SIZE": 0, "COLOUR": "blue", "LOG_LEVEL": "LOUD"})
    assert [p.split("=")[0].split(" ")[0] for p in problems] == [
        "EPOCHS", "BATCH_SIZE", "COLOUR", "LOG_LEVEL", "DATASET_ID"]


def test_a_secret_value_is_never_repeated(utils_module, manifest: dict) -> None:
    problems = utils_module.validate_job_settings(manifest, "train", {
        **TRAIN, "CALLBACK_URL": "http://backend/x", "JOB_ID": "1",
        "INTERNAL_AUTH_TOKEN": 12345678})
    assert problems == ["INTERNAL_AUTH_TOKEN=<redacted> is not a string"]


@pytest.mark.parametrize("script, settings", [
    ("train", TRAIN),
    ("train", {**TRAIN, "EPOCHS": 3, "LEARNING_RATE": 0.5, "EXTRA_ARGS": {}}),
    ("train", {**TRAIN, "EPOCHS": "3"}),
    ("train", {**TRAIN, "EPOCHS": 0}),
    ("train", {**TRAIN, "NOPE": 1}),
    ("train", {"EPOCHS": 3}),
    ("train", {**TRAIN, "CALLBACK_URL": "http://b/x"}),
    ("train", {**TRAIN, "CALLBACK_URL": "http://b/x", "JOB_ID": "1",
               "INTERNAL_AUTH_TOKEN": "t"}),
    ("train", {**TRAIN, "STORAGE_TYPE": "minio"}),
    ("train", {**TRAIN, "STORAGE_TYPE": "minio", "MINIO_ENDPOINT": "http://m",
               "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "s"}),
    ("train", {**TRAIN, "STORAGE_TYPE": "local", "LOCAL_STORAGE_ROOT": "/data"}),
    ("train", {**TRAIN, "PRETRAINED": 1}),
    ("evaluate", {**EXPORT, **TRAIN, "SPLIT": "test"}),
    ("evaluate", {**EXPORT, **TRAIN, "SPLIT": "train"}),
    ("predict", {**EXPORT, "INPUT_PATH": "x/", "IOU_THRESHOLD": -0.1}),
    ("export", {**EXPORT, "EXPORT_FORMAT": "torchscript", "HALF": False}),
    ("export", {**EXPORT, "EXPORT_FORMAT": "engine"}),
])
def test_the_validator_agrees_with_a_stock_json_schema_validator(
        utils_module, manifest: dict, script: str, settings: dict) -> None:
    """For typed values the manifest's schemas are the whole rule (strings aside: the
    validator also takes what the job's environment will hold, a stock validator does not)."""
    schema = manifest["scripts"][script]["settings_schema"]
    stock = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(settings)]
    ours = utils_module.validate_job_settings(manifest, script, settings)
    strings = any(isinstance(v, str) and schema["properties"].get(k, {}).get("type") != "string"
                  for k, v in settings.items())
    assert bool(ours) == (bool(stock) and not strings), (ours, stock)


def test_inconsistent_declarations_are_refused(utils_module) -> None:
    u = utils_module
    caps = u.Capabilities(
        "PyTorch", "torch",
        tasks=(u.TaskInfo("image_classification", "mAP", ("accuracy",)),
               u.TaskInfo.standard("object_detection")),
        models=(u.ModelInfo("yolo", "pose_estimation"),),
        dataset_layouts=(u.DATASET_LAYOUTS["image_folder"],),
        export_formats=(u.EXPORT_ONNX,))
    with pytest.raises(ValueError) as raised:
        u.build_manifest("bad", caps, {"train": u.TRAIN_SETTINGS, "export": u.EXPORT_SETTINGS})
    assert str(raised.value) == (
        "bad: inconsistent capabilities: image_classification: primary metric 'mAP' is not "
        "among its metrics; model 'yolo': task 'pose_estimation' is not declared; no dataset "
        "layout for task 'object_detection'; export.py's EXPORT_FORMAT choices ['onnx', "
        "'torchscript'] differ from the declared export formats ['onnx']")


# --- tools/sync.py keeps capabilities.json current ---------------------------------------------


def row(name: str) -> str:
    """The start of sync's report line for `name` (names are padded to the longest)."""
    return f"{name:<{len('template/capabilities.json.jinja')}}  "


def sync(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/sync.py", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)


def render(repo: Path, slug: str) -> Path:
    subprocess.run([sys.executable, "-m", "copier", "copy", "--defaults", "--quiet", "--data",
                    f"slug={slug}", "template", f"trainers/{slug}"],
                   cwd=repo, check=True, capture_output=True, timeout=120)
    return repo / "trainers" / slug


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("pristine")
    for name in ("template", "tools"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    render(repo, "alpha")
    return repo


@pytest.fixture
def repo(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(pristine, copy)
    return copy


def test_a_fresh_render_carries_its_current_manifest(repo: Path) -> None:
    undeclared = render(repo, "beta")
    (undeclared / "capabilities.py").unlink()
    (undeclared / "capabilities.json").unlink()
    result = sync(repo, "--check")
    assert result.returncode == 0, result.stdout
    assert row("alpha") + "in sync\n" in result.stdout
    assert row("template/capabilities.json.jinja") + "in sync\n" in result.stdout
    assert row("beta") + "in sync (no capabilities.py, so no " \
           "capabilities.json)\n" in result.stdout
    manifest = committed(repo / "trainers" / "alpha")
    assert manifest["trainer"] == "alpha"
    schema = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    assert [e.message for e in schema.iter_errors(manifest)] == []


def test_a_changed_settings_table_makes_the_manifest_stale(repo: Path) -> None:
    train = repo / "trainers/alpha/train.py"
    train.write_text(train.read_text().replace("EPOCHS=10,", "EPOCHS=12,"))
    manifest = repo / "trainers/alpha/capabilities.json"
    before = manifest.read_bytes()
    check = sync(repo, "--check")
    assert check.returncode == 1, check.stdout
    assert row("alpha") + "drifted" in check.stdout
    assert "--- trainers/alpha/capabilities.json (committed)" in check.stdout
    assert "+++ trainers/alpha/capabilities.json (generated by python train.py " \
           "--capabilities)" in check.stdout
    assert '-            "default": 10,' in check.stdout
    assert '+            "default": 12,' in check.stdout
    assert check.stdout.rstrip().endswith("To fix, run: python tools/sync.py")
    assert manifest.read_bytes() == before, "--check writes nothing"
    fixed = sync(repo)
    assert row("alpha") + "drifted -> rewrote capabilities.json" in fixed.stdout
    assert committed(repo / "trainers/alpha")["scripts"]["train"]["settings_schema"][
        "properties"]["EPOCHS"]["default"] == 12
    assert sync(repo, "--check").returncode == 0


def test_a_hand_edited_or_deleted_manifest_is_restored(repo: Path) -> None:
    manifest = repo / "trainers/alpha/capabilities.json"
    generated = manifest.read_bytes()
    manifest.write_bytes(generated.replace(b'"pretrained": false', b'"pretrained": true'))
    check = sync(repo, "--check")
    assert check.returncode == 1 and '+      "pretrained": false' in check.stdout
    manifest.unlink()
    check = sync(repo, "--check")
    assert check.returncode == 1
    assert row("alpha") + "missing" in check.stdout
    assert "trainers/alpha/capabilities.json: missing" in check.stdout
    assert sync(repo).returncode == 0 and manifest.read_bytes() == generated


def test_a_template_settings_change_reaches_every_manifest(repo: Path) -> None:
    template_utils = repo / "template/utils.py"
    text = template_utils.read_text()
    old = 'Setting("EPOCHS", "int", 10, "Number of training epochs.", minimum=1),'
    assert old in text
    template_utils.write_text(text.replace(old, old.replace("minimum=1", "minimum=2")))
    check = sync(repo, "--check")
    assert check.returncode == 1
    # utils.py is stale in the trainer, and so is the manifest it will produce once synced
    assert "+++ trainers/alpha/utils.py (rendered from template/)" in check.stdout
    assert "+++ trainers/alpha/capabilities.json (generated" in check.stdout
    assert "+++ template/capabilities.json.jinja (generated" in check.stdout
    assert sync(repo).returncode == 0 and sync(repo, "--check").returncode == 0
    epochs = committed(repo / "trainers/alpha")["scripts"]["train"]["settings_schema"][
        "properties"]["EPOCHS"]
    assert epochs["minimum"] == 2


def test_a_broken_declaration_is_a_render_error(repo: Path) -> None:
    declarations = repo / "trainers/alpha/capabilities.py"
    declarations.write_text(declarations.read_text().replace(
        'utils.ModelInfo("tinycnn", "image_classification"',
        'utils.ModelInfo("tinycnn", "object_detection"'))
    check = sync(repo, "--check")
    assert check.returncode == 2, check.stdout
    assert (row("alpha") + "render error: capabilities.json: `python "
            "train.py --capabilities` failed: ValueError: alpha: inconsistent capabilities: "
            "model 'tinycnn': task 'object_detection' is not declared") in check.stdout
