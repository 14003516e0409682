"""Each paper's recipe (issue 26): the presets, their rewards as the official code computes them,
the refusals, GSPO's clip ranges, Dr. GRPO's normaliser and `python rewards.py`. Each official
value below is worked out by hand from the official source named in the test's docstring
(snapshots read with `fetch`: om-ai-lab/VLM-R1, Liuziyu77/Visual-RFT, Deep-Agent/R1-V,
jefferyZhan/Griffon, Osilly/Vision-R1)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import objectives  # noqa: E402
import recipes  # noqa: E402
import rewards as R  # noqa: E402

TRUTH = [10, 10, 50, 50]
GT = {"width": 640, "height": 480, "input_width": 640, "input_height": 480}
GT.update(coord_space="abs_original", iou_threshold=0.0, image="x", problem="p")
IOU = 37 * 37 / (2 * 40 * 40 - 37 * 37)  # [7, 7, 47, 47] against [10, 10, 50, 50]: 0.7477
GIOU = IOU - (43 * 43 - (2 * 40 * 40 - 37 * 37)) / (43 * 43)  # the hull is 43 x 43: 0.7379


def score(argv):
    """python rewards.py ARGV, in process: ({name: (weight, value)}, total)."""
    values, total, _ = R.score_answer(argv)
    return {k: v for k, (_, v) in values.items()}, total


def zhan(task, truth, answer, *more):
    return score(
        ["--task", task, "--preset", "vision-r1-zhan", "--truth", truth, "--answer", answer]
    )


# ---------------------------------------------------------------------------------------------
# Vision-R1 (Zhan et al.)
def test_vision_r1_zhan_eq7_alone_gives_the_official_value_and_the_old_command_added_more():
    """Eq. 7 alone under the preset: format 1 + recall 1 + precision f(GIoU). Griffon Vision-R1/
    vision_r1/visionr1_qwen.py: dual format 1 for a JSON list (198-230); BoxPriorMatcher returns the
    pairs' GIoU (173, 185-187); recall counts a pair above 0.5 (252, 305), 1/1 -> 1 (307); precision
    maps GIoU 0.738 by (0.5, 0.75) to itself (331, 396-397). The official code reads GIoU where the
    paper's Eq. 6 says IoU: 2.738, not the IoU-based 2.748 of the issue (which `only:` with our
    parsers gives). The old documented command (--reward-weights vr1_*=1, task defaults kept) gave
    4.495 on REC."""
    answer = '[{"bbox_2d": [7, 7, 47, 47], "label": "dog"}]'
    for task, truth in (
        ("det", '[{"bbox_2d": [10, 10, 50, 50], "label": "dog"}]'),
        ("rec", "[10, 10, 50, 50]"),
    ):
        comps, total = zhan(task, truth, answer)
        assert comps == pytest.approx({"vr1_format": 1, "vr1_recall": 1, "vr1_precision": GIOU})
        assert total == pytest.approx(2 + GIOU) and round(total, 3) == 2.738
    ours = "<think>x</think><answer>[7, 7, 47, 47]</answer>"
    exact = ["--task", "rec", "--truth", "[10, 10, 50, 50]", "--answer", ours]
    eq7 = "vr1_format=1,vr1_recall=1,vr1_precision=1"
    assert score(exact + ["--reward-weights", "only:" + eq7])[1] == pytest.approx(2 + IOU)
    assert round(score(exact + ["--reward-weights", eq7])[1], 3) == 4.495  # + iou + format


def test_vision_r1_zhan_drops_a_malformed_box_and_scores_the_rest():
    """2 exact boxes and 1 inverted, 4 true boxes. visionr1_qwen.py:85-86 drops the inverted box
    (extract), 205-213 still gives format 1 (a 4-element list), 305-307: tp 2 / 4 = 0.5, kept by
    modify_list(0.5, 0.75) (191-195: only below 0.5 is 0); 396-397: the mean over the 2 pairs of
    GIoU 1 -> 1.0. Our strict default parser gives 0 / 0 / 0."""
    truth = json.dumps(
        [[10, 10, 50, 50], [60, 60, 100, 100], [110, 110, 150, 150], [200, 200, 250, 250]]
    )
    boxes = [[10, 10, 50, 50], [60, 60, 100, 100], [150, 150, 110, 110]]
    answer = json.dumps([{"bbox_2d": b, "label": "a"} for b in boxes])
    comps, _ = zhan("det", truth, answer)
    assert comps == {"vr1_format": 1.0, "vr1_recall": 0.5, "vr1_precision": 1.0}
    gt = {**GT, "solution": json.loads(truth)}
    framed = f"<think>x</think><answer>{answer}</answer>"
    assert [R.REWARDS[k](framed, gt) for k in ("vr1_format", "vr1_recall", "vr1_precision")] == [
        0.0
    ] * 3


def test_vision_r1_zhan_switches_stage_at_step_1500():
    """visionr1_qwen.py:251-254, 322-333: from step 1500 a pair counts above GIoU 0.75 and
    precision maps by (0.75, 0.9): the 0.738 box then earns recall 0 and precision 0."""
    truth, answer = "[10, 10, 50, 50]", '[{"bbox_2d": [7, 7, 47, 47], "label": "x"}]'
    base = ["--task", "rec", "--preset", "vision-r1-zhan", "--truth", truth, "--answer", answer]
    assert score(base + ["--step", "1499"])[1] == pytest.approx(2 + GIOU)
    assert score(base + ["--step", "1500"])[0] == {
        "vr1_format": 1,
        "vr1_recall": 0,
        "vr1_precision": 0,
    }


def test_vision_r1_zhan_reads_its_fence_and_its_regex_fallback():
    """visionr1_qwen.py:30-46 (a ```json first line dropped, cut at the next ```), 48-67 (the exact
    {"bbox_2d": [...], "label": "..."} form anywhere when JSON fails), 84 (int() cuts decimals)."""
    fenced = '```json\n[{"bbox_2d": [10.9, 10, 50, 50], "label": "a"}]\n```'
    assert R.zhan_detections(fenced) == [([10, 10, 50, 50], "a")]
    loose = 'I see {"bbox_2d": [10, 10, 50, 50], "label": "a"} and more'
    assert R.zhan_detections(loose) == [([10, 10, 50, 50], "a")]
    assert R.zhan_format_reward(loose, {**GT, "solution": TRUTH}) == 0.0  # not JSON
    assert R.zhan_detections("<think>x</think>") == []


# ---------------------------------------------------------------------------------------------
# VLM-R1
def test_vlm_r1_rec_format_is_a_search_for_a_box_in_a_dict():
    """VLM-R1 src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py:93-95: re.search of
    think, then an answer holding {...[x1, y1, x2, y2]...}. Ours checks the whole-output frame."""
    no_box = "<think>t</think><answer>no box</answer>"
    junk = 'junk <think>t</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'
    assert (R.vlmr1_rec_format_reward(no_box), R.format_reward(no_box)) == (0.0, 1.0)
    assert (R.vlmr1_rec_format_reward(junk), R.format_reward(junk)) == (1.0, 0.0)
    w = R.parse_weights("rec", "", "vlm-r1")
    assert dict(w) == {"iou": 1.0, "format": 1.0}
    assert [R.function(w, k)(junk, {}) for k in ("format",)] == [1.0]


def test_vlm_r1_rec_iou_reads_whole_numbers_and_its_one_pixel_rule():
    """qwen_module.py:135-157: the first [int, int, int, int] in the first <answer>; 114-124: the
    intersection counts only where min(x2) - 1 > max(x1)."""
    gt = {**GT, "solution": TRUTH}
    assert R.vlmr1_iou_reward("<answer>[7, 7, 47, 47]</answer>", gt) == pytest.approx(IOU)
    assert R.vlmr1_iou_reward("<answer>[7.5, 7, 47, 47]</answer>", gt) == 0.0  # not whole numbers
    touching = {**GT, "solution": [0, 0, 10, 10]}
    assert R.vlmr1_iou_reward("<answer>[9, 0, 20, 10]</answer>", touching) == 0.0  # 1 px overlap
    assert R.box_iou([9, 0, 20, 10], [0, 0, 10, 10]) > 0


def test_vlm_r1_od_length_ranks_boxes_in_answer_order():
    """VLM-R1 grpo_jsonl.py:280 gives every box score 1.0, so COCOeval's stable sort keeps the
    answer's order: a miss then a hit has precision 1/2 at recall 1 -> AP 0.5 at every threshold;
    times the length factor 1 / 2 (346) -> 0.25. Ours ranks by the stated confidence: 0.5."""
    truth = '[{"bbox_2d": [10, 10, 50, 50], "label": "dog"}]'
    boxes = [[100, 100, 140, 140], [10, 10, 50, 50]]
    ans = json.dumps([{"bbox_2d": b, "label": "dog"} for b in boxes])
    framed = f"<think>t</think><answer>```json\n{ans}\n```</answer>"
    comps, _ = score(["--task", "det", "--preset", "vlm-r1", "--truth", truth, "--answer", framed])
    assert comps == {"od_length": 0.25, "format": 1.0}
    conf = json.dumps([{"bbox_2d": b, "confidence": c} for b, c in zip(boxes, (0.1, 0.9))])
    assert R.det_map_reward(f"<answer>{conf}</answer>", {**GT, "solution": [TRUTH]}) == 0.5


def test_vlm_r1_od_length_scores_per_label_reads_the_last_answer_and_wants_a_fence():
    """grpo_jsonl.py:252-268 (one COCO category per true label), 278-285 (a box whose label the
    truth lacks is dropped, still counted by the length factor), 312-327 (the last ```json fence;
    none: no box), 404-405 (the LAST <answer>)."""
    gt = {**GT, "solution": [TRUTH, [60, 60, 100, 100]], "labels": ["dog", "cat"]}
    one = lambda b, lb: {"bbox_2d": b, "label": lb}  # noqa: E731
    fence = lambda items: f"<answer>```json\n{json.dumps(items)}\n```</answer>"  # noqa: E731
    both = fence([one(TRUTH, "dog"), one([60, 60, 100, 100], "cat")])
    assert R.od_length_reward(both, gt) == 1.0
    swapped = fence([one(TRUTH, "cat"), one([60, 60, 100, 100], "dog")])
    assert R.od_length_reward(swapped, gt) == 0.0  # right boxes, wrong labels: per label
    assert R.od_length_reward(fence([one(TRUTH, "dog")]), gt) == 0.5  # dog 1, cat 0
    bare = f"<answer>{json.dumps([one(TRUTH, 'dog')])}</answer>"
    assert R.od_length_reward(bare, gt) == 0.0  # no fence
    assert R.od_length_reward("<answer>x</answer>" + both, gt) == 1.0  # the last <answer>
    stranger = fence([one(TRUTH, "dog"), one([60, 60, 100, 100], "cat"), one(TRUTH, "cow")])
    assert R.od_length_reward(stranger, gt) == pytest.approx(2 / 3)  # dropped, still counted


def test_od_length_caps_at_100_boxes_per_label():
    """COCOeval's maxDets 100 (stats[0], grpo_jsonl.py:295): a hit at position 101 is not seen."""
    gt = {**GT, "solution": [TRUTH], "labels": ["dog"]}
    miss = {"bbox_2d": [300, 300, 340, 340], "label": "dog"}
    hit = {"bbox_2d": TRUTH, "label": "dog"}
    fence = lambda items: f"<answer>```json\n{json.dumps(items)}\n```</answer>"  # noqa: E731
    assert R.od_length_reward(fence([miss] * 99 + [hit]), gt) > 0
    assert R.od_length_reward(fence([miss] * 100 + [hit]), gt) == 0.0


# ---------------------------------------------------------------------------------------------
# Visual-RFT, R1-V, Vision-R1 (Huang et al.)
def test_visual_rft_reads_its_position_confidence_format():
    """Visual-RFT src/virft/src/open_r1/grpo.py:54-85 (single quotes read as double, a cut-off list
    closed after its last whole element), 136-149 (duplicates removed), 109-134 and 172-192 (IoU
    above 0.5, sum / max(#truth, #pred)), 194-212 (c if matched, else 1 - c); 249 shows the form."""
    gt = {**GT, "solution": [TRUTH]}
    one = "{'Position': [10, 10, 50, 50], 'Confidence': 0.9}"
    a = f"<answer>[{one}, {one}]</answer>"
    assert (R.vrft_iou_reward(a, gt), R.vrft_conf_reward(a, gt)) == (1.0, 0.9)  # one duplicate
    cut = "<answer>[{'Position': [10, 10, 50, 50], 'Confidence': 0.8}, {'Position': [1, 2</answer>"
    assert (R.vrft_iou_reward(cut, gt), R.vrft_conf_reward(cut, gt)) == (1.0, 0.8)
    no_conf = "<answer>[{'Position': [10, 10, 50, 50]}]</answer>"
    assert R.vrft_iou_reward(no_conf, gt) == 0.0  # a KeyError there: 0
    assert R.det_iou_reward(a.replace("'", '"'), gt) == 0.5  # ours keeps the duplicate


def test_r1_v_and_huang_rewards():
    """R1-V src/r1-v/src/open_r1/grpo.py:96-100: the format is a whole-output fullmatch with
    nothing around it; Vision-R1 (Huang) README.md:102: HFRRF, 1 only for a right format AND a
    right result."""
    gt = {**GT, "solution": 3.0}
    assert R.r1_format_reward("<think>a</think><answer>3</answer>") == 1.0
    assert R.r1_format_reward(" <think>a</think><answer>3</answer>") == 0.0
    w = R.parse_weights("count", "", "vision-r1-huang")
    hfrrf = R.function(w, "hfrrf")
    assert dict(w) == {"hfrrf": 1.0}
    assert hfrrf("<think>a</think><answer>3</answer>", gt) == 1.0
    assert hfrrf("<think>a</think><answer>4</answer>", gt) == 0.0
    assert hfrrf("<answer>3</answer>", gt) == 0.0


def test_each_recipe_prompt_is_the_official_template():
    """R1-V grpo.py:148; VLM-R1 qwen_module.py:73 (REC: ours), 76-83 (odLength); Vision-R1 (Zhan)
    visionr1_qwen.py:439-445 (the question alone); Visual-RFT grpo.py:368-373, 392 (a system
    turn)."""
    row = {"problem": "How many shapes?"}
    assert data.build_messages(row["problem"])[0]["content"][1]["text"].endswith(data.THINK_SUFFIX)
    r1v = data.with_prompt([row], R.prompt_template("count", "r1-v,dr-grpo"))[0]
    assert data.build_messages(r1v["problem"], r1v["_chat"]) == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {
                    "type": "text",
                    "text": "How many shapes?  Output the thinking process in <think> </think> and "
                    "final answer (number) in <answer> </answer> tags.",
                },
            ],
        }
    ]
    assert R.prompt_template("rec", "vlm-r1") is None  # VLM-R1's REC template is ours
    assert R.prompt_template("det", "vlm-r1")["text"].endswith("</answer>\n{problem}")
    assert R.prompt_template("det", "vision-r1-zhan") == {"text": "{problem}", "system": None}
    vrft = data.with_prompt([row], R.prompt_template("cls", "visual-rft"))[0]["_chat"]
    assert vrft["text"] == row["problem"] and vrft["system"].startswith("A conversation between")


# ---------------------------------------------------------------------------------------------
# The presets, resolved
CITED = {  # flag: value, from the file and line in recipes.PRESETS' comment
    "vlm-r1": dict(lr=1e-6, beta=0.04, num_generations=8, prompts_per_step=16, eps_low=0.2),
    "visual-rft": dict(lr=1e-6, beta=0.04, num_generations=8, prompts_per_step=16),
    "r1-v": dict(lr=1e-6, beta=0.04, num_generations=8, prompts_per_step=16, temperature=1.0),
    "vision-r1-zhan": dict(
        num_generations=4,
        max_completion_length=512,
        max_prompt_length=1024,
        iou_threshold_schedule="0:0.5/0.5/0.75,1500:0.75/0.75/0.9",
    ),
    "vision-r1-huang": dict(num_generations=16, max_completion_length=4096),
    "gspo": dict(importance_sampling="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.0),
    "dapo": dict(eps_low=0.2, eps_high=0.28, loss_agg="token", beta=0.0),
    "dr-grpo": dict(scale_rewards="none", loss_agg="drgrpo"),
}
TASK_OF = {
    "visual-rft": "cls",
    "r1-v": "count",
    "vision-r1-zhan": "det",
    "vision-r1-huang": "count",
}


@pytest.mark.parametrize("name", sorted(CITED))
def test_each_preset_resolves_to_its_cited_values(name):
    extra = ["--sft-steps", "1"] if name == "vision-r1-huang" else []
    a = g.parse_args(["--preset", name, "--task", TASK_OF.get(name, "rec"), *extra])
    assert {k: getattr(a, k) for k in CITED[name]} == CITED[name]
    assert all(a.sources[k] == f"preset {name}" for k in CITED[name])


def test_presets_compose_later_wins_and_flags_win_over_both():
    a = g.parse_args(["--preset", "vlm-r1,gspo", "--lr", "3e-6"])
    assert (a.beta, a.eps_low, a.eps_high, a.importance_sampling, a.lr) == (
        0.0,
        3e-4,
        4e-4,
        "sequence",
        3e-6,
    )
    assert (a.prompts_per_step, a.sources["beta"], a.sources["lr"]) == (16, "preset gspo", "flag")
    assert g.reward_weights(a) == {"iou": 1.0, "format": 1.0}  # the paper's reward stays


def test_the_run_prints_its_resolved_recipe():
    a = g.parse_args(["--preset", "vision-r1-zhan,dr-grpo", "--task", "det", "--beta", "0"])
    lines = []
    recipes.show(a, g.reward_weights(a), lines.append)
    assert "  --loss-agg 'drgrpo'  (preset dr-grpo)" in lines
    assert "  --beta 0.0  (flag)" in lines and "  --steps 300  (task)" in lines
    assert "  --seed 0  (default)" in lines
    assert "  reward vr1_recall weight 1: zhan_recall_reward  (preset vision-r1-zhan)" in lines
    assert len([x for x in lines if x.startswith("  --")]) == len(dataclasses.fields(g.Args))


# ---------------------------------------------------------------------------------------------
# GSPO's clip ranges, Dr. GRPO's normaliser
def test_gspo_clips_at_the_paper_ranges_by_default(capsys):
    """Sequence ratios 1.010 (A = +1) and 0.951 (A = -1): nothing clips at 0.2; both clip at GSPO's
    3e-4 / 4e-4 (arXiv 2507.18071, Sec. 5.1)."""
    mask = torch.ones(2, 3)
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.010)] * 3, [math.log(0.951)] * 3])
    A = torch.tensor([[1.0], [-1.0]])
    _, clipped = objectives.gspo_surrogate(logp, logp_old, A, mask, 0.2, 0.2)
    assert not clipped.any()
    a = g.parse_args(["--importance-sampling", "sequence"])
    assert (a.eps_low, a.eps_high, a.beta) == (3e-4, 4e-4, 0.04)  # beta 0 is the gspo preset's
    _, clipped = objectives.gspo_surrogate(logp, logp_old, A, mask, a.eps_low, a.eps_high)
    assert clipped.all()
    assert capsys.readouterr().err == ""
    a = g.parse_args(["--importance-sampling", "sequence", "--eps-high", "0.2"])
    assert (a.eps_low, a.eps_high) == (3e-4, 0.2)
    err = capsys.readouterr().err
    assert err.startswith("warning: GSPO") and err.count("\n") == 1
    assert g.parse_args([]).eps_low == 0.2  # the token ratio keeps its default
    a = g.parse_args(["--preset", "vlm-r1", "--importance-sampling", "sequence"])
    assert (a.eps_low, a.eps_high, a.sources["eps_low"]) == (3e-4, 4e-4, "GSPO default")
    assert capsys.readouterr().err == ""  # the paper's token eps is not the user's


def test_dr_grpo_divides_by_the_fixed_max_completion_length():
    """TRL's dr_grpo divides by max_completion_length, also when a --length-schedule stage decodes
    16 tokens under a 48 cap."""
    mask = torch.ones(2, 16)
    assert torch.equal(g.token_weights(mask, "drgrpo", 48), mask / (2 * 48))
    assert torch.equal(g.token_weights(mask, "drgrpo"), mask / (2 * 16))


# ---------------------------------------------------------------------------------------------
# Refusals: one line, before any weight loads
@pytest.mark.parametrize(
    "flags,says",
    [
        (["--num-generations", "1"], "G must be at least 2"),
        (["--overlong-buffer", "64"], "--overlong-buffer 64 is not below the length cap 48"),
        (["--overlong-buffer", "48"], "not below the length cap 48"),
        (["--overlong-buffer", "16", "--length-schedule", "0:16,10:48"], "length cap 16"),
        (["--preset", "gspo,dapo"], "gspo and dapo are two recipes"),
        (["--preset", "vlm-r1,vision-r1-zhan"], "two recipes"),
        (["--preset", "gspo,vlm-r1"], "the paper's preset comes first"),
        (["--preset", "vlm-r1,nope"], "unknown --preset 'nope'"),
        (["--preset", "r1-v"], "preset r1-v has no reward for --task rec"),
        (["--preset", "vision-r1-huang", "--task", "count"], "give --sft-steps N"),
        (["--reward-weights", "only:"], "name at least one reward"),
    ],
)
def test_refusals_are_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        g.train(g.parse_args(flags + ["--model", "/nonexistent"]))
    msg = str(e.value.code) if e.value.code not in (1, 2) else capsys.readouterr().err.strip()
    assert msg.startswith("error: ") and says in msg and "\n" not in msg, msg


def test_the_overlong_buffer_case_the_refusal_prevents():
    """Cap 48, buffer 64: DAPO's soft punishment is never 0 (lengths 1 / 10 / 48 get -0.27 / -0.41
    / -1.0): every completion is punished, which is why it is refused (verl refuses it too)."""
    _, comp = g.compute_rewards(["x"] * 3, [{}] * 3, {}, torch.tensor([1.0, 10.0, 48.0]), 48, 64)
    assert [round(v, 2) for v in comp["overlong"].tolist()] == [-0.27, -0.41, -1.0]


# ---------------------------------------------------------------------------------------------
# python rewards.py
def test_rewards_cli_prints_each_component_then_the_total(capsys, tmp_path, monkeypatch):
    # a plug-in loaded here registers in a copy of rewards.REWARDS, dropped after the test
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))
    argv = ["--task", "det", "--preset", "vision-r1-zhan", "--image-size", "640x480"]
    argv += [
        "--coord-space",
        "abs_original",
        "--truth",
        '[{"bbox_2d": [10, 10, 50, 50], "label": "dog"}]',
    ]
    argv += ["--answer", '[{"bbox_2d": [7, 7, 47, 47], "label": "dog"}]']
    assert R.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["vr1_format weight 1 value 1", "vr1_recall weight 1 value 1"]
    assert out[2].startswith("vr1_precision weight 1 value 0.7379") and out[3].startswith(
        "total 2.7379"
    )
    assert R.main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["components"]["vr1_recall"] == {"weight": 1.0, "value": 1.0}
    assert got["total"] == pytest.approx(2 + GIOU)
    # the model's resized input: the answer's boxes are read in its pixels
    half = ["--task", "rec", "--image-size", "640x480", "--input-size", "320x240", "--coord-space"]
    half += ["abs_resized", "--truth", "<answer>[20, 20, 100, 100]</answer>"]
    assert score(half + ["--answer", "<think>a</think><answer>[10, 10, 50, 50]</answer>"])[0] == {
        "iou": 1.0,
        "format": 1.0,
    }
    # a plug-in, and no preset
    plug = tmp_path / "plug.py"
    plug.write_text("def long(completion, gt):\n    return len(completion) / 100\n")
    comps, total = score(
        [
            "--task",
            "cls",
            "--truth",
            "red circle",
            "--answer",
            "x" * 50,
            "--reward-weights",
            f"only:{plug}:long=2",
        ]
    )
    assert comps == {"long": 0.5} and total == 1.0
    # --step applies --iou-threshold-schedule
    thr = [
        "--task",
        "rec",
        "--truth",
        "[10, 10, 50, 50]",
        "--answer",
        "<answer>[7, 7, 47, 47]</answer>",
    ]
    thr += ["--iou-threshold-schedule", "0:0,10:0.8"]
    assert (score(thr + ["--step", "9"])[0]["iou"], score(thr + ["--step", "10"])[0]["iou"]) == (
        pytest.approx(IOU),
        0.0,
    )


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--task", "det", "--truth", "[[10, 10, 50"], "is not a det solution"),
        (["--task", "count", "--truth", "three"], "is not a count solution"),
        (
            ["--task", "det", "--preset", "vlm-r1", "--truth", "[[10, 10, 50, 50]]"],
            "scores per label",
        ),
        (["--task", "rec", "--truth", "[1, 1, 5, 5]", "--image-size", "640"], "expected WxH"),
        (
            ["--task", "rec", "--truth", "[1, 1, 5, 5]", "--preset", "r1-v"],
            "no reward for --task rec",
        ),
    ],
)
def test_rewards_cli_refuses_in_one_line(argv, says, capsys):
    assert R.main(argv + ["--answer", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_python_rewards_py_runs_as_a_command():
    """The command itself (rewards.py imports no project module: it starts in a fraction of a
    second)."""
    cmd = [sys.executable, os.path.join(ROOT, "rewards.py"), "--task", "count", "--preset", "r1-v"]
    cmd += ["--truth", "<answer> 3 </answer>", "--answer", "<think>a</think><answer>3</answer>"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.stdout.splitlines() == [
        "count weight 1 value 1",
        "format weight 1 value 1",
        "total 2",
    ]


# ---------------------------------------------------------------------------------------------
# Each preset trains on the tiny model of its task
TINY = ["--steps", "3", "--prompts-per-step", "1", "--num-generations", "2", "--train-size", "4"]
TINY += [
    "--max-completion-length",
    "8",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--sample-every",
    "0",
]
TINY += ["--gradient-checkpointing", "false", "--max-prompt-length", "0", "--freeze-vision"]


@pytest.mark.parametrize(
    "preset,task,more",
    [
        ("vision-r1-zhan", "det", []),
        ("vlm-r1,gspo", "det", []),
        ("visual-rft,dapo", "cls", ["--dynamic-sampling", "1"]),
        ("r1-v,dr-grpo", "count", []),
        ("vision-r1-huang", "count", ["--sft-steps", "1"]),
    ],
)
def test_each_preset_trains_three_steps(preset, task, more, tmp_path, monkeypatch):
    monkeypatch.setattr(g.infra, "plot_metrics", lambda *a: None)  # the curves: not tested here
    args = g.parse_args(
        ["--preset", preset, "--task", task, *TINY, *more, "--output-dir", str(tmp_path)]
    )
    g.train(args)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if r.get("step", 0) > 0 and "reward" in r]
    assert len(steps) == 3 and all(r["logp_gap"] < 1e-4 for r in steps)
    logged = {k[7:] for k in steps[0] if k.startswith("reward_") and k != "reward_std"}
    assert logged == set(g.reward_weights(args))
    if preset == "vision-r1-zhan":  # exactly Eq. 7's three, each with weight 1
        assert g.reward_weights(args) == {
            "vr1_format": 1.0,
            "vr1_recall": 1.0,
            "vr1_precision": 1.0,
        }


def test_dynamic_sampling_can_filter_on_one_reward(monkeypatch):
    """verl's DAPO keeps a group whose ACCURACY reward differs; --dynamic-sampling-metric NAME does
    that here (the total stays the default). Two groups: the first differs in its total (format)
    but not in IoU, the second in IoU: filtering on iou keeps only the second."""
    r = torch.tensor([1.5, 0.5, 1.5, 0.5, 0.2, 0.9, 0.2, 0.9])  # group 0: format varies
    iou = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.2, 0.9, 0.2, 0.9])
    z = torch.zeros(8, 1)
    batch = g.Batch([], {}, z, z, z, z, None, [], [], r, {"iou": iou}, {})
    monkeypatch.setattr(g, "sample_and_reward", lambda *a: batch)
    monkeypatch.setattr(g.infra, "encode", lambda *a: None)
    monkeypatch.setattr(g, "score", lambda run, rows, *a: g.Batch(rows, *[None] * 11))
    procs = types.SimpleNamespace(gather=lambda x: x, round_down=int, mine=list, device="cpu")
    run = types.SimpleNamespace(procs=procs, family=None)
    args = g.parse_args(["--prompts-per-step", "2", "--num-generations", "4"])
    rows = [{"id": 0}, {"id": 1}]
    monkeypatch.setattr(g.data, "draw", lambda rng, rows, k: rows[:k])
    kept = g.dynamic_rollout(run, rows, None, 1, None, args)
    assert [x["id"] for x in kept.rows] == [0, 1]  # the total differs in both groups
    args.dynamic_sampling_metric = "iou"
    kept = g.dynamic_rollout(run, rows, None, 1, None, args)
    assert [x["id"] for x in kept.rows] == [1] and kept.dynamic["shortfall"] == 1
    with pytest.raises(SystemExit, match="is not a reward of this run"):
        g.parse_args(["--dynamic-sampling-metric", "accuracy"])
