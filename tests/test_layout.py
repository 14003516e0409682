"""Guards of the layout: the golden 10-step run, the line budget, imports that flow one way, and the
flags."""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vlm as g  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden", "rec-10-steps.jsonl")
GOLDEN_CMD = [
    "--task",
    "rec",
    "--steps",
    "10",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--sample-every",
    "0",
]


def test_golden_ten_steps(tmp_path):
    """OMP_NUM_THREADS=1 python grpo_vlm.py --task rec --steps 10 --eval-every 0 --save-every 0
    --sample-every 0 writes the committed metrics: every key of every row but `seconds`, to 1e-6
    (rows may gain new keys). A change that moves a number must say which and why, and commit a new
    golden file."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "grpo_vlm.py"),
            *GOLDEN_CMD,
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    want = [json.loads(x) for x in open(GOLDEN)]
    got = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(got) == len(want) == 10
    for w, r in zip(want, got):
        assert set(w) <= set(r), set(w) - set(r)
        for k in w:
            if k != "seconds":
                assert abs(w[k] - r[k]) <= 1e-6, (w["step"], k, w[k], r[k])


def algorithm_file():
    src = open(os.path.join(ROOT, "grpo_vlm.py")).read()
    return src, ast.parse(src)


def functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameters(f):
    """A function's parameters: positional-only, positional, keyword-only, *args and **kwargs,
    without self."""
    a = f.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x]
    return [n for n in names if n != "self"]


def test_line_budget():
    """grpo_vlm.py is the algorithm: at most 700 lines, none over 100 columns, and train() at most
    80 lines."""
    src, tree = algorithm_file()
    lines = src.splitlines()
    assert len(lines) <= 700
    assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == []
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 80


def test_statements_parameters_and_processes():
    """In grpo_vlm.py: no simple statement (any statement but a def, class, if, for, while, with or
    try; docstrings not counted) over 50 AST nodes; no function with more than 6 parameters; and no
    function that names `rank` or `world` (an ast.Name or ast.arg inside it)."""
    _, tree = algorithm_file()
    compound = (ast.FunctionDef, ast.ClassDef, ast.If, ast.For, ast.While, ast.With, ast.Try)
    docstring = lambda n: isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)  # noqa: E731
    simple = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and not isinstance(n, compound)]
    sizes = {n.lineno: len(list(ast.walk(n))) for n in simple if not docstring(n)}
    assert {line: k for line, k in sizes.items() if k > 50} == {}
    fs = functions(tree)
    assert {f.name: len(parameters(f)) for f in fs if len(parameters(f)) > 6} == {}
    named = {
        f.name
        for f in fs
        for n in ast.walk(f)
        if (isinstance(n, ast.Name) and n.id in ("rank", "world"))
        or (isinstance(n, ast.arg) and n.arg in ("rank", "world"))
    }
    assert named == set()


def project_imports(name):
    """The project's modules that `name`.py imports, anywhere in it (functions included)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    local = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & local


def test_imports_flow_one_way():
    """rewards/data (-> detection -> registry, viz) -> vlm -> plan -> infra -> tools, recipes,
    objectives, evaluation, coldstart -> grpo_vlm -> eval, sft: no module imports one that imports
    it back, and grpo_vlm.py (run as __main__) never loads a second copy of itself."""
    order = [
        "rewards",
        "data",
        "detection",
        "registry",
        "viz",
        "vlm",
        "plan",
        "infra",
        "tools",
        "recipes",
        "objectives",
        "evaluation",
        "coldstart",
        "grpo_vlm",
        "eval",
        "sft",
        "make_tiny_model",
    ]
    for i, name in enumerate(order):
        assert project_imports(name) <= set(order[:i]), (name, project_imports(name))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; sys.argv = ['grpo_vlm.py', '--help']\n"
            "try:\n    runpy.run_path('grpo_vlm.py', run_name='__main__')\nexcept SystemExit:\n    "
            "pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m in ('grpo_vlm', 'eval', 'sft')))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


def one_line_error(*flags):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo_vlm.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return res.returncode, res.stderr.strip()


@pytest.mark.parametrize(
    "flags,says",
    [
        (["--gradient-checkpointing", "flase"], "expected true or false, not 'flase'"),
        (["--task", "segment"], "invalid choice: 'segment'"),
        (["--steps", "ten"], "invalid int value: 'ten'"),
        (["--stepz", "3"], "unrecognized arguments: --stepz"),
        (["--preset", "nope"], "--preset"),
        (["--loss-agg", "sum"], "invalid choice: 'sum'"),
    ],
)
def test_bad_flags_stop_with_one_line(flags, says):
    code, err = one_line_error(*flags)
    assert code == 1 and err.startswith("error: ") and says in err and "\n" not in err, err


def test_flag_forms_and_precedence():
    """--key=value; bare booleans; a bare boolean before another flag; task defaults < preset <
    explicit flags."""
    a = g.parse_args(["--task=det", "--skip-bad-rows", "--steps", "10"])
    assert (a.task, a.skip_bad_rows, a.steps, a.max_completion_length) == ("det", True, 10, 128)
    assert (
        g.parse_args(["--task=det"]).steps == 300
    )  # det's task default, found with the = form too
    assert g.parse_args(["--freeze-vision", "false"]).freeze_vision is False
    assert (
        g.parse_args(
            ["--freeze-vision=yes", "--gradient-checkpointing", "0"]
        ).gradient_checkpointing
        is False
    )
    task = g.parse_args(["--task", "det"])
    preset = g.parse_args(["--task", "det", "--preset", "vlm-r1"])
    explicit = g.parse_args(
        ["--task", "det", "--preset", "vlm-r1", "--max-completion-length", "64"]
    )
    assert (
        task.max_completion_length,
        preset.max_completion_length,
        explicit.max_completion_length,
    ) == (128, 256, 64)
    assert preset.steps == 300  # a task default the preset does not set stays
    assert (
        g.parse_args(["--preset", "visual-rft", "--task", "cls"]).lr == 1e-6
    )  # the preset wins over cls's lr 5e-5
