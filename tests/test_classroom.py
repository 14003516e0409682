"""The classroom (exercises/): the student copy fails exercise by exercise and imports, the
project's own functions put back make it pass, make.py's list and refusal, and the lesson notebook
runs. The exercises' own tests run on the project itself from `pytest exercises`."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "exercises"))

import make  # noqa: E402  (exercises/make.py)


def pytest_in(folder, *extra):
    """`python -m pytest -q exercises` in `folder`, a copy of the project (its own process)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "exercises"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="1000")
    return subprocess.run(
        cmd + list(extra), cwd=folder, capture_output=True, text=True, env=env, timeout=300
    )


def test_list_names_every_exercise_once(capsys):
    assert make.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [str(n) for n, *_ in make.EXERCISES]
    for line in lines:
        number, file, function = line.split()
        tree = ast.parse(open(os.path.join(ROOT, file)).read())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, line
        tests = [f for f in os.listdir(os.path.join(ROOT, "exercises")) if f.startswith("test_ex")]
        assert sum(f.startswith(f"test_ex{number}_") for f in tests) == 1, line


def test_a_non_empty_out_is_refused_in_one_line(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit) as e:
        make.main([str(tmp_path)])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["something"]


def test_the_student_copy_fails_by_exercise_imports_and_passes_with_the_solutions_back(tmp_path):
    out = tmp_path / "student"
    make.main([str(out)])
    assert not (out / "exercises" / "ANSWERS.md").exists()  # the answer key stays with the teacher
    for number, file, function, title in make.EXERCISES:
        text = (out / file).read_text()
        assert f"raise NotImplementedError('Exercise {number}: {title}" in text.replace('"', "'")
    # the copy imports, and its command lines parse, with no ../shared and no tests/
    code = "import grpo_vlm, eval, sft; grpo_vlm.parse_args(['--task', 'rec']); print('ok')"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    # every exercise's tests fail, each with its own number
    res = pytest_in(out)
    assert res.returncode == 1, res.stdout[-3000:]
    assert " passed" not in res.stdout.splitlines()[-1], res.stdout[-1000:]
    line = r"^FAILED exercises/test_ex(\d+)_\S+ - NotImplementedError: Exercise (\d+):"
    failed = re.findall(line, res.stdout, re.M)
    assert failed and all(a == b for a, b in failed), res.stdout[-3000:]
    assert {int(a) for a, _ in failed} == {n for n, *_ in make.EXERCISES}
    n_failed = int(re.search(r"(\d+) failed", res.stdout.splitlines()[-1]).group(1))
    assert len(failed) == n_failed  # no test fails for another reason
    # the project's own functions put back: every exercise passes in the copy
    for file in {f for _, f, _, _ in make.EXERCISES}:
        shutil.copy2(os.path.join(ROOT, file), out / file)
    res = pytest_in(out)
    assert res.returncode == 0, res.stdout[-3000:]


RUN_NOTEBOOK = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
shown = []
plt.show = lambda *a, **k: (shown.append(plt.gcf()), plt.close("all"))
namespace = {"__name__": "__main__"}
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
for i, cell in enumerate(cells):
    exec(compile("".join(cell["source"]), f"lesson.ipynb, code cell {i + 1}", "exec"), namespace)
print("FIGURES", len(shown))
"""


def test_the_lesson_notebook_runs():
    """The notebook's code cells, in order, in one fresh Python process: what a Jupyter kernel runs,
    without installing one (README, "The classroom")."""
    path = os.path.join(ROOT, "exercises", "lesson.ipynb")
    res = subprocess.run(
        [sys.executable, "-c", RUN_NOTEBOOK, path],
        cwd=os.path.join(ROOT, "exercises"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pass 2: J = " in res.stdout and "mean reward of the group" in res.stdout
    assert res.stdout.strip().endswith("FIGURES 6"), res.stdout[-500:]
