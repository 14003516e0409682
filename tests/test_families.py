"""Each model family on a tiny random checkpoint of its real HF class, built here
(make_tiny_model.build_family): rollout = HF generate, packed log-probs = a plain forward, GRPO
moves every parameter, eval.py loads the result; and an untested family is refused, and a
rollout/training disagreement stops the run. .ci/run runs this file on transformers 5.17 too.
Qwen2.5-VL, the shipped family, is covered the same way in test_grpo and test_robustness."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import make_tiny_model as mtm  # noqa: E402
import objectives  # noqa: E402
import rewards  # noqa: E402
import vlm  # noqa: E402

import runs  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"]
COORDS = {
    "qwen2_vl": "norm1000",
    "qwen3_vl": "norm1000",
    "qwen3_5": "norm1000",
    "gemma3": "norm1000",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    return request.param, runs.tiny_checkpoint(request.param, out)


def what_makes_it_differ(model):
    """The tiny model exercises its family's difference, or packed = plain would hold trivially."""
    text = model.config.get_text_config()
    if model.config.model_type == "qwen3_vl":
        return len(model.config.vision_config.deepstack_visual_indexes) >= 2
    if model.config.model_type == "qwen3_5":
        return {"linear_attention", "full_attention"} <= set(text.layer_types)
    if model.config.model_type == "gemma3":
        return "sliding_attention" in text.layer_types and text.sliding_window < 40
    return True


def two_prompts(family):
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    rows[1] = dict(
        rows[1], problem=rows[1]["problem"] + " please please please"
    )  # left padding in row 0
    prompt, _ = family.encode(rows)
    assert prompt["attention_mask"][0, 0] == 0
    return prompt


def plain_inputs(family, prompt, copies, completion_ids=None, comp_mask=None):
    """HF's own inputs for one prompt (plus completion) per row: prompt copies[i], its image, then
    completion i."""
    ids, mask = prompt["input_ids"][copies], prompt["attention_mask"][copies]
    if completion_ids is not None:
        ids, mask = torch.cat([ids, completion_ids], 1), torch.cat([mask, comp_mask.long()], 1)
    image_token = family.config.image_token_id
    if isinstance(family, vlm.Gemma3):
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": prompt["pixel_values"][copies],
            "token_type_ids": vlm.mm_types(ids, image_token),
        }
    n = prompt["image_grid_thw"].prod(-1).tolist()
    images = prompt["pixel_values"].split(n)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "image_grid_thw": prompt["image_grid_thw"][copies],
        "pixel_values": torch.cat([images[c] for c in copies.tolist()]),
        "mm_token_type_ids": vlm.mm_types(ids, image_token),
    }


def test_masked_and_distorted_images_go_through_the_adapters_encode(family_dir):
    """Issue 30: PAPO's masked and NoisyRollout's noised image, encoded by the family's own adapter
    (objectives.encode_view): the clean prompt's tokens, other pixels, and the packed forward of a
    completion on it moves its log-probs (0 where masked == clean would not)."""
    name, path = family_dir
    model, family = vlm.load(path)
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    clean, _ = family.encode(rows)
    key = objectives.keyed_generator
    changes = (
        lambda im, r: objectives.papo_mask(im, key(0, str(r["image_path"]))),
        lambda im, r: objectives.diffusion_noise(im, 500, key(1, str(r["image_path"]))),
    )
    o = torch.full((2, 4), family.tokenizer.convert_tokens_to_ids("<"))
    copies, mask = torch.arange(2), torch.ones(2, 4)
    with torch.no_grad():
        base = vlm.completion_logps(model, family, clean, copies, o, mask, 1.0, 64)
        for change in changes:
            other = objectives.encode_view(family, rows, change, "cpu")
            assert torch.equal(other["input_ids"], clean["input_ids"]), name
            assert not torch.equal(other["pixel_values"], clean["pixel_values"]), name
            moved = vlm.completion_logps(model, family, other, copies, o, mask, 1.0, 64)
            assert (moved - base).abs().max() > 0, name


def test_rollout_equals_generate_and_packed_equals_plain(family_dir):
    name, path = family_dir
    model, family = vlm.load(path)
    assert model.config.model_type == name and what_makes_it_differ(model)
    assert family.coord_space == COORDS[name]
    prompt = two_prompts(family)
    G, L = 3, 20
    keys = infra.sample_keys(0, 3, range(2 * G))
    ids, logps, _ = g.sample_group(model, family, prompt, G, g.Decoding(L, 1.0), keys)
    assert len({tuple(r.tolist()) for r in ids}) > 2

    # the same keyed draws, as a logits processor of HF generate (which then takes the argmax)
    class Keyed:
        def __call__(self, input_ids, scores):
            token = g.draw_token(scores, keys, input_ids.shape[1] - prompt["input_ids"].shape[1])
            return torch.full_like(scores, -float("inf")).scatter(1, token[:, None], 0.0)

    copies = torch.arange(2).repeat_interleave(G)
    with torch.no_grad():
        out = model.generate(
            **plain_inputs(family, prompt, copies),
            max_new_tokens=L,
            do_sample=False,
            logits_processor=[Keyed()],
            eos_token_id=family.eos_id,
            pad_token_id=family.pad_id,
            suppress_tokens=family.suppress,
        )
    mask = vlm.completion_mask(ids, family.eos_id)
    hf = out[:, prompt["input_ids"].shape[1] :]
    assert torch.equal(
        ids[:, : hf.shape[1]] * mask[:, : hf.shape[1]].long(), hf * mask[:, : hf.shape[1]].long()
    )

    # packed (several completions after their prompt, or one per row for Qwen3.5) = a plain forward
    # per completion, with completions of different lengths (pad tails) so the layout's slots differ
    mask[:, 5:] = 0
    mask[[0, 4], 5:] = 1
    mask[3, 5:12] = 1
    with torch.no_grad():
        packed = vlm.completion_logps(model, family, prompt, copies, ids, mask, 1.0, 64)
        logits = model(**plain_inputs(family, prompt, copies, ids, mask)).logits[
            :, prompt["input_ids"].shape[1] - 1 : -1
        ]
        plain = logits.float().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    gap = ((packed - plain).abs() * mask).max()
    assert gap < 1e-5, gap
    assert ((logps - plain).abs() * mask).max() < 1e-4  # and the rollout's own log-probs


def test_grpo_moves_every_parameter_and_eval_loads(family_dir, tmp_path, monkeypatch):
    name, path = family_dir
    before = {k: v.clone() for k, v in vlm.load(path)[0].state_dict().items()}
    # a random model earns no task reward; this one differs between completions, so advantages are
    # not 0
    monkeypatch.setitem(rewards.REWARDS, "chars", lambda t, gt: (sum(map(ord, t)) % 97) / 97)
    final = g.train(
        g.parse_args(
            [
                "--model",
                path,
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
                "chars=1,iou=0,format=0",
                "--lr",
                "1e-2",
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--sample-every",
                "0",
            ]
        )
    )
    after = vlm.load(final)[0].state_dict()
    assert not [k for k in before if torch.equal(before[k], after[k])]
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(
        r["logp_gap"] < 1e-5 and r["logp_gap_max"] < 1e-4 for r in rows
    ), rows
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            final,
            "--n",
            "2",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.load(open(tmp_path / "e.json"))["n"] == 2


def test_freeze_vision_freezes_the_family_vision_part(family_dir):
    _, path = family_dir
    model, family = vlm.load(path)
    family.vision(model).requires_grad_(False)
    frozen = {id(p) for p in family.vision(model).parameters()}
    assert frozen and any(p.requires_grad for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters() if id(p) in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "language_model" in n)


def test_prompt_lengths_equal_what_encode_makes(family_dir, tmp_path):
    """--max-prompt-length's upfront count (vlm.prompt_lengths: the text once per problem, the
    image's tokens from its size, no weight loaded) equals the prompt encode() makes, for images of
    several sizes."""
    from PIL import Image

    _, path = family_dir
    family = vlm.adapter(path)
    rows = []
    for i, (w, h) in enumerate([(128, 128), (30, 500), (640, 480), (200, 90)]):
        Image.new("RGB", (w, h), (i * 50, 90, 30)).save(tmp_path / f"{i}.png")
        rows.append(
            data.check_row(
                json.dumps(
                    {
                        "image": f"{i}.png",
                        "problem": "the red circle " * i + "x",
                        "solution": [0, 0, 20, 20],
                    }
                ),
                str(tmp_path),
            )
        )
    assert [n for n, _ in vlm.prompt_lengths(family, rows)] == [
        int(family.encode([r])[0]["attention_mask"].sum()) for r in rows
    ]


def test_an_untested_family_is_refused_with_one_line(tmp_path):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path)
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "grpo_vlm.py"),
            "--model",
            str(tmp_path),
            "--steps",
            "1",
            "--train-size",
            "8",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    err = res.stderr.strip()
    assert res.returncode == 1 and "\n" not in err and "'paligemma' is not supported" in err, err
    assert all(t in err for t in vlm.ADAPTERS) and not os.path.exists(
        tmp_path / "run" / "metrics.jsonl"
    )


def test_logp_gap_guard(tmp_path, monkeypatch):
    """The alarm: Qwen3-VL trained through Qwen2-VL's training forward (DeepStack dropped, the bug
    it had) stops at the first step naming the model type; a leak into a single token trips the
    maximum though not the mean."""
    path = mtm.build_family("qwen3_vl", str(tmp_path / "q3"))
    monkeypatch.setattr(vlm.Qwen3VL, "hidden", vlm.Qwen2VL.hidden)
    flags = [
        "--model",
        path,
        "--steps",
        "3",
        "--prompts-per-step",
        "2",
        "--num-generations",
        "2",
        "--max-completion-length",
        "8",
        "--train-size",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ]
    with pytest.raises(SystemExit, match="disagree on pi_old for model type 'qwen3_vl'"):
        g.train(g.parse_args(flags + ["--output-dir", str(tmp_path / "a")]))
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["logp_gap"] > 1e-3  # logged, then stopped
    g.train(
        g.parse_args(flags + ["--output-dir", str(tmp_path / "b"), "--max-logp-gap", "-1"])
    )  # the override
    with pytest.raises(SystemExit, match="at worst"):
        infra.check_logp_gap({"logp_gap": 5e-5, "logp_gap_max": 0.01}, 1e-4, "x")
    infra.check_logp_gap({"logp_gap": 5e-5, "logp_gap_max": 1e-3}, 1e-4, "x")
