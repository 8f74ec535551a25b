"""Keep every trainer's managed files identical to what the template renders.

    python tools/sync.py            re-render the managed files of every trainer
    python tools/sync.py --check    write nothing; report drift; exit 0 (in sync), 1 (drift or
                                    missing files), 2 (a trainer could not be rendered)

A trainer is a folder under trainers/ with a copier answers file. Its managed files (listed once,
in template/copier.yml under `_managed_files`) are rendered from the working-tree template with
that trainer's answers, so uncommitted template changes count and git is not needed. Seed files
(train.py, README.md, ...) belong to the trainer and are never compared. A difference in line
endings alone is not drift.

The same run regenerates what is derived from code:
- each trainer's capabilities.json: the output of `python train.py --capabilities` (for a
  trainer with a capabilities.py), run on the trainer's top-level modules with the freshly
  rendered managed files over them, so `--check` also catches a manifest that a template change
  made stale;
- each trainer's framework_options.py, for a trainer whose options.py has a `generate()`: the
  schema of its framework options, derived from the installed framework (which `generate()`
  imports: seconds, so it runs only here, never for `--capabilities`);
- template/capabilities.json.jinja: the same for a render of the template, with the slug put
  back as `{{ slug }}`, so a trainer fresh from `copier copy` is already in sync;
- every generated block of the docs, between `<!-- generated:NAME ... -->` and
  `<!-- /generated:NAME -->`, wherever it lives: in README.md and docs/*.md the contract's
  settings and exit-code tables (`contract-tables`, from template/utils.py); in each trainer's
  README.md the settings table of a script (`settings-train`, `settings-evaluate`, ...: that
  script's SETTINGS, read in the same view as the manifest). A block of a name this tool does
  not know fails, unless it is a measured report (`bench`, `reliability`), which its own
  command rewrites (see MEASURED_BLOCKS).

`copier update` cannot serve a template kept in a sub-folder of the same repository, so this tool
renders through copier's API into a temporary folder and copies the managed files across.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ANSWERS_FILE = ".copier-answers.yml"
FIX_COMMAND = "python tools/sync.py"
RULE = ("Managed files are generated from template/: edit the template, never the copy, "
        "then regenerate the copies.")

IN_SYNC, DRIFTED, MISSING, RENDER_ERROR = "in sync", "drifted", "missing", "render error"
MANIFEST_FILE, DECLARATIONS_FILE = "capabilities.json", "capabilities.py"
REQUIREMENTS_FILE = "requirements.txt"
MANIFEST_COMMAND = ("train.py", "--capabilities")
MANIFEST_TIMEOUT_S = 30  # the command imports utils and the scripts only: well under a second
TEMPLATE_MANIFEST, PLACEHOLDER_SLUG = "capabilities.json.jinja", "placeholder"
PLACEHOLDER_MODEL = "placeholder-default-model"  # becomes the default_model answer
OPTIONS_MODULE, GENERATED_OPTIONS = "options.py", "framework_options.py"
OPTIONS_COMMAND = ("-c", "import json, options; print(json.dumps(options.generate()))")
OPTIONS_TIMEOUT_S = 300  # it imports the framework (torch): seconds, more on a busy runner


@dataclass
class TrainerReport:
    name: str
    state: str = IN_SYNC
    diffs: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)


def managed_files(template: Path) -> list[str]:
    config = yaml.safe_load((template / "copier.yml").read_text(encoding="utf-8"))
    files = config.get("_managed_files") or []
    if not files:
        raise SystemExit(f"{template / 'copier.yml'} declares no _managed_files")
    return list(files)


def find_trainers(trainers_dir: Path) -> list[Path]:
    if not trainers_dir.is_dir():
        return []
    return sorted(p for p in trainers_dir.iterdir() if (p / ANSWERS_FILE).is_file())


def read_answers(trainer: Path) -> dict:
    answers = yaml.safe_load((trainer / ANSWERS_FILE).read_text(encoding="utf-8")) or {}
    return {k: v for k, v in answers.items() if not k.startswith("_")}


def render(template: Path, answers: dict, dest: Path) -> None:
    import copier

    copier.run_copy(str(template), str(dest), data=answers, defaults=True, overwrite=True,
                    quiet=True, unsafe=False, skip_tasks=True)


def normalise(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def compare(trainer: Path, rendered: Path, files: list[str], repo: Path, *,
            write: bool) -> TrainerReport:
    report = TrainerReport(trainer.name)
    for name in files:
        expected_path, actual_path = rendered / name, trainer / name
        if not expected_path.is_file():
            report.state, report.error = RENDER_ERROR, f"the template did not render {name}"
            return report
        expected = expected_path.read_bytes()
        if actual_path.is_file() and normalise(actual_path.read_bytes()) == normalise(expected):
            continue
        label = actual_path.relative_to(repo).as_posix()
        if not actual_path.is_file():
            report.state = MISSING if report.state == IN_SYNC else report.state
            report.diffs.append(f"{label}: missing\n")
        else:
            report.state = DRIFTED
            report.diffs.append("".join(difflib.unified_diff(
                normalise(actual_path.read_bytes()).decode("utf-8", "replace").splitlines(True),
                normalise(expected).decode("utf-8", "replace").splitlines(True),
                fromfile=f"{label} (in the trainer)",
                tofile=f"{label} (rendered from template/)")))
        if write:
            actual_path.parent.mkdir(parents=True, exist_ok=True)
            actual_path.write_bytes(expected)
            report.changed.append(name)
    return report


class ManifestError(Exception):
    pass


def run_in_view(trainer: Path, rendered: Path, files: list[str],
                argv: list[str]) -> subprocess.CompletedProcess:
    """`python ARGV` in a view of the trainer: its top-level modules and requirements.txt (which
    pins the framework's version), with the freshly rendered managed files over them."""
    with tempfile.TemporaryDirectory(prefix="manifest-") as tmp:
        view = Path(tmp) / trainer.name
        view.mkdir()
        for module in [*trainer.glob("*.py"), *trainer.glob(REQUIREMENTS_FILE)]:
            shutil.copyfile(module, view / module.name)
        for name in files:
            if name.endswith(".py") and (rendered / name).is_file():
                shutil.copyfile(rendered / name, view / name)
        return subprocess.run(
            [sys.executable, *argv], cwd=view, capture_output=True, text=True,
            timeout=MANIFEST_TIMEOUT_S, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def generate_manifest(trainer: Path, rendered: Path, files: list[str]) -> str:
    """`python train.py --capabilities`, as committed: run on a view of the trainer (its
    top-level modules and requirements.txt, which pins the framework's version, with the
    rendered managed files over them) with this interpreter."""
    result = run_in_view(trainer, rendered, files, list(MANIFEST_COMMAND))
    command = "python " + " ".join(MANIFEST_COMMAND)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise ManifestError(f"`{command}` failed: {last}")
    try:
        manifest = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"`{command}` printed no JSON ({exc.msg})") from None
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def sync_manifest(trainer: Path, rendered: Path, files: list[str], report: TrainerReport,
                  repo: Path, *, write: bool) -> None:
    """Regenerate (or, with write=False, compare) the trainer's capabilities.json."""
    if report.state == RENDER_ERROR:
        return
    if not (trainer / DECLARATIONS_FILE).is_file():
        report.notes.append(f"no {DECLARATIONS_FILE}, so no {MANIFEST_FILE}")
        return
    try:
        expected = generate_manifest(trainer, rendered, files)
    except (ManifestError, subprocess.TimeoutExpired) as exc:
        report.state, report.error = RENDER_ERROR, f"{MANIFEST_FILE}: {exc}"
        return
    update_generated(trainer / MANIFEST_FILE, expected, report, repo, write=write)


def python_literal(value, indent: int = 0) -> str:
    """`value` (plain JSON types) as Python source, one dict item per line."""
    if isinstance(value, dict) and value:
        pad = " " * (indent + 4)
        items = "".join(f"{pad}{key!r}: {python_literal(item, indent + 4)},\n"
                        for key, item in value.items())
        return "{\n" + items + " " * indent + "}"
    return repr(value)


def options_module(generated: dict) -> str:
    return (f'"""Generated by `{FIX_COMMAND}` from options.py\'s generate() '
            f'({generated["source"]}).\n\nNever edit by hand: regenerate after changing '
            'options.py or the framework\'s pinned version."""\n# ruff: noqa: E501\n\n'
            f'SOURCE = {generated["source"]!r}\n\n'
            f'PROPERTIES = {python_literal(generated["properties"])}\n\n'
            f'EXCLUDED = {python_literal(generated["excluded"])}\n')


def sync_options(trainer: Path, rendered: Path, files: list[str], report: TrainerReport,
                 repo: Path, *, write: bool) -> None:
    """Regenerate (or compare) framework_options.py from the trainer's options.generate()."""
    module = trainer / OPTIONS_MODULE
    if report.state == RENDER_ERROR or not module.is_file() or (
            "def generate(" not in module.read_text(encoding="utf-8")):
        return
    with tempfile.TemporaryDirectory(prefix="options-") as tmp:
        view = Path(tmp) / trainer.name
        view.mkdir()
        for source in trainer.glob("*.py"):
            shutil.copyfile(source, view / source.name)
        for name in files:
            if name.endswith(".py") and (rendered / name).is_file():
                shutil.copyfile(rendered / name, view / name)
        try:
            result = subprocess.run(
                [sys.executable, *OPTIONS_COMMAND], cwd=view, capture_output=True, text=True,
                timeout=OPTIONS_TIMEOUT_S, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        except subprocess.TimeoutExpired:
            report.state, report.error = RENDER_ERROR, f"{GENERATED_OPTIONS}: generate() timed out"
            return
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        report.state, report.error = RENDER_ERROR, f"{GENERATED_OPTIONS}: generate() failed: {last}"
        return
    generated = json.loads(result.stdout.strip().splitlines()[-1])
    update_generated(trainer / GENERATED_OPTIONS, options_module(generated), report, repo,
                     write=write, generator="options.generate()")


def update_generated(path: Path, expected: str, report: TrainerReport, repo: Path, *,
                     write: bool, generator: str = "python " + " ".join(MANIFEST_COMMAND)
                     ) -> None:
    """Compare a file generated from code with its committed text; rewrite it if `write`."""
    label = path.relative_to(repo).as_posix()
    if path.is_file() and normalise(path.read_bytes()) == normalise(expected.encode()):
        return
    if not path.is_file():
        report.state = MISSING if report.state == IN_SYNC else report.state
        report.diffs.append(f"{label}: missing\n")
    else:
        report.state = DRIFTED
        report.diffs.append("".join(difflib.unified_diff(
            normalise(path.read_bytes()).decode("utf-8", "replace").splitlines(True),
            expected.splitlines(True), fromfile=f"{label} (committed)",
            tofile=f"{label} (generated by {generator})")))
    if write:
        path.write_text(expected, encoding="utf-8")
        report.changed.append(path.name)


def sync_template_manifest(template: Path, files: list[str], repo: Path, *,
                           write: bool) -> TrainerReport | None:
    """template/capabilities.json.jinja: the manifest of a render, its slug made `{{ slug }}`
    and MODEL_NAME's default `{{ default_model }}`."""
    if not (template / DECLARATIONS_FILE).is_file():
        return None
    report = TrainerReport(f"template/{TEMPLATE_MANIFEST}")
    with tempfile.TemporaryDirectory(prefix="sync-") as tmp:
        rendered = Path(tmp) / PLACEHOLDER_SLUG
        try:
            render(template, {"slug": PLACEHOLDER_SLUG, "default_model": PLACEHOLDER_MODEL},
                   rendered)
            text = generate_manifest(rendered, rendered, files)
        except Exception as exc:  # copier raises many types; the manifest its own
            first_line = (str(exc).strip().splitlines() or [""])[-1]
            report.state, report.error = RENDER_ERROR, f"{type(exc).__name__}: {first_line}"
            return report
    answers = {f'"trainer": "{PLACEHOLDER_SLUG}"': '"trainer": "{{ slug }}"',
               f'"default": "{PLACEHOLDER_MODEL}"': '"default": {{ default_model | tojson }}'}
    for pair in answers:
        if text.count(pair) != 1:
            report.state, report.error = RENDER_ERROR, f"the manifest does not name {pair} once"
            return report
    # Everything but the answers is literal text to jinja.
    for pair, expression in answers.items():
        text = text.replace(pair, "{% endraw %}" + expression + "{% raw %}")
    expected = "{% raw %}" + text + "{% endraw %}"
    update_generated(template / TEMPLATE_MANIFEST, expected, report, repo, write=write)
    return report


def load_template_utils(template: Path):
    spec = importlib.util.spec_from_file_location("template_utils_for_docs", template / "utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def contract_tables(utils) -> str:
    """The settings and exit codes as built: the README restates the contract from the code."""
    parts = []
    for title, group in (("Every script", utils.PLATFORM_SETTINGS),
                         ("`train.py` (every trainer; each adds its own)", utils.TRAIN_SETTINGS),
                         ("`evaluate.py`", utils.EVALUATE_SETTINGS),
                         ("`predict.py`", utils.PREDICT_SETTINGS),
                         ("`export.py`", utils.EXPORT_SETTINGS)):
        parts.append(f"**{title}**\n\n{utils.settings_markdown(group)}")
    rows = "\n".join(f"| {code} | {meaning} |" for code, meaning in utils.EXIT_CODES.items())
    parts.append(f"**Exit codes**\n\n| code | meaning |\n|---|---|\n{rows}\n")
    return "\n".join(parts)


GENERATED_BLOCK = re.compile(
    r"(?P<open><!-- generated:(?P<name>[\w-]+)\b[^\n]*?-->\n)(?P<body>.*?)"
    r"(?P<close><!-- /generated:(?P=name) -->)", re.S)
DOCS = ("README.md", "docs/*.md")
CONTRACT_BLOCK = "contract-tables"
SETTINGS_BLOCK_PREFIX = "settings-"  # settings-train: train.py's SETTINGS, in a trainer README
# Reports of a measurement: this tool leaves their text alone; these commands rewrite them, and
# tests/test_reports.py checks that their rows still name today's trainers and scenarios.
MEASURED_BLOCKS = {
    "bench": "python tools/bench.py --markdown docs/benchmarks.md",
    "reliability": "CONFORMANCE_REPORT=docs/conformance.md python -m pytest tests/conformance",
}


def update_blocks(path: Path, makers: dict, report: TrainerReport, repo: Path, *,
                  write: bool) -> list[str]:
    """Regenerate (or, with write=False, compare) every generated block of `path` that `makers`
    ({name: () -> text}) knows; return the names of the blocks found."""
    text = path.read_text(encoding="utf-8")
    label = path.relative_to(repo).as_posix()
    found, pieces, last = [], [], 0
    for block in GENERATED_BLOCK.finditer(text):
        name = block["name"]
        found.append(name)
        if name in MEASURED_BLOCKS:
            continue
        if name not in makers:
            report.state, report.error = RENDER_ERROR, (
                f"{label}: unknown generated block {name!r} (this tool makes "
                f"{', '.join(sorted(makers)) or 'none here'})")
            continue
        expected = makers[name]()
        if normalise(block["body"].encode()) == normalise(expected.encode()):
            continue
        report.state = DRIFTED if report.state != RENDER_ERROR else report.state
        report.diffs.append("".join(difflib.unified_diff(
            normalise(block["body"].encode()).decode().splitlines(True),
            expected.splitlines(True), fromfile=f"{label} (generated block {name!r}, committed)",
            tofile=f"{label} (generated block {name!r}, as {FIX_COMMAND} writes it)")))
        pieces += [text[last:block.start("body")], expected]
        last = block.end("body")
        report.changed.append(f"{label}#{name}")
    if write and pieces:
        path.write_text("".join(pieces) + text[last:], encoding="utf-8")
    return found


def sync_docs(repo: Path, *, check: bool) -> list[TrainerReport]:
    """The monorepo's docs: README.md and docs/*.md."""
    utils = load_template_utils(repo / "template")
    makers = {CONTRACT_BLOCK: lambda: contract_tables(utils)}
    reports, seen = [], set()
    for path in sorted({p for pattern in DOCS for p in repo.glob(pattern)}):
        report = TrainerReport(path.relative_to(repo).as_posix())
        names = update_blocks(path, makers, report, repo, write=not check)
        seen.update(names)
        if names:
            reports.append(report)
    if CONTRACT_BLOCK not in seen:
        reports.append(TrainerReport(
            "docs", RENDER_ERROR, error=f"no <!-- generated:{CONTRACT_BLOCK} ... --> ... "
            f"<!-- /generated:{CONTRACT_BLOCK} --> block in {' or '.join(DOCS)}"))
    return reports


SETTINGS_PROBE = ("import importlib, json, sys, utils\n"
                  "print(json.dumps({name: utils.settings_markdown("
                  "importlib.import_module(name).SETTINGS) for name in sys.argv[1:]}))")


def sync_readme_tables(trainer: Path, rendered: Path, files: list[str], report: TrainerReport,
                       repo: Path, *, write: bool) -> None:
    """The settings tables of the trainer's README.md, each from its script's SETTINGS."""
    readme = trainer / "README.md"
    if report.state == RENDER_ERROR or not readme.is_file():
        return
    scripts = [block["name"].removeprefix(SETTINGS_BLOCK_PREFIX)
               for block in GENERATED_BLOCK.finditer(readme.read_text(encoding="utf-8"))
               if block["name"].startswith(SETTINGS_BLOCK_PREFIX)]
    tables: dict[str, str] = {}
    if scripts:
        result = run_in_view(trainer, rendered, files, ["-c", SETTINGS_PROBE, *scripts])
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
            report.state, report.error = RENDER_ERROR, f"README.md settings tables: {last}"
            return
        tables = json.loads(result.stdout)
    makers = {SETTINGS_BLOCK_PREFIX + name: (lambda table=table: table)
              for name, table in tables.items()}
    update_blocks(readme, makers, report, repo, write=write)


def sync(repo: Path, *, check: bool, out=sys.stdout) -> int:
    template, trainers_dir = repo / "template", repo / "trainers"
    files = managed_files(template)
    trainers = find_trainers(trainers_dir)
    if not trainers:
        print(f"no trainers found under {trainers_dir.relative_to(repo)}/", file=out)
        return 0
    reports: list[TrainerReport] = []
    for trainer in trainers:
        with tempfile.TemporaryDirectory(prefix="sync-") as tmp:
            try:
                render(template, read_answers(trainer), Path(tmp) / trainer.name)
            except Exception as exc:  # copier raises many types; each is this trainer's problem
                first_line = (str(exc).strip().splitlines() or [""])[-1]
                reports.append(TrainerReport(trainer.name, RENDER_ERROR,
                                             error=f"{type(exc).__name__}: {first_line}"))
                continue
            report = compare(trainer, Path(tmp) / trainer.name, files, repo, write=not check)
            sync_options(trainer, Path(tmp) / trainer.name, files, report, repo,
                         write=not check)
            sync_manifest(trainer, Path(tmp) / trainer.name, files, report, repo,
                          write=not check)
            sync_readme_tables(trainer, Path(tmp) / trainer.name, files, report, repo,
                               write=not check)
            reports.append(report)
    template_manifest = sync_template_manifest(template, files, repo, write=not check)
    if template_manifest is not None:
        reports.append(template_manifest)
    if (repo / "README.md").is_file():  # a monorepo, not a bare test tree of trainers
        reports += sync_docs(repo, check=check)
    return summarise(reports, check=check, out=out)


def summarise(reports: list[TrainerReport], *, check: bool, out) -> int:
    width = max(len(r.name) for r in reports)
    for r in reports:
        if r.state == RENDER_ERROR:
            detail = f": {r.error}"
        elif not check and r.changed:
            detail = f" -> rewrote {', '.join(r.changed)}"
        else:
            detail = ""
        if r.notes:
            detail += f" ({'; '.join(r.notes)})"
        print(f"{r.name:<{width}}  {r.state}{detail}", file=out)
    if check:
        for r in reports:
            for diff in r.diffs:
                print("\n" + diff.rstrip("\n"), file=out)
    if any(r.state == RENDER_ERROR for r in reports):
        print(f"\nFix the answers file ({ANSWERS_FILE}), the template or the trainer's "
              f"{DECLARATIONS_FILE}, then run: {FIX_COMMAND}", file=out)
        return 2
    if check and any(r.state in (DRIFTED, MISSING) for r in reports):
        print(f"\n{RULE}\nTo fix, run: {FIX_COMMAND}", file=out)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 on drift, 2 on a render error")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="monorepo root (default: this tool's repository)")
    args = parser.parse_args(argv)
    return sync(args.repo.resolve(), check=args.check)


if __name__ == "__main__":
    sys.exit(main())
