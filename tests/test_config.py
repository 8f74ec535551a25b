"""The settings table of template/utils.py: parsing, validation, --help, docs, import hygiene."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.servers import TEMPLATE_UTILS

MINIO = {"MINIO_ENDPOINT": "http://127.0.0.1:9", "MINIO_ACCESS_KEY": "access-key-1",
         "MINIO_SECRET_KEY": "very-secret-key-1"}


def train_settings(utils):
    return utils.merge_settings(utils.PLATFORM_SETTINGS, utils.TRAIN_SETTINGS)


def parse_train(utils, environ, argv=()):
    return utils.parse_settings(train_settings(utils), list(argv), environ)


def config_error(utils, environ, argv=(), settings=None) -> str:
    with pytest.raises(utils.ConfigError) as caught:
        utils.parse_settings(settings or train_settings(utils), list(argv), environ)
    return str(caught.value)


def test_valid_environment_gives_typed_frozen_config(utils_module):
    cfg = parse_train(utils_module, {**MINIO, "DATASET_ID": "ds-1", "EPOCHS": "3",
                                     "LEARNING_RATE": "0.01", "PRETRAINED": "no",
                                     "EXTRA_ARGS": '{"mosaic": 0.5}'})
    assert (cfg.epochs, cfg.learning_rate, cfg.pretrained) == (3, 0.01, False)
    assert cfg.extra_args == {"mosaic": 0.5}
    assert cfg.batch_size == 16 and cfg.storage_bucket == "vision-platform"  # defaults
    assert cfg.get("DATASET_ID") == "ds-1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 5


def test_every_missing_required_setting_is_named_at_once(utils_module):
    message = config_error(utils_module, {"EPOCHS": "ten"})
    # STORAGE_TYPE defaults to minio, so its three settings are required too.
    for name in ("DATASET_ID", "MINIO_ENDPOINT", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"):
        assert name in message
    assert "EPOCHS='ten' is not an integer" in message  # reported alongside, not after a rerun


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("EPOCHS", "ten", "EPOCHS='ten' is not an integer"),
    ("EPOCHS", "2.5", "EPOCHS='2.5' is not an integer"),
    ("LEARNING_RATE", "fast", "LEARNING_RATE='fast' is not a number"),
    ("EPOCHS", "0", "EPOCHS='0' is below the minimum 1"),
    ("STORAGE_TYPE", "gcs", "STORAGE_TYPE='gcs' is not one of minio, r2, s3, local"),
    ("EXTRA_ARGS", "[1, 2]", "EXTRA_ARGS='[1, 2]' must be a JSON object"),
    ("EXTRA_ARGS", "{mosaic: 1}", "EXTRA_ARGS='{mosaic: 1}' is not valid JSON"),
])
def test_ill_typed_value_names_variable_and_value(utils_module, name, value, expected):
    assert expected in config_error(utils_module, {**MINIO, "DATASET_ID": "d", name: value})


def test_maximum_is_enforced(utils_module):
    settings = utils_module.merge_settings(utils_module.PLATFORM_SETTINGS,
                                           utils_module.PREDICT_SETTINGS)
    environ = {**MINIO, "CHECKPOINT_PATH": "c.pt", "INPUT_PATH": "x/", "CONF_THRESHOLD": "1.5"}
    message = config_error(utils_module, environ, settings=settings)
    assert "CONF_THRESHOLD='1.5' is above the maximum 1" in message


@pytest.mark.parametrize("raw", ["true", "TRUE", "True", "1", "yes", "YES", " yes "])
def test_boolean_true_spellings(utils_module, raw):
    assert parse_train(utils_module, {**MINIO, "DATASET_ID": "d", "PRETRAINED": raw}).pretrained


@pytest.mark.parametrize("raw", ["false", "FALSE", "False", "0", "no", "No"])
def test_boolean_false_spellings(utils_module, raw):
    cfg = parse_train(utils_module, {**MINIO, "DATASET_ID": "d", "PRETRAINED": raw})
    assert cfg.pretrained is False


@pytest.mark.parametrize("raw", ["maybe", "on", "off", "y", "2"])
def test_boolean_anything_else_is_rejected(utils_module, raw):
    message = config_error(utils_module, {**MINIO, "DATASET_ID": "d", "PRETRAINED": raw})
    assert f"PRETRAINED={raw!r} is not a boolean" in message


def test_flag_wins_over_environment(utils_module):
    cfg = parse_train(utils_module, {**MINIO, "DATASET_ID": "from-env", "EPOCHS": "3"},
                      ["--epochs", "5", "--dataset-id", "from-flag"])
    assert (cfg.epochs, cfg.dataset_id) == (5, "from-flag")


def test_bad_flag_value_names_the_variable(utils_module):
    message = config_error(utils_module, {**MINIO, "DATASET_ID": "d"}, ["--batch-size", "big"])
    assert "BATCH_SIZE='big' is not an integer" in message


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--epochs"]])
def test_bad_command_line_is_a_config_error_not_a_bare_exit(utils_module, argv):
    message = config_error(utils_module, {**MINIO, "DATASET_ID": "d"}, argv)
    assert message.startswith("command line:")


def test_help_lists_every_env_name_and_the_exit_codes(utils_module, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_train(utils_module, {}, ["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for setting in train_settings(utils_module):
        if setting.secret:  # named where --help says secrets are never flags (issue 18)
            assert setting.name in text and setting.flag not in text
            continue
        assert f"env {setting.name}" in text
        assert setting.flag in text
    assert "143 cancelled by SIGTERM" in text


def test_storage_type_minio_requires_its_credentials(utils_module):
    message = config_error(utils_module, {"DATASET_ID": "d", "STORAGE_TYPE": "minio",
                                          "MINIO_ENDPOINT": "http://127.0.0.1:9"})
    assert "MINIO_ACCESS_KEY" in message and "MINIO_SECRET_KEY" in message
    assert "MINIO_ENDPOINT" not in message  # the one that is set


def test_storage_type_local_requires_only_its_root(utils_module):
    message = config_error(utils_module, {"DATASET_ID": "d", "STORAGE_TYPE": "local"})
    assert "LOCAL_STORAGE_ROOT" in message
    assert "MINIO" not in message and "R2_" not in message


def test_storage_type_r2_requires_r2_settings(utils_module):
    message = config_error(utils_module, {"DATASET_ID": "d", "STORAGE_TYPE": "r2"})
    for name in ("R2_ENDPOINT", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
        assert name in message


def test_callback_url_requires_job_id_and_token(utils_module):
    message = config_error(utils_module, {**MINIO, "DATASET_ID": "d",
                                          "CALLBACK_URL": "http://127.0.0.1:9/api"})
    assert "JOB_ID" in message and "INTERNAL_AUTH_TOKEN" in message


def test_without_callback_url_job_id_and_token_are_optional(utils_module):
    cfg = parse_train(utils_module, {**MINIO, "DATASET_ID": "d"})
    assert cfg.callback_url is None and cfg.job_id is None


def test_secret_values_never_appear_in_errors(utils_module):
    secret = utils_module.Setting("API_TOKEN", "int", secret=True)
    settings = (*train_settings(utils_module), secret)
    environ = {**MINIO, "DATASET_ID": "d", "API_TOKEN": "tok-12345-secret", "EPOCHS": "x",
               "MLFLOW_TRACKING_URI": "http://user:pa55word@127.0.0.1:9"}
    message = config_error(utils_module, environ, settings=settings)
    assert "API_TOKEN=<redacted> is not an integer" in message
    assert "tok-12345-secret" not in message and "pa55word" not in message


def test_redacted_config_hides_secrets_and_lists_url_passwords(utils_module):
    cfg = parse_train(utils_module, {**MINIO, "DATASET_ID": "d",
                                     "MLFLOW_TRACKING_URI": "http://user:pa55word@127.0.0.1:9"})
    shown = json.dumps(cfg.redacted())
    assert "very-secret-key-1" not in shown and "pa55word" not in shown
    assert cfg.redacted()["MINIO_SECRET_KEY"] == "<redacted>"
    assert cfg.redacted()["DATASET_ID"] == "d"
    assert {"very-secret-key-1", "pa55word"} <= set(cfg.secret_values())


def test_settings_markdown_has_one_row_per_setting(utils_module):
    settings = train_settings(utils_module)
    table = utils_module.settings_markdown(settings).splitlines()
    assert table[:2] == ["| variable | type | default | meaning |", "|---|---|---|---|"]
    assert len(table) == len(settings) + 2
    rows = {row.split("|")[1].strip(" `"): row for row in table[2:]}
    assert list(rows) == [s.name for s in settings]
    assert "| int | `10` |" in rows["EPOCHS"]
    assert "| str | required |" in rows["DATASET_ID"]
    assert "str (secret)" in rows["MINIO_SECRET_KEY"]
    assert "One of: minio, r2, s3, local." in rows["STORAGE_TYPE"]


def test_check_required_env_names_every_missing_variable(utils_module):
    with pytest.raises(utils_module.ConfigError) as caught:
        utils_module.check_required_env("A_SET", "B_MISSING", "C_BLANK",
                                        environ={"A_SET": "1", "C_BLANK": "  "})
    assert str(caught.value) == "missing required settings: B_MISSING, C_BLANK"
    utils_module.check_required_env("A_SET", environ={"A_SET": "1"})  # no error


def test_get_env_helpers_parse_and_validate(utils_module):
    environ = {"N": " 7 ", "X": "0.5", "FLAG": "Yes", "NAME": "abc", "BAD": "seven"}
    assert utils_module.get_env_int("N", environ=environ) == 7
    assert utils_module.get_env_float("X", environ=environ) == 0.5
    assert utils_module.get_env_bool("FLAG", environ=environ) is True
    assert utils_module.get_env_str("NAME", environ=environ) == "abc"
    assert utils_module.get_env_int("UNSET", 3, environ=environ) == 3
    with pytest.raises(utils_module.ConfigError, match="BAD='seven' is not an integer"):
        utils_module.get_env_int("BAD", environ=environ)
    with pytest.raises(utils_module.ConfigError, match="missing required settings: UNSET"):
        utils_module.get_env_str("UNSET", required=True, environ=environ)


def test_get_env_helpers_read_os_environ_by_default(utils_module, monkeypatch):
    monkeypatch.setenv("SOME_TEST_COUNT", "12")
    assert utils_module.get_env_int("SOME_TEST_COUNT") == 12


def test_with_defaults_changes_defaults_and_rejects_unknown_names(utils_module):
    changed = utils_module.with_defaults(utils_module.TRAIN_SETTINGS, EPOCHS=3)
    assert next(s for s in changed if s.name == "EPOCHS").default == 3
    with pytest.raises(ValueError, match="NO_SUCH"):
        utils_module.with_defaults(utils_module.TRAIN_SETTINGS, NO_SUCH=1)


def test_redact_url_drops_password_and_query(utils_module):
    shown = utils_module.redact_url("https://user:hunter22@host:5000/path?token=abc")
    assert "hunter22" not in shown and "abc" not in shown
    assert shown.startswith("https://user:***@host:5000/path")


IMPORT_PROBE = textwrap.dedent("""
    import json, os, sys, threading
    # Load the standard library utils.py uses first, so only utils.py's own reads are counted.
    import argparse, contextlib, dataclasses, datetime, logging, queue, random, re, shutil
    import signal, stat, tempfile, time, zipfile, zlib, collections.abc, pathlib, typing
    import urllib.parse, importlib.util

    reads = []

    class SpyEnviron(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

        def __contains__(self, key):
            reads.append(key)
            return super().__contains__(key)

    real_environ, os.environ = os.environ, SpyEnviron(os.environ)
    spec = importlib.util.spec_from_file_location("utils_probe", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules["utils_probe"] = module
    spec.loader.exec_module(module)
    os.environ = real_environ
    heavy = [m for m in ("boto3", "botocore", "requests", "mlflow", "torch", "tqdm")
             if m in sys.modules]
    print(json.dumps({"reads": reads, "threads": threading.active_count(), "heavy": heavy,
                      "root_handlers": len(logging.getLogger().handlers)}))
""")


def test_importing_utils_does_nothing(tmp_path):
    poisoned = {"PATH": "/usr/bin:/bin", "EPOCHS": "ten", "STORAGE_TYPE": "bogus",
                "CALLBACK_URL": "http://127.0.0.1:9/never", "WORK_DIR": str(tmp_path / "w"),
                "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    probe = tmp_path / "probe.py"
    probe.write_text(IMPORT_PROBE)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([sys.executable, str(probe), str(TEMPLATE_UTILS)], cwd=cwd,
                          env=poisoned, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert report == {"reads": [], "threads": 1, "heavy": [], "root_handlers": 0}
    assert list(cwd.iterdir()) == [] and not (tmp_path / "w").exists()
