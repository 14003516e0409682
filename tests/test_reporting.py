"""Seeing what training does: --report-to tensorboard|wandb, the matplotlib curves, eval.py
--visualize and the end-of-run picture, and reward plug-ins (loaded, weighted, logged; a failure
stops the run with one line)."""

import json
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import rewards  # noqa: E402
import viz  # noqa: E402

SMALL = [
    "--steps",
    "2",
    "--prompts-per-step",
    "2",
    "--num-generations",
    "2",
    "--max-completion-length",
    "8",
    "--save-every",
    "0",
    "--train-size",
    "8",
    "--sample-every",
    "1",
]
PLUGIN = '''
def chars(completion, gt):
    """A reward that is never 0 for the untrained model: its completion's length / 100."""
    return len(completion) / 100
'''


@pytest.fixture
def own_rewards(monkeypatch):
    """Plug-ins loaded in this process register in a copy of rewards.REWARDS, dropped after the
    test."""
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))


def run(*flags, env=None):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo_vlm.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
        timeout=600,
    )
    return res


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """2 steps with --report-to tensorboard, a held-out eval at step 2 and a plug-in weighted
    0.5."""
    d = tmp_path_factory.mktemp("tb")
    (d / "plug.py").write_text(PLUGIN)
    res = run(
        *SMALL,
        "--eval-every",
        "2",
        "--eval-n",
        "2",
        "--report-to",
        "tensorboard",
        "--output-dir",
        str(d / "run"),
        "--reward-weights",
        f"{d / 'plug.py'}:chars=0.5",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return d / "run", res.stdout


def test_tensorboard_events_hold_every_metric_and_the_samples(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tb_run
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    ea = EventAccumulator(str(out))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    keys = {k for r in rows for k in r} - {"step"}
    assert keys <= tags, keys - tags
    assert {"reward", "reward_iou", "reward_chars", "kl", "test_acc50", "ood_acc50"} <= tags
    assert [e.step for e in ea.Scalars("reward")] == [1, 2] and [
        e.step for e in ea.Scalars("test_acc50")
    ] == [0, 2]
    assert ea.Scalars("reward")[1].value == pytest.approx(
        [r for r in rows if "reward" in r][1]["reward"]
    )
    samples = ea.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [1, 2]
    text = samples[0].tensor_proto.string_val[0].decode()
    assert (
        text.startswith("| problem | solution | completion | reward |") and "bounding box" in text
    )


def test_reward_plugin_is_weighted_and_logged(tb_run):
    out, stdout = tb_run
    steps = [json.loads(x) for x in open(out / "metrics.jsonl") if '"reward"' in x]
    for m in steps:
        assert m["reward_chars"] > 0  # computed, logged under its function's name
        assert m["reward"] == pytest.approx(
            m["reward_iou"] + m["reward_format"] + 0.5 * m["reward_chars"], abs=1e-6
        )
    assert (
        " chars=" in stdout.split("step 1/2 ")[1].splitlines()[0]
    )  # on the progress line, like a built-in


def test_end_of_run_picture_and_curves(tb_run):
    out, _ = tb_run
    assert Image.open(out / "held_out.png").size == viz.grid_size(8, 1) == (1120, 2 * 301 + 34)
    assert Image.open(out / "curves.png").size == (1000, 700)


def test_eval_visualize_rec_two_models_side_by_side(tb_run, tmp_path):
    out, _ = tb_run
    res = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--model",
            g.tiny_model("rec"),
            str(out / "final"),
            "--n",
            "3",
            "--visualize",
            "3",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(tmp_path / "e-test.png").size == viz.grid_size(3, 2) == (840, 34 + 318)
    assert viz.model_label(str(out / "final")) == "run/final"


def test_eval_visualize_det(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "eval.py",
            "--task",
            "det",
            "--n",
            "2",
            "--visualize",
            "2",
            "--split",
            "test",
            "ood",
            "--json",
            str(tmp_path / "d.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for split in ("test", "ood"):  # one picture per split
        assert (
            Image.open(tmp_path / f"d-{split}.png").size == viz.grid_size(2, 1) == (560, 34 + 301)
        )
    res = subprocess.run(
        [sys.executable, "eval.py", "--task", "cls", "--visualize", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "--visualize draws boxes" in res.stderr


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "c"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }
    res = run(
        *SMALL,
        "--eval-every",
        "0",
        "--report-to",
        "wandb",
        "--output-dir",
        str(tmp_path / "run"),
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (events,) = run_dir.glob("run-*.wandb")
    stored = events.read_bytes()
    assert all(
        k.encode() in stored
        for k in ("reward_iou", "reward_format", "kl", "logp_gap", "completion_len")
    )
    tables = sorted(run_dir.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 2 and json.load(open(tables[0]))["columns"] == [
        "step",
        "problem",
        "solution",
        "completion",
        "reward",
    ]


def test_only_the_main_process_reports(tmp_path):
    args = types.SimpleNamespace(report_to="tensorboard")
    other = infra.MetricsLog(str(tmp_path), main=False, args=args)
    other.write({"step": 1, "reward": 1.0})
    other.close()
    assert other.report is None and os.listdir(tmp_path) == []


def test_plugin_failure_stops_the_run_with_one_line(tmp_path, own_rewards):
    """The documented policy: an exception (or a non-finite value) inside a plug-in stops the run
    with one line naming the function and the row; it is never scored 0."""
    (tmp_path / "bad.py").write_text(
        "def picky(completion, gt):\n    return {'x': 1}[completion[:1]]\n"
        "def nan(completion, gt):\n    return float('nan')\n"
    )
    res = run(
        *SMALL,
        "--eval-every",
        "0",
        "--output-dir",
        str(tmp_path / "run"),
        "--reward-weights",
        f"{tmp_path / 'bad.py'}:picky=1",
    )
    err = res.stderr.strip().splitlines()[-1]
    assert (
        res.returncode == 1
        and err.startswith("error: reward plug-in ")
        and "bad.py:picky raised KeyError" in err
    )
    assert (
        "on row 'train/" in err
        and "sentence describes: the " in err
        and "completion '<think>" in err
    ), err
    assert not (tmp_path / "run" / "final").exists()
    weights = rewards.parse_weights("rec", f"{tmp_path / 'bad.py'}:nan=1")
    gt = {"image": "a.png", "problem": "find it"}
    with pytest.raises(
        rewards.RewardPluginError, match=r"bad.py:nan returned nan, not a finite number, on row 'a"
    ):
        g.compute_rewards(["<answer>x</answer>"], [gt], weights)


@pytest.mark.parametrize(
    "spec,says",
    [
        ("nope.py:f=1", "no file 'nope.py'"),
        ("{d}/p.py:missing=1", "has no function 'missing'"),
        ("{d}/p.py:one_arg=1", "cannot be called as one_arg(completion, gt)"),
        ("{d}/p.py:iou=1", "a reward is already called 'iou'"),
        ("{d}/p.py:ok=heavy", "expected name=weight"),
        ("{d}/broken.py:f=1", "importing"),
        ("iuo=1", "unknown reward 'iuo'"),
    ],
)
def test_bad_plugins_stop_with_one_line(tmp_path, spec, says, own_rewards):
    (tmp_path / "p.py").write_text(
        "def one_arg(c):\n    return 0.0\ndef iou(c, gt):\n    return 0.0\n"
        "def ok(c, gt):\n    return 0.0\n"
    )
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    args = g.parse_args(["--reward-weights", spec.format(d=tmp_path)])
    with pytest.raises(SystemExit) as e:
        g.reward_weights(args)
    assert (
        str(e.value).startswith("error: --reward-weights: ")
        and says in str(e.value)
        and "\n" not in str(e.value)
    )


def test_the_readme_plugin_example(own_rewards):
    weights = rewards.parse_weights(
        "rec", os.path.join(ROOT, "examples", "centre_reward.py") + ":centre=0.5"
    )
    gt = {"solution": [10, 10, 30, 30], "width": 100, "height": 100, "coord_space": "abs_original"}
    assert weights == {"iou": 1.0, "format": 1.0, "centre": 0.5}
    assert rewards.REWARDS["centre"]("<think>x</think><answer>[10, 10, 30, 30]</answer>", gt) == 1.0
    assert rewards.REWARDS["centre"]("no box", gt) == 0.0
