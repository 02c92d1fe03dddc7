"""Every Python block in README.md runs, in order, in one namespace (as a reader would paste them)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__readme__"}
    torch.manual_seed(0)
    for number, block in enumerate(python_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {number} failed: {error!r}\n{block}") from error


def test_readme_quick_start_is_make_demo_and_make_test():
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick_start and "make test" in quick_start


def _first_table(lines: list[str], start: int = 0) -> list[str]:
    begin = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(begin, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[begin:end]


def test_readme_results_tables_are_the_result_files_tables():
    # the digits table lost its separator line and gained a stray header row in a rerun's paste: GitHub showed it
    # as plain text, and nothing checked it against experiments/results/digits.md
    lines = README.read_text().splitlines()
    results = README.parent / "experiments" / "results"
    for heading, name in [
        ("**Digits**", "digits"),
        ("**MNIST-1D**", "mnist1d"),
        ("**Regression with a gap**", "regression_gap"),
        ("**Diabetes**", "diabetes"),
        ("**MNIST-1D against its paper**", "mnist1d_reference"),
    ]:
        start = next(i for i, line in enumerate(lines) if line.startswith(heading))
        expected = _first_table((results / f"{name}.md").read_text().splitlines())
        assert _first_table(lines, start) == expected, f"README's {heading} table differs from {name}.md's"
        assert set(expected[1]) <= set("|-: "), f"{name}.md's table has no separator line under its header"
