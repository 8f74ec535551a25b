"""The benchmark command (tools/bench.py) runs and prints every row.

Only that it runs is asserted, never a timing: on a shared machine timings are evidence, not a
gate. The smoke size measures every row once on tiny inputs, with its own servers on loopback.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
README_WITH_BLOCK = """# Title

<!-- generated:bench by `python tools/bench.py --markdown README.md` -->
an old table
<!-- /generated:bench -->

After the block.
"""


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_under_test", REPO / "tools/bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_markdown_block_is_replaced_between_its_markers() -> None:
    bench = load_bench()
    filled = bench.fill_markdown(README_WITH_BLOCK, "| new table |\n")
    assert "an old table" not in filled and "| new table |" in filled
    assert filled.startswith("# Title\n\n<!-- generated:bench by")
    assert filled.endswith("| new table |\n<!-- /generated:bench -->\n\nAfter the block.\n")
    assert bench.fill_markdown(filled, "| new table |\n") == filled  # twice changes nothing


def test_markdown_block_names_the_command_that_reproduces_it() -> None:
    bench = load_bench()
    small = bench.SIZES["small"]
    default = bench.markdown_block([], small, small.repeat, "today", "here")
    assert f"`python tools/bench.py --size small` ({small.repeat} interleaved" in default
    more = bench.markdown_block([], small, small.repeat + 2, "today", "here")
    assert (f"`python tools/bench.py --size small --repeat {small.repeat + 2}` "
            f"({small.repeat + 2} interleaved") in more


def test_markdown_without_markers_is_an_error() -> None:
    bench = load_bench()
    with pytest.raises(bench.BenchError, match="generated:bench"):
        bench.fill_markdown("# no block here\n", "| table |\n")

def test_a_trainers_bench_toml_declares_its_row(tmp_path: Path) -> None:
    from tools.benchmarks import configured

    declared = tmp_path / "trainers" / "newfw"
    declared.mkdir(parents=True)
    (declared / "bench.toml").write_text('figure = "newfw epoch time"\ngoal = 1.05\n')
    (tmp_path / "trainers" / "other").mkdir()  # no bench.toml: no row
    assert configured.discover(tmp_path / "trainers") == {"newfw": declared / "bench.toml"}
    assert configured.figure_name(declared / "bench.toml") == "newfw epoch time"
    with pytest.raises(configured.BenchError, match="missing dataset_id, sample, baseline"):
        configured.load(declared / "bench.toml")


def test_every_declared_row_is_measured_by_the_bench_tool() -> None:
    bench = load_bench()
    for slug in bench.DECLARED:
        assert slug in bench.ROWS and slug in bench.RUN_ORDER
        assert bench.figure(slug) == bench.configured.load(bench.DECLARED[slug])["figure"]


@pytest.mark.slow
def test_smoke_size_runs_and_prints_every_row(tmp_path: Path) -> None:
    bench = load_bench()
    readme = tmp_path / "README.md"
    readme.write_text(README_WITH_BLOCK)
    done = subprocess.run(
        # Through the root pixi task's pip twin, so `pixi run bench` is what this proves.
        [sys.executable, "tools/run_task.py", "bench", "--size", "smoke", "--markdown", str(readme),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = [bench.figure(name) for name in bench.ROWS if name != "startup"]
    figures += ["staging, second time (cache)"]
    figures += [f"start-up: {p.parent.name}" for p in sorted(REPO.glob("trainers/*/train.py"))]
    for figure in figures:
        assert figure in done.stdout, f"no {figure!r} row in:\n{done.stdout}"
    table = readme.read_text()
    assert "an old table" not in table and "After the block." in table
    assert all(figure in table for figure in figures)
