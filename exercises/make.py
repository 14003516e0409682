"""The student copy: the project with each exercise's function body replaced by a
`raise NotImplementedError("Exercise N: ...")` (signature and docstring kept).

    python exercises/make.py OUT       # write the copy into OUT (a new or empty folder)
    python exercises/make.py --list    # one line per exercise: NUMBER FILE FUNCTION

The project itself is the solution: the copy is made from the project's own files, and nothing
here holds a second copy of any exercise.
"""

import argparse
import ast
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (number, file, function, title): the titles are exercises/README.md's headings
EXERCISES = [
    (1, "grpo_vlm.py", "group_advantages", "the group-normalised advantage"),
    (2, "grpo_vlm.py", "token_weights", "the token weights of the three aggregations"),
    (3, "grpo_vlm.py", "clipped_surrogate", "the clipped surrogate"),
    (4, "grpo_vlm.py", "k3_kl", "the k3 KL estimator"),
    (5, "vlm.py", "completion_mask", "the completion mask from the first EOS"),
    (6, "grpo_vlm.py", "inverse_cdf_draw", "drawing a token by the inverse CDF"),
    (7, "vlm.py", "token_logps", "the log-probs of the completion tokens at temperature T"),
    (8, "rewards.py", "iou_reward", "the REC IoU reward"),
    (9, "rewards.py", "format_reward", "the format reward"),
    (10, "objectives.py", "gspo_surrogate", "GSPO's sequence-level ratio"),
]

# What the exercises, the lesson and the default run need (exercises/ANSWERS.md stays behind):
# every module of the project (so the copy imports whatever they import), and these.
PROJECT = sorted(name for name in os.listdir(ROOT) if name.endswith(".py")) + [
    ".gitignore",
    "pyproject.toml",
    "requirements.txt",
    "checkpoints/tiny-qwen2.5-vl-rec",
    "exercises",
]
WITHHELD = {"ANSWERS.md", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
STUDENT_README = """# grpo-vlm: the student copy

Write the functions that raise `NotImplementedError("Exercise N: ...")`; `exercises/README.md`
gives each one's equation, shapes and a hint, and `exercises/EXPERIMENTS.md` the experiments to
run afterwards.

    pip install -r requirements.txt
    python -m pytest -q exercises                  # fails on every exercise not yet written
    python -m pytest -q exercises/test_ex3_*.py    # one exercise
    python grpo_vlm.py --task rec --steps 60 --eval-every 0   # with all written: the reward rises
"""


def blank(source, function, message):
    """`source` with `function`'s body (after its docstring) replaced by one raise."""
    tree = ast.parse(source)
    node = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None
    )
    if node is None:
        raise LookupError(f"no function {function!r}")
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    first = body[1] if has_doc else body[0]
    lines = source.splitlines(keepends=True)
    indent = " " * first.col_offset
    start, end = first.lineno - 1, node.end_lineno  # lines [start, end) are the body's code
    raise_line = f"{indent}raise NotImplementedError({message!r})\n"
    return "".join(lines[:start] + [raise_line] + lines[end:])


def message(number, title):
    return f"Exercise {number}: {title} (see exercises/README.md)"


def make(out):
    """Write the student copy into `out`; returns the exercises blanked."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        sys.exit(f"error: {out} exists and is not empty; give a new or empty folder")
    folders = [os.path.join(ROOT, p) for p in PROJECT if os.path.isdir(os.path.join(ROOT, p))]
    if any(os.path.commonpath([os.path.abspath(out), f]) == f for f in folders):
        sys.exit(f"error: {out} is inside a folder the copy is made from; give a folder elsewhere")
    os.makedirs(out, exist_ok=True)
    ignore = shutil.ignore_patterns(*WITHHELD)
    for rel in PROJECT:
        src, dst = os.path.join(ROOT, rel), os.path.join(out, rel)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=ignore)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(STUDENT_README)
    for number, file, function, title in EXERCISES:
        path = os.path.join(out, file)
        with open(path) as f:
            source = f.read()
        with open(path, "w") as f:
            f.write(blank(source, function, message(number, title)))
    return EXERCISES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="a new or empty folder for the student copy")
    p.add_argument("--list", action="store_true", help="list the exercises: NUMBER FILE FUNCTION")
    a = p.parse_args(argv)
    if a.list:
        for number, file, function, _ in EXERCISES:
            print(number, file, function)
        return 0
    if not a.out:
        sys.exit("error: give OUT, the folder for the student copy (or --list)")
    make(a.out)
    print(f"wrote the student copy to {a.out}: {len(EXERCISES)} exercises")
    return 0


if __name__ == "__main__":
    sys.exit(main())
