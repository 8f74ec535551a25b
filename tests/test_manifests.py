"""The pixi manifests, checked without pixi: schema, TOML 1.0, names, and one dependency truth.

pixi cannot run on the machines this project is built on, so its manifests are validated against
pixi's own JSON schema, and the pip requirement files are proven equal to them.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "pixi-manifest.schema.json"  # vendored: see schemas/README.md
ENV_NAME = re.compile(r"^[a-z0-9-]+$")
TRAINERS = sorted(p.parent for p in REPO.glob("trainers/*/.copier-answers.yml"))
MANIFESTS = [REPO / "pixi.toml"] + [t / "pixi.toml" for t in TRAINERS]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def load_toml(path: Path) -> dict:
    with open(path, "rb") as fh:  # tomllib reads TOML 1.0 only: that is the point
        return tomllib.load(fh)


def pixi_requirements(table: dict) -> dict[str, tuple[frozenset[str], str]]:
    """{name: (extras, specifier)} of a [pypi-dependencies] table."""
    out = {}
    for name, spec in table.items():
        if isinstance(spec, str):
            extras, version = frozenset(), spec
        else:
            extras, version = frozenset(spec.get("extras", [])), spec.get("version", "*")
        out[canonicalize_name(name)] = (extras, "" if version == "*" else str(
            Requirement(f"x{version}").specifier))
    return out


def pip_requirements(path: Path) -> dict[str, tuple[frozenset[str], str]]:
    """{name: (extras, specifier)} of a requirements file, following `-r` includes."""
    out: dict[str, tuple[frozenset[str], str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            for name, value in pip_requirements(path.parent / line[3:].strip()).items():
                assert out.get(name, value) == value, f"{name} pinned twice differently"
                out[name] = value
            continue
        requirement = Requirement(line)
        out[canonicalize_name(requirement.name)] = (frozenset(requirement.extras),
                                                    str(requirement.specifier))
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def test_there_are_trainers_and_each_has_a_manifest() -> None:
    assert {t.name for t in TRAINERS} >= {"pytorch"}
    for trainer in TRAINERS:
        assert (trainer / "pixi.toml").is_file(), f"{rel(trainer)} has no pixi.toml"
        assert (trainer / "requirements.txt").is_file(), f"{rel(trainer)} has no requirements"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=rel)
def test_manifest_matches_pixis_schema(manifest: Path, validator) -> None:
    errors = sorted(validator.iter_errors(load_toml(manifest)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{rel(manifest)}: {'/'.join(map(str, e.path))}: {e.message}"
                                 for e in errors)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=rel)
def test_environment_names_are_valid_for_pixi(manifest: Path) -> None:
    # pixi enforces this; its schema does not.
    for name in load_toml(manifest).get("environments", {}):
        assert ENV_NAME.match(name), (
            f"{rel(manifest)}: environment {name!r} must match {ENV_NAME.pattern}")


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_trainer_environment_is_named_by_its_slug(trainer: Path) -> None:
    slug = yaml.safe_load((trainer / ".copier-answers.yml").read_text())["slug"]
    assert slug == trainer.name
    environments = load_toml(trainer / "pixi.toml")["environments"]
    assert slug in environments, f"{rel(trainer)}/pixi.toml has no production environment {slug!r}"
    assert "cuda" in environments[slug]["features"], "the image environment must require CUDA"


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_trainer_requirements_equal_its_pixi_dependencies(trainer: Path) -> None:
    pixi = pixi_requirements(load_toml(trainer / "pixi.toml")["pypi-dependencies"])
    pip = pip_requirements(trainer / "requirements.txt")
    assert pip == pixi, (f"{rel(trainer)}: requirements.txt and pixi.toml "
                         f"[pypi-dependencies] differ: only pip {sorted(set(pip) - set(pixi))}, "
                         f"only pixi {sorted(set(pixi) - set(pip))}, different "
                         f"{sorted(n for n in set(pip) & set(pixi) if pip[n] != pixi[n])}")


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: t.name)
def test_trainer_pins_torch(trainer: Path) -> None:
    pins = pip_requirements(trainer / "requirements.txt")
    assert pins[canonicalize_name("torch")][1].startswith("=="), "torch must be pinned exactly"


def pixi_line(name: str, spec) -> str:
    """One [pypi-dependencies] entry as it is written in a manifest."""
    if isinstance(spec, str):
        return f"{name} = {json.dumps(spec)}"
    inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in spec.items())
    return f"{name} = {{ {inner} }}"


def lines_to_add_for(trainer: Path, root_pixi: dict) -> list[str]:
    """The root pixi.toml lines a trainer's dependencies still need, spelled as it spells them."""
    table = load_toml(trainer / "pixi.toml").get("pypi-dependencies", {})
    return [pixi_line(name, spec) for name, spec in table.items()
            if canonicalize_name(name) not in root_pixi]


def test_root_requirements_include_every_trainer() -> None:
    lines = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()}
    missing = [f"-r {rel(t)}/requirements.txt" for t in TRAINERS
               if f"-r {rel(t)}/requirements.txt" not in lines]
    assert not missing, "add to the root requirements.txt:\n  " + "\n  ".join(missing)


def test_root_environment_is_tooling_plus_every_trainer() -> None:
    expected = pip_requirements(REPO / "requirements-dev.txt")
    for trainer in TRAINERS:
        for name, value in pip_requirements(trainer / "requirements.txt").items():
            assert expected.get(name, value) == value, (
                f"{rel(trainer)} pins {name} differently from another trainer or the tooling: "
                "the root environment cannot hold both")
            expected[name] = value
    root_pixi = pixi_requirements(load_toml(REPO / "pixi.toml")["pypi-dependencies"])
    to_add = [line for t in TRAINERS for line in lines_to_add_for(t, root_pixi)]
    assert not to_add, ("add to [pypi-dependencies] of the root pixi.toml:\n  "
                        + "\n  ".join(dict.fromkeys(to_add)))
    assert root_pixi == expected, (
        "pixi.toml [pypi-dependencies] must be requirements-dev.txt + trainers/*/requirements.txt;"
        f" missing {sorted(set(expected) - set(root_pixi))}, extra "
        f"{sorted(set(root_pixi) - set(expected))}, different "
        f"{sorted(n for n in set(expected) & set(root_pixi) if expected[n] != root_pixi[n])}")
    assert pip_requirements(REPO / "requirements.txt") == expected, (
        "requirements.txt must include requirements-dev.txt and every trainer's requirements")


def test_the_missing_lines_are_named_as_written(tmp_path: Path) -> None:
    (tmp_path / "pixi.toml").write_text(
        '[pypi-dependencies]\nnew-lib = { version = "==1.0", extras = ["x"] }\n'
        'torch = "==2.14.1"\n')
    root = pixi_requirements({"torch": "==2.14.1"})
    assert lines_to_add_for(tmp_path, root) == ['new-lib = { version = "==1.0", extras = ["x"] }']
