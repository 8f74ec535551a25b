"""Run a pixi task without pixi, in the current Python environment.

    python tools/run_task.py                       # list the tasks (name and description)
    python tools/run_task.py train                 # the `train` task of the nearest pixi.toml
    python tools/run_task.py --manifest-path trainers/timm/pixi.toml test
    python tools/run_task.py --env EPOCHS=1 train  # override a task's environment
    python tools/run_task.py test -- -k sync       # arguments after the task go to its command

The manifest is the `pixi.toml` nearest the current folder (this folder, then each one above it),
as pixi finds it, so `cd trainers/timm && python ../../tools/run_task.py train` trains timm;
`--manifest-path` wins.

pixi is the way to run this repository; on a machine without it (CI here, or a plain venv) this
reads the same `[tasks]` tables and runs the same commands, so the two paths cannot diverge:
`depends-on` first, the task's `env` and `cwd` (default: the manifest's folder), and a nested
`pixi run [--manifest-path P] TASK` is followed into the other manifest. `python` in a command
is this interpreter (its folder goes first on PATH).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "pixi.toml"


class TaskError(Exception):
    pass


def shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix() or "." if path.is_relative_to(REPO) else str(path)


def nearest_manifest(start: Path) -> Path:
    """The pixi.toml of `start` or of the closest folder above it, as `pixi run` looks it up."""
    for folder in (start, *start.parents):
        if (folder / MANIFEST).is_file():
            return folder / MANIFEST
    raise TaskError(f"no {MANIFEST} in {start} or any folder above it: run this inside the "
                    f"repository, or pass --manifest-path")


def task_listing(manifest: Path) -> str:
    """What `pixi task list` shows: each task's name and description."""
    tasks = load_tasks(manifest)
    width = max((len(name) for name in tasks), default=0)
    lines = [f"Tasks of {shown(manifest)} (run one: run_task.py TASK [-- ARGS]):"]
    lines += [f"  {name:<{width}}  {spec.get('description', '')}".rstrip()
              for name, spec in sorted(tasks.items())]
    return "\n".join(lines)


def without_repeated_flags(cmd: str, extra_args: list[str]) -> list[str]:
    """Drop extra flags the command already has: `test -- -q` on `pytest -q` stays `-q`, not
    `-q -q` (which hides pytest's closing "N passed" line)."""
    words = set(shlex.split(cmd))
    return [a for a in extra_args if not (a.startswith("-") and "=" not in a and a in words)]


def load_tasks(manifest: Path) -> dict[str, dict]:
    with open(manifest, "rb") as fh:
        tasks = tomllib.load(fh).get("tasks", {})
    return {name: {"cmd": spec} if isinstance(spec, (str, list)) else dict(spec)
            for name, spec in tasks.items()}


def nested_pixi_run(cmd: str, cwd: Path) -> tuple[Path, str, list[str]] | None:
    """(manifest, task, extra args) when `cmd` is itself `pixi run ...`, else None."""
    words = shlex.split(cmd)
    if words[:2] != ["pixi", "run"]:
        return None
    manifest, rest = cwd / "pixi.toml", words[2:]
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option in ("--manifest-path", "-m"):
            manifest = (cwd / rest.pop(0)).resolve()
        elif option in ("-e", "--environment"):
            rest.pop(0)  # one Python environment here serves every pixi environment
        elif option.startswith("--manifest-path="):
            manifest = (cwd / option.split("=", 1)[1]).resolve()
    if not rest:
        raise TaskError(f"no task named in {cmd!r}")
    return manifest, rest[0], rest[1:]


def run_task(manifest: Path, name: str, extra_args: list[str], overrides: dict[str, str],
             done: set[tuple[Path, str]] | None = None) -> int:
    done = set() if done is None else done
    tasks = load_tasks(manifest)
    if name not in tasks:
        raise TaskError(f"{shown(manifest)} has no task {name!r} "
                        f"(tasks: {', '.join(sorted(tasks))})")
    spec = tasks[name]
    depends = spec.get("depends-on", spec.get("depends_on", []))
    for dependency in [depends] if isinstance(depends, str) else depends:
        dep_name = dependency if isinstance(dependency, str) else dependency["task"]
        if (manifest, dep_name) not in done:
            code = run_task(manifest, dep_name, [], overrides, done)
            if code:
                return code
    done.add((manifest, name))
    cmd = spec.get("cmd")
    if not cmd:
        return 0
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    cwd = (manifest.parent / spec.get("cwd", ".")).resolve()
    nested = nested_pixi_run(cmd, cwd)
    if nested:
        inner_manifest, inner_task, inner_args = nested
        return run_task(inner_manifest, inner_task, inner_args + extra_args, overrides)
    env = {**os.environ, **{k: str(v) for k, v in spec.get("env", {}).items()}, **overrides}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    extra_args = without_repeated_flags(cmd, extra_args)
    full = cmd + "".join(" " + shlex.quote(a) for a in extra_args)
    print(f"[{shown(manifest.parent)}] {name}: {full}",
          file=sys.stderr, flush=True)
    return subprocess.call(["bash", "-c", full], cwd=cwd, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", help="the task to run; none: list the tasks")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the task")
    parser.add_argument("--manifest-path", type=Path,
                        help="the pixi.toml (default: the nearest one, from the current folder up)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="override a variable of the task's environment")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.env)
    try:
        manifest = (args.manifest_path.resolve() if args.manifest_path
                    else nearest_manifest(Path.cwd()))
        if args.task is None:
            print(task_listing(manifest))
            return 0
        return run_task(manifest, args.task, args.args, overrides)
    except TaskError as exc:
        print(f"run_task: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
