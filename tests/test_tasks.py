"""The cls, count and det tasks end to end, and Vision-R1's cold start, staged length and rule
refinement."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluation  # noqa: E402
import grpo_vlm as g  # noqa: E402
import make_tiny_model as mtm  # noqa: E402
import recipes  # noqa: E402
import rewards  # noqa: E402
import vlm  # noqa: E402

TASKS = ("cls", "count", "det")


@pytest.mark.parametrize("task", ("rec",) + TASKS)
def test_sft_target_is_a_perfect_answer_under_the_task_rewards(task):
    """Every synthetic row's SFT target scores the maximum of each of the task's rewards, and
    tokenizes with no unknown word in the task's tokenizer."""
    rows = data.load_rows(g.parse_args(["--task", task, "--train-size", "24"]))[0]
    gts = data.ground_truths(rows, [(112, 112, 128, 128)] * len(rows), "abs_resized")
    tok = mtm.build_tokenizer(task)
    for row, gt in zip(rows, gts):
        text = data.sft_target(task, row, gt)
        for name in rewards.TASK_REWARDS[task]:
            want = {"iou": 0.9, "det_iou": 0.9, "det_conf": data.CONFIDENCE}.get(
                name, 1.0
            )  # integer pixels
            assert rewards.REWARDS[name](text, gt) >= want, (task, name, text)
        prompt = row["problem"] + data.THINK_SUFFIX
        assert tok.unk_token_id not in tok(prompt + text)["input_ids"], (prompt, text)


def test_worlds_are_what_their_docstrings_say():
    cls = data.load_rows(g.parse_args(["--task", "cls", "--train-size", "24"]))[0]
    labels = [r["solution"] for r in cls]
    assert (
        labels[:12] == labels[12:] and len(set(labels)) == 12
    )  # round-robin: 24 rows = 2-shot over 12 classes
    assert not {tuple(x.split()) for x in labels} & data.OOD_PAIRS
    count = data.load_rows(g.parse_args(["--task", "count", "--train-size", "64"]))[0]
    assert {r["solution"] for r in count} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(len(r["objects"]) == r["solution"] for r in count)
    det = data.load_rows(g.parse_args(["--task", "det", "--train-size", "64"]))[0]
    for r in (
        det
    ):  # solution: the boxes of the asked shape, in the real format's rows, canonical after loading
        shape = r["problem"].split()[2]
        assert (
            r["solution"] == [o["box"] for o in r["objects"] if o["label"].endswith(shape)]
            and r["solution"]
        )
        assert r["labels"] == [shape] * len(r["solution"])


def test_class_balanced_subset_is_k_shot(tmp_path):
    rows = [
        {"solution": s, "i": i} for i, s in enumerate(["cat", "cat", "Dog", "cat", "dog.", "bird"])
    ]
    got = data.class_balanced(rows, 5)
    assert [r["i"] for r in got] == [
        0,
        2,
        5,
        1,
        4,
    ]  # one of each label (normalized: Dog = dog.), then the next


def test_real_format_rows_of_every_task_load(tmp_path):
    """det: a list of {bbox_2d, label} (or bare boxes); cls: a label; count: a number or numeric
    string."""
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    good = {
        "det": [{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, [5, 5, 9, 9]],
        "cls": "tabby cat",
        "count": "3",
    }
    for task, sol in good.items():
        (tmp_path / f"{task}.jsonl").write_text(
            json.dumps({"image": "a.png", "problem": "q", "solution": sol}) + "\n"
        )
        rows, _ = data.load_jsonl(str(tmp_path / f"{task}.jsonl"), str(tmp_path), task)
        assert (
            rows[0]["solution"]
            == {"det": [[1, 2, 30, 40], [5, 5, 9, 9]], "cls": "tabby cat", "count": 3.0}[task]
        )
    bad = {
        "det": ([{"bbox_2d": [1, 2, 99, 40]}], "lies outside the 64x48 image"),
        "cls": ("", "must be a non-empty label"),
        "count": ("three", "must be a number"),
    }
    for task, (sol, why) in bad.items():
        (tmp_path / "bad.jsonl").write_text(
            json.dumps({"image": "a.png", "problem": "q", "solution": sol}) + "\n"
        )
        with pytest.raises(data.BadInput, match=why):
            data.load_jsonl(str(tmp_path / "bad.jsonl"), str(tmp_path), task)


def test_stage_schedules():
    assert [recipes.stage_value("0:16,3:32,6:48", s, 99) for s in (1, 2, 3, 5, 6, 100)] == [
        16,
        16,
        32,
        32,
        48,
        48,
    ]
    assert recipes.stage_value("", 7, 48) == 48 and recipes.stage_value("5:0.5,0:0", 4, 0.0) == 0.0
    with pytest.raises(SystemExit):
        g.parse_args(["--length-schedule", "0-16"])


def run(tmp_path, *flags):
    args = g.parse_args(
        [
            "--output-dir",
            str(tmp_path),
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--train-size",
            "8",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            *flags,
        ]
    )
    g.train(args)
    return [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]


def test_length_schedule_caps_completions_by_stage(tmp_path):
    """Vision-R1's PTST: with EOS blocked for 64 tokens every completion runs to the stage's cap, so
    the logged lengths are the schedule itself."""
    rows = run(
        tmp_path,
        "--steps",
        "4",
        "--length-schedule",
        "0:6,3:12",
        "--min-completion-length",
        "64",
        "--max-completion-length",
        "64",
    )
    assert [r["completion_len"] for r in rows] == [6, 6, 12, 12]
    assert [r["max_len"] for r in rows] == [6, 6, 12, 12]


def test_iou_threshold_schedule_makes_the_reward_stricter(tmp_path):
    """Progressive rule refinement on the shipped REC base: IoU counts from step 1, then only at or
    above 1.01, which no box reaches, so the IoU reward falls to exactly 0 at step 3."""
    rows = run(
        tmp_path,
        "--steps",
        "3",
        "--iou-threshold-schedule",
        "0:0,3:1.01",
        "--prompts-per-step",
        "4",
    )
    assert [r["iou_threshold"] for r in rows] == [0.0, 0.0, 1.01]
    assert (
        rows[0]["reward_iou"] > 0.1 and rows[1]["reward_iou"] > 0.1 and rows[2]["reward_iou"] == 0.0
    )
    assert rows[2]["reward_format"] > 0.5  # the other rewards are untouched


def test_cold_start_trains_then_grpo_starts_from_it(tmp_path):
    """--sft-steps: the supervised loss falls during the cold start, the cold-started model is
    saved, and it is the KL reference: at GRPO's first step the policy equals the reference, so the
    KL is 0."""
    tok = mtm.build_tokenizer("cls")
    base = str(tmp_path / "random")
    mtm.save(mtm.build_model(tok), tok, mtm.build_image_processor(), base)
    rows = run(
        tmp_path / "run",
        "--task",
        "cls",
        "--model",
        base,
        "--sft-steps",
        "25",
        "--sft-lr",
        "3e-3",
        "--steps",
        "1",
        "--max-completion-length",
        "8",
    )
    sft = [r["sft_loss"] for r in rows if "sft_loss" in r]
    assert len(sft) == 25 and sft[-1] < 0.5 * sft[0], sft
    grpo = [r for r in rows if "reward" in r]
    assert len(grpo) == 1 and grpo[0]["kl"] == 0.0
    cold = vlm.load(str(tmp_path / "run" / "cold-start"))[0].state_dict()
    random = vlm.load(base)[0].state_dict()
    assert any(not torch.equal(cold[k], random[k]) for k in cold)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_trains_and_evaluates_from_its_shipped_base(task, tmp_path):
    rows = run(tmp_path, "--task", task, "--steps", "2", "--max-completion-length", "24")
    assert len(rows) == 2 and all(
        set(rewards.TASK_REWARDS[task]) <= {k[7:] for k in r if k.startswith("reward_")}
        for r in rows
    )
    assert ("pred_per_gt" in rows[0]) == (task == "det")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--task",
            task,
            "--model",
            str(tmp_path / "final"),
            g.tiny_model(task),
            "--n",
            "8",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    summaries = json.load(open(tmp_path / "e.json"))
    main = {"cls": "accuracy", "count": "accuracy", "det": "map"}[task]
    assert len(summaries) == 2 and all(0 <= s[main] <= 1 for s in summaries)
    assert f"| {g.tiny_model(task)} | test |" in out.stdout


def test_det_eval_scores_forced_answers():
    """evaluation.evaluate on det with forced greedy outputs: all boxes right, then every box
    doubled (#pred/#gt 2)."""
    model, family = vlm.load(g.tiny_model("det"))
    tok = family.tokenizer
    rows = data.synthetic_split("test", 4, "det")

    def answer(row, copies):
        boxes = [[round(v * 112 / 128) for v in b] for b in row["solution"] for _ in range(copies)]
        return (
            "<think> x </think> <answer> "
            + json.dumps([{"box": b, "confidence": 0.9} for b in boxes])
            + " </answer>"
        )

    got = {}
    for copies in (1, 2):
        target = [
            tok(answer(r, copies), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in rows
        ]

        def forced(model, family, prompt, max_new):
            return torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(t) for t in target], True, tok.pad_token_id
            )

        got[copies] = evaluation.evaluate(forced, model, family, rows, "abs_resized", "det")[0]
    assert got[1]["parsed_rate"] == got[2]["parsed_rate"] == 1.0
    assert got[1]["pred_per_gt"] == 1.0 and got[2]["pred_per_gt"] == 2.0
    assert (
        got[1]["ap50"] == 1.0 and got[1]["map"] > 0.6
    )  # integer pixels of the 112-px input: IoU < 1 at 0.95
    # at equal confidence each duplicate ranks right after its original: a false positive between
    # true ones
    assert got[2]["ap50"] < 0.8 and got[2]["map"] < got[1]["map"]
