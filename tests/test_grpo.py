import dataclasses
import json
import os
import random
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
import rewards  # noqa: E402
import vlm  # noqa: E402

NO_KL = g.Args(beta=0.0)  # the objective's hyperparameters: eps 0.2 / 0.2, no KL


def test_advantages_zero_mean_and_equal_rewards_zero():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.3, 0.3, 0.3])
    A = g.group_advantages(r, 4)
    assert torch.allclose(A.view(2, 4)[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.equal(A.view(2, 4)[1], torch.zeros(4))
    assert not torch.isnan(A).any()
    for scale in ("batch", "none"):
        assert torch.allclose(
            g.group_advantages(r, 4, scale).view(2, 4).mean(1), torch.zeros(2), atol=1e-6
        )


def test_ratio_one_and_reinforce_gradient():
    logits = torch.randn(3, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (3, 5))
    logps = logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    A = torch.tensor([1.0, -0.5, 0.2])
    mask = torch.ones(3, 5)
    w = g.token_weights(mask, "grpo")
    loss, st = g.grpo_loss(logps, logps.detach(), None, A, w, NO_KL)
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    reinforce = -(logps * A[:, None] * w).sum()
    grad_ref = torch.autograd.grad(reinforce, logits)[0]
    assert torch.allclose(grad, grad_ref, atol=1e-7)
    assert st["clip_sum"] == 0


def test_clipping_zeroes_gradient_outside_band():
    logps = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.log(
        torch.tensor([[1 / 1.5, 1 / 1.1, 1 / 0.5, 1 / 0.9]])
    )  # ratios 1.5, 1.1, 0.5, 0.9
    w = torch.ones(1, 4)
    for A, outside in ((1.0, [0]), (-1.0, [2])):
        loss, _ = g.grpo_loss(logps, old, None, torch.tensor([A]), w, NO_KL)
        grad = torch.autograd.grad(loss, logps)[0][0]
        ratio = torch.exp(logps - old)[0].detach()
        for t in range(4):
            expect = 0.0 if t in outside else -A * ratio[t]
            assert abs(grad[t].item() - expect) < 1e-6


def test_k3_kl_nonnegative_zero_at_reference():
    logps = torch.randn(4, 6, requires_grad=True)
    ref = torch.randn(4, 6)
    w = torch.ones(4, 6)
    zeroA = torch.zeros(4)
    _, st = g.grpo_loss(logps, logps.detach(), ref, zeroA, w, g.Args(beta=1.0))
    assert st["kl_sum"] >= 0
    at_ref = ref.clone().requires_grad_(True)
    loss, st = g.grpo_loss(at_ref, at_ref.detach(), ref, zeroA, w, g.Args(beta=1.0))
    assert abs(st["kl_sum"]) < 1e-7
    assert torch.allclose(torch.autograd.grad(loss, at_ref)[0], torch.zeros(4, 6))


def test_chunked_logps_match_plain_and_use_temperature():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h, y = torch.randn(3, 5, 8), torch.randint(0, 50, (3, 5))
    for T in (1.0, 0.7):
        plain = (head(h) / T).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        assert torch.allclose(vlm.chunked_logps(h, head, y, T, 4), plain, atol=1e-5)
    assert not torch.allclose(
        vlm.chunked_logps(h, head, y, 0.7, 4), vlm.chunked_logps(h, head, y, 1.0, 4)
    )


def test_mask_from_lengths_with_pad_equal_eos():
    eos = 9
    ids = torch.tensor([[1, 2, 9, 9, 9], [1, 9, 3, 9, 9], [1, 2, 3, 4, 5]])
    m = vlm.completion_mask(ids, eos)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_aggregations_are_exact_under_accumulation():
    torch.manual_seed(0)
    x = torch.randn(8, 6, requires_grad=True)
    mask = (torch.rand(8, 6) > 0.3).float()
    mask[:, 0] = 1
    A = torch.randn(8)
    for mode in ("grpo", "token", "drgrpo"):
        w = g.token_weights(mask, mode)
        full = torch.autograd.grad(g.grpo_loss(x * 1, x.detach(), None, A, w, NO_KL)[0], x)[0]
        acc = torch.zeros_like(x)
        for s in (slice(0, 2), slice(2, 4), slice(4, 8)):
            acc += torch.autograd.grad(
                g.grpo_loss(x[s], x[s].detach(), None, A[s], w[s], NO_KL)[0], x
            )[0]
        assert torch.allclose(full, acc, atol=1e-7), mode


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "<answer></answer>",
        "<answer>[1e999, 2, 3]</answer>",
        "[[[",
        "<answer>[" + "9" * 400 + ", 0, 1, 1]</answer>",
        None,
        42,
        "<think>x</think><answer>[5, 5, 1, 1]",
        "<answer>[5, 5, 1, 1]</answer>",
    ],
)
def test_rewards_total_on_garbage(garbage):
    gt = {
        "solution": [0, 0, 10, 10],
        "width": 100,
        "height": 100,
        "input_width": 56,
        "input_height": 56,
        "coord_space": "abs_resized",
    }
    for name, f in rewards.REWARDS.items():
        v = f(garbage, gt if name != "accuracy" else {"solution": "cat"})
        assert v == 0.0


def test_iou_rescales_resized_and_norm1000():
    gt = {
        "solution": [20, 40, 60, 80],
        "width": 200,
        "height": 200,
        "input_width": 100,
        "input_height": 100,
    }
    text = "<think>x</think><answer>[10, 20, 30, 40]</answer>"
    assert rewards.iou_reward(text, {**gt, "coord_space": "abs_resized"}) == pytest.approx(1.0)
    assert rewards.iou_reward(
        "<answer>[100, 200, 300, 400]</answer>", {**gt, "coord_space": "norm1000"}
    ) == pytest.approx(1.0)
    assert rewards.format_reward(text) == 1.0 and rewards.format_reward(text + " extra") == 0.0
    assert rewards.accuracy_reward("<answer></answer>", {"solution": "cat"}) == 0.0
    # hit: the box centre, rescaled, inside the true box; a box on a distractor or an inverted box
    # scores 0
    assert (
        rewards.hit_reward(
            "<answer>[15, 25, 25, 35]</answer>", {**gt, "coord_space": "abs_resized"}
        )
        == 1.0
    )
    assert (
        rewards.hit_reward(
            "<answer>[50, 50, 90, 90]</answer>", {**gt, "coord_space": "abs_resized"}
        )
        == 0.0
    )
    assert (
        rewards.hit_reward(
            "<answer>[25, 35, 15, 25]</answer>", {**gt, "coord_space": "abs_resized"}
        )
        == 0.0
    )


@pytest.fixture(scope="module", params=["shipped", "qwen2_5_vl", "qwen2_vl"])
def tiny(request, tmp_path_factory):
    if request.param == "shipped":  # the committed, warm-started default model
        return g.TINY_MODEL
    out = str(tmp_path_factory.mktemp(request.param))
    tok = mtm.build_tokenizer()
    mtm.save(mtm.build_model(tok, request.param), tok, mtm.build_image_processor(), out)
    return out


def test_left_padding_and_shared_image_features(tiny):
    model, family = vlm.load(tiny)
    tok = family.tokenizer
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    rows[1] = dict(
        rows[1], problem=rows[1]["problem"] + " please please please"
    )  # forces left padding of row 0
    prompt, _ = family.encode(rows)
    single, _ = family.encode(rows[:1])
    comp = torch.tensor(
        [tok.convert_tokens_to_ids(["<think>", "red", "</think>"]) + [tok.eos_token_id]]
    )
    mask = vlm.completion_mask(comp, tok.eos_token_id)
    with torch.no_grad():
        lp_pad = vlm.completion_logps(
            model, family, family.select(prompt, 0, 1), torch.tensor([0]), comp, mask, 1.0, 7
        )
        lp_one = vlm.completion_logps(model, family, single, torch.tensor([0]), comp, mask, 1.0, 7)
        # rows that share a prompt share its image features: the same log-probs as separate
        # encodings
        comps = torch.cat([comp, comp, comp])
        shared = vlm.completion_logps(
            model, family, prompt, torch.tensor([0, 0, 1]), comps, mask.repeat(3, 1), 1.0, 7
        )
        lp_row1 = vlm.completion_logps(
            model, family, family.select(prompt, 1, 2), torch.tensor([0]), comp, mask, 1.0, 7
        )
    assert prompt["attention_mask"][0, 0] == 0
    assert torch.allclose(lp_pad, lp_one, atol=1e-5)
    assert torch.allclose(shared[0], lp_pad[0], atol=1e-5) and torch.allclose(
        shared[1], lp_pad[0], atol=1e-5
    )
    assert torch.allclose(shared[2], lp_row1[0], atol=1e-5) and not torch.allclose(
        shared[2], shared[0], atol=1e-3
    )


def test_end_to_end_changes_every_parameter_and_eval_loads(tiny, tmp_path):
    before = {k: v.clone() for k, v in vlm.load(tiny)[0].state_dict().items()}
    args = g.parse_args(
        [
            "--model",
            tiny,
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path),
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--max-completion-length",
            "8",
            "--train-size",
            "8",
            "--reward-weights",
            "format=0,iou=0",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
        ]
    )
    # rewards of an untrained model are all 0; use a length-based reward so advantages are non-zero
    rewards.REWARDS["len"] = lambda t, gt: float(len(t))
    try:
        args.reward_weights = "len=1"
        final = g.train(args)
    finally:
        del rewards.REWARDS["len"]
    after = vlm.load(final)[0].state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    lines = open(os.path.join(tmp_path, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and {"reward", "kl", "clip_frac", "completion_len", "seconds"} <= set(
        json.loads(lines[0])
    )
    assert (
        json.loads(lines[0])["logp_gap"] < 1e-4
    )  # the sampler and the training forward agree on pi_old
    assert os.path.getsize(tmp_path / "curves.png") > 1000
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            final,
            "--n",
            "4",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    summary = json.load(open(tmp_path / "e.json"))
    assert {"acc50", "miou", "format_rate", "center_error", "area_ratio", "right_object"} <= set(
        summary
    )


def test_periodic_eval_and_plot(tmp_path):
    """--eval-every writes held-out test/ood rows into metrics.jsonl, and the plot draws them."""
    args = g.parse_args(
        [
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path),
            "--prompts-per-step",
            "2",
            "--num-generations",
            "2",
            "--max-completion-length",
            "4",
            "--train-size",
            "8",
            "--eval-every",
            "1",
            "--eval-n",
            "4",
        ]
    )
    g.train(args)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "test_acc50" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(0 <= r["ood_acc50"] <= 1 and 0 <= r["test_miou"] <= 1 for r in evals)
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size == (1000, 700)


def test_eval_scores_known_boxes_and_right_object(tmp_path):
    """grpo_vlm.evaluate's metrics on a model whose greedy output we force: one exact box, one on a
    distractor."""
    model, family = vlm.load(g.TINY_MODEL)
    tok = family.tokenizer
    rows = data.synthetic_split("ood", 2)
    answers = [
        rows[0]["objects"][0]["box"],
        rows[1]["objects"][1]["box"],
    ]  # right object, then wrong object
    texts = [
        f"<think> x </think> <answer> [{', '.join(str(round(v * 112 / 128)) for v in b)}] </answer>"
        for b in answers
    ]
    target = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]

    def forced(model, family, prompt, max_new):
        return torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(t) for t in target], True, tok.pad_token_id
        )

    summary, preds = evaluation.evaluate(forced, model, family, rows, "abs_resized")
    assert preds[0]["iou"] > 0.8 and preds[1]["iou"] < 0.5
    assert [p["chosen_object"] for p in preds] == [0, 1]
    assert (
        summary["acc50"] == 0.5 and summary["right_object"] == 0.5 and summary["format_rate"] == 1.0
    )


def test_sft_target_is_a_perfect_answer_and_lists_objects():
    """The SFT target scores format 1 and IoU ~1 under the GRPO rewards, and lists every object left
    to right."""
    rows = data.load_rows(g.Args(train_size=8))[0]
    gts = data.ground_truths(rows, [(112, 112, 128, 128)] * len(rows), "abs_resized")
    for row, gt in zip(rows, gts):
        text = data.sft_target("rec", row, gt)
        assert rewards.format_reward(text) == 1.0
        assert rewards.iou_reward(text, gt) > 0.9  # rounding to integer resized pixels only
        think = text.split("</think>")[0]
        labels = [
            o["label"] for o in sorted(row["objects"], key=lambda o: o["box"][0] + o["box"][2])
        ]
        assert [think.index(lab) for lab in labels] == sorted(think.index(lab) for lab in labels)
        assert think.rstrip().endswith(
            f"{row['caption']} is at the {data.box_words(row['solution'], 128, 128)}"
        )


def test_sft_baseline_sees_the_grpo_batches_and_trains(tmp_path, monkeypatch):
    """sft.py with GRPO's --seed/--prompts-per-step draws the same images per step, and updates the
    model."""
    import sft

    seen = []
    orig = vlm.Qwen2VL.encode
    monkeypatch.setattr(
        vlm.Qwen2VL,
        "encode",
        lambda self, rows, *a, **k: (
            seen.append([r["image"] for r in rows]),
            orig(self, rows, *a, **k),
        )[1],
    )
    sft.main(
        [
            "--steps",
            "2",
            "--prompts-per-step",
            "3",
            "--train-size",
            "16",
            "--output-dir",
            str(tmp_path / "sft"),
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
        ]
    )
    rng, rows = random.Random(0), data.load_rows(g.Args(train_size=16))[0]
    assert seen == [[r["image"] for r in rng.sample(rows, 3)] for _ in range(2)]
    before, after = (
        vlm.load(g.TINY_MODEL)[0].state_dict(),
        vlm.load(str(tmp_path / "sft"))[0].state_dict(),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_number_tokens_start_with_smooth_value_codes():
    """In the value-code dimensions, 40 is nearer to 41 than to 90 (tied rows: the output head
    agrees)."""
    tok = mtm.build_tokenizer()
    model = mtm.build_model(tok)
    E = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == E.data_ptr()
    row = lambda n: E[tok.convert_tokens_to_ids(str(n)), :32]  # noqa: E731
    assert (row(40) - row(41)).norm() < 0.5 * (row(40) - row(90)).norm()
    random_rows = mtm.build_model(tok, number_codes=False).get_input_embeddings().weight
    assert not torch.equal(random_rows[tok.convert_tokens_to_ids("40"), :32], row(40))


def test_preset_sets_recipe_and_flags_override():
    a = g.parse_args(["--preset", "vlm-r1", "--lr", "2e-6"])
    assert (a.lr, a.beta, a.num_generations, a.prompts_per_step) == (2e-6, 0.04, 8, 16)
    assert g.parse_args([]).lr == 2e-4


def test_help_lists_every_flag_with_its_docstring():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo_vlm.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(g.Args):
        assert f"--{f.name.replace('_', '-')} " in out.stdout
    assert "T: sampling temperature" in out.stdout
