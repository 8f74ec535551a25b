"""Benchmarks: what the trainers cost over the bare frameworks, and how fast a dataset stages.

    python tools/bench.py                        # --size small: a few minutes here
    python tools/bench.py --size large           # the issue's sizes, for a real machine
    python tools/bench.py --size smoke           # every row once, tiny: proves the command runs
    python tools/bench.py --markdown docs/benchmarks.md   # also rewrite its generated:bench block
    python tools/bench.py --only staging hung    # some rows only (names: see --help)

Every figure compares two things run side by side in this one invocation -- interleaved,
several repetitions, median -- because shared machines are noisy and ratios much less so. The
command starts its own servers on loopback (moto's S3 server, a platform backend that can hang,
an MLflow tracking server) and pins them to the last CPU core and the jobs to the others: the
stand-in servers run elsewhere in production and must not steal the measured jobs' CPU.

Exit status 0 when every row was measured (whether or not it met its goal: timings on a shared
machine are evidence, not a gate), 1 when some row could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.benchmarks import configured, measure  # noqa: E402
from tools.benchmarks.measure import FIGURES, BenchError, Row, Size  # noqa: E402
from tools.measured_on import commit, machine  # noqa: E402

SIZES = {
    "smoke": Size(name="smoke", repeat=1, startup_repeat=2, archive_mb=4, archive_files=100,
                  pytorch_images=8, pytorch_epochs=2, yolo_images=8, yolo_epochs=2,
                  timm_images=4, timm_epochs=2, checkpoint_mb=4, checkpoints=3, train_s=0.2,
                  warmup=False, folder_files=200, annotation_images=200),
    "small": Size(name="small", repeat=3, startup_repeat=5, archive_mb=50, archive_files=1000,
                  pytorch_images=100, pytorch_epochs=3, yolo_images=64, yolo_epochs=4,
                  timm_images=20, timm_epochs=4, checkpoint_mb=25, checkpoints=7, train_s=1.5,
                  folder_files=2000, annotation_images=10000),
    "large": Size(name="large", repeat=5, startup_repeat=10, archive_mb=500,
                  archive_files=10000, pytorch_images=300, pytorch_epochs=4, yolo_images=256,
                  yolo_epochs=5, timm_images=60, timm_epochs=5, checkpoint_mb=100,
                  checkpoints=11, train_s=3.0, folder_files=10000, annotation_images=10000),
}

# Row name -> the function measuring it (each returns one or more Rows), in the order.
ROWS: dict[str, Callable[[measure.Bench], list[Row]]] = {
    "yolo": measure.yolo_epoch_time,
    "timm": measure.timm_throughput,
    "hung": measure.hung_backend,
    "staging": measure.dataset_staging,
    "checkpoint": measure.checkpoint_stall,
    "startup": measure.startup,
    "folder": measure.folder_staging,
    "annotations": measure.annotation_conversion,
}
# Cheap rows first: the MLflow server starts meanwhile (~15 s).
RUN_ORDER = ("startup", "staging", "folder", "annotations", "checkpoint", "hung", "yolo", "timm")
# Trainers that declare their own row (trainers/<slug>/bench.toml) come last, by slug.
DECLARED = configured.discover()
ROWS |= configured.rows()
RUN_ORDER += tuple(DECLARED)


def figure(name: str) -> str:
    return FIGURES.get(name) or configured.figure_name(DECLARED[name])

MARKER_OPEN = re.compile(r"^<!-- generated:bench\b.*-->\s*$", re.M)
MARKER_CLOSE = "<!-- /generated:bench -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(ROWS) + "\nsizes: " + "; ".join(
            f"{s.name}: {s.repeat} repetition(s), {s.archive_mb} MB / {s.archive_files} files "
            "archive" for s in SIZES.values()))
    parser.add_argument("--size", choices=SIZES, default="small",
                        help="how much work each row does (default: small)")
    parser.add_argument("--repeat", type=int, help="repetitions per pair (default: the size's)")
    parser.add_argument("--only", nargs="+", choices=ROWS, metavar="ROW",
                        help="measure these rows only")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="rewrite the generated:bench block of this Markdown file")
    parser.add_argument("--work-dir", type=Path, help="scratch folder, kept (default: a "
                        "temporary one, removed at the end)")
    return parser.parse_args(argv)


def format_table(rows: list[Row]) -> str:
    header = ("figure", "ours", "baseline", "ratio", "goal", "result")
    cells = [header] + [(r.figure, r.ours, r.baseline, r.shown, r.goal, r.result) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip()
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.figure}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def markdown_block(rows: list[Row], size: Size, repeat: int, when: str, where: str) -> str:
    command = f"python tools/bench.py --size {size.name}"
    if repeat != SIZES[size.name].repeat:  # the command shown must reproduce the table
        command += f" --repeat {repeat}"
    lines = [f"Measured {when} on {where}, with `{command}` "
             f"({repeat} interleaved repetition{'s' if repeat != 1 else ''} per pair, median).",
             "", "| figure | ours | baseline | ratio | goal | result |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.ours} | {r.baseline} | {r.shown} | {r.goal} | {r.result} |"
              for r in rows]
    notes = [f"- **{r.figure}**: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def fill_markdown(text: str, block: str) -> str:
    """Replace what lies between the generated:bench markers; the markers themselves stay."""
    opening = MARKER_OPEN.search(text)
    closing = text.find(MARKER_CLOSE, opening.end()) if opening else -1
    if not opening or closing < 0:
        raise BenchError(f"no `<!-- generated:bench ... -->` ... `{MARKER_CLOSE}` block found")
    return text[:opening.end()] + "\n" + block + text[closing:]


@contextlib.contextmanager
def scratch(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    if args.repeat:
        size = dataclasses.replace(size, repeat=args.repeat)
    wanted = [name for name in RUN_ORDER if not args.only or name in args.only]
    results: dict[str, list[Row]] = {}
    failed = False
    with scratch(args.work_dir) as root, measure.Bench(root, size) as bench:
        for name in wanted:
            started = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = ROWS[name](bench)
            except BenchError as exc:
                failed = True
                results[name] = [Row.error(figure(name), str(exc))]
            print(f"bench: {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr,
                  flush=True)
    rows = [row for name in ROWS if name in results for row in results[name]]
    print(format_table(rows))
    if args.markdown:
        when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}, {commit()},"
        block = markdown_block(rows, size, size.repeat, when, machine())
        try:
            args.markdown.write_text(fill_markdown(args.markdown.read_text(), block))
        except (OSError, BenchError) as exc:
            print(f"bench: cannot update {args.markdown}: {exc}", file=sys.stderr)
            return 1
        print(f"bench: wrote the table into {args.markdown}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
