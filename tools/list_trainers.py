"""Print the images workflow's build matrix: one entry per trainer, as JSON.

    python tools/list_trainers.py     {"include": [{"slug": "pytorch", "context": ...}, ...]}

A trainer is a folder under trainers/ with a copier answers file (the rule tools/sync.py uses),
so a newly rendered trainer joins the image builds with no workflow edit. Each entry names the
build context (the trainer folder alone), the image (`trainer-<slug>`) and the answers the image
is built for. Standard library only: the workflow runs this on the runner's python3, before any
environment is installed. Exit 2 when an answers file is unreadable or names another slug.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ANSWERS_FILE = ".copier-answers.yml"
REQUIRED = ("slug", "cuda_version", "python_version")
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
TOP_LEVEL_SCALAR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):[ \t]*(.*?)[ \t]*$")


class AnswersError(Exception):
    pass


def scalar(raw: str, where: str) -> str:
    """One YAML scalar as copier writes it: plain, 'single-quoted' or "double-quoted"."""
    if raw[:1] == "'" and raw[-1:] == "'" and len(raw) >= 2:
        return raw[1:-1].replace("''", "'")
    if raw[:1] == '"':
        try:
            return str(json.loads(raw))
        except ValueError as exc:
            raise AnswersError(f"{where}: cannot read the double-quoted value {raw}") from exc
    if raw[:1] in ("|", ">", "[", "{", "&", "*", "!"):
        raise AnswersError(f"{where}: expected a plain string, got {raw!r}")
    return raw


def read_answers(path: Path) -> dict[str, str]:
    """The top-level string answers of a copier answers file (comments and others skipped)."""
    answers: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = TOP_LEVEL_SCALAR.match(line)
        if match and match.group(1) in REQUIRED:
            answers[match.group(1)] = scalar(match.group(2), f"{path}:{number}")
    missing = [key for key in REQUIRED if not answers.get(key)]
    if missing:
        raise AnswersError(f"{path}: no answer for {', '.join(missing)}")
    return answers


def matrix_entry(repo: Path, trainer: Path) -> dict[str, str]:
    answers = read_answers(trainer / ANSWERS_FILE)
    slug = answers["slug"]
    if not SLUG.match(slug) or slug != trainer.name:
        raise AnswersError(f"{trainer / ANSWERS_FILE}: slug {slug!r} must be the folder's name "
                           f"({trainer.name!r}) and match {SLUG.pattern}")
    return {
        "slug": slug,
        "context": trainer.relative_to(repo).as_posix(),
        "image": f"trainer-{slug}",
        "cuda_version": answers["cuda_version"],
        "python_version": answers["python_version"],
    }


def build_matrix(repo: Path) -> dict[str, list[dict[str, str]]]:
    trainers_dir = repo / "trainers"
    trainers = sorted(p for p in trainers_dir.iterdir() if (p / ANSWERS_FILE).is_file()) \
        if trainers_dir.is_dir() else []
    return {"include": [matrix_entry(repo, trainer) for trainer in trainers]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="monorepo root (default: this tool's repository)")
    args = parser.parse_args(argv)
    try:
        matrix = build_matrix(args.repo.resolve())
    except AnswersError as exc:
        print(f"list_trainers: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(matrix, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
