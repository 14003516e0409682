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


def test_line_budget():
    """grpo_vlm.py is the algorithm: at most 600 lines, and train() at most 80."""
    src = open(os.path.join(ROOT, "grpo_vlm.py")).read()
    assert len(src.splitlines()) <= 600
    train = next(
        n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "train"
    )
    assert train.end_lineno - train.lineno + 1 <= 80


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
    """rewards/data (-> registry, viz) -> vlm -> plan -> infra -> grpo_vlm -> eval, sft: no module
    imports one that imports it back, and grpo_vlm.py (run as __main__) never loads a second copy of
    itself."""
    order = [
        "rewards",
        "data",
        "registry",
        "viz",
        "vlm",
        "plan",
        "infra",
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
        g.parse_args(["--preset", "vlm-r1", "--task", "cls"]).lr == 1e-6
    )  # the preset wins over cls's lr 5e-5
