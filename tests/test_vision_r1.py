"""Vision-R1 (arXiv 2503.18013): the criterion-driven reward (dual format, recall, precision after
box-prioritized matching; Eqs. 3-7) and the progressive rule refinement (differentiation, Eq. 8;
staged progression through --iou-threshold-schedule)."""

import itertools
import json
import os
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import recipes  # noqa: E402
import rewards as R  # noqa: E402

VR1 = ("vr1_format", "vr1_recall", "vr1_precision")
SIZES = {
    "width": 100,
    "height": 100,
    "input_width": 100,
    "input_height": 100,
    "coord_space": "abs_original",
}
A, B = [10, 10, 50, 50], [60, 60, 90, 90]
GT2 = {**SIZES, "solution": [A, B]}
LINEAR = {"penalty_threshold": 0.0, "full_threshold": 1.0}  # Eq. 8 off: the plain Eqs. 5 and 6
STAGE1, STAGE2 = (
    {"iou_threshold": t0, "penalty_threshold": t1, "full_threshold": t2}
    for t0, t1, t2 in R.VISION_R1_STAGES
)
IOU06 = [10, 10, 34, 50]  # 24 x 40 inside the 40 x 40 box A: IoU 0.6 exactly
IOU08 = [10, 10, 42, 50]  # IoU 0.8
IOU095 = [10, 10, 48, 50]  # IoU 0.95


def ans(text):
    return f"<think>x</think><answer>{text}</answer>"


def det(*boxes, conf=None):
    c = "" if conf is None else f', "confidence": {conf}'
    return ans("[" + ", ".join(f'{{"box": {list(b)}{c}}}' for b in boxes) + "]")


def vr1(text, gt=GT2, **rule):
    return [R.REWARDS[k](text, {**gt, **rule}) for k in VR1]


# --- Eqs. 4-6 on hand-made answers
# --------------------------------------------------------------------------------
def test_recall_and_precision_by_hand():
    """[format, recall, precision] without Eq. 8 (LINEAR), then with the paper's first stage (the
    default)."""
    cases = {
        "perfect": (det(A, B), [1, 1, 1], [1, 1, 1]),
        # one of two true boxes found: recall 1/2; the one answered box is exact
        "missed box": (det(A), [1, 0.5, 1], [1, 0.5, 1]),
        # a third box on nothing: recall stays 1, precision (1 + 1 + 0) / 3
        "extra box": (det(A, B, [0, 60, 30, 90]), [1, 1, 2 / 3], [1, 1, 2 / 3]),
        # A twice: one-to-one matching pairs A with A once, the copy is unmatched
        "duplicate box": (det(A, A), [1, 0.5, 0.5], [1, 0.5, 0.5]),
        # matched at IoU 0.6 (valid at xi0 = 0.5) and 0.8: precision (0.6 + 0.8) / 2; Eq. 8: 0.8 >=
        # 0.75 -> 1
        "imprecise boxes": (det(IOU06, [60, 60, 84, 90]), [1, 1, 0.7], [1, 1, 0.8]),
        # IoU 0.4 < xi0: not a valid prediction
        "poor box": (det([10, 10, 26, 50], B), [1, 0.5, 0.5], [1, 0.5, 0.5]),
        "no box": (ans("[]"), [1, 0, 0], [1, 0, 0]),
    }
    for name, (text, linear, stage1) in cases.items():
        assert vr1(text, **LINEAR) == pytest.approx(linear), name
        assert vr1(text) == pytest.approx(stage1) == vr1(text, **STAGE1), name
    assert R.box_iou([60, 60, 84, 90], B) == pytest.approx(0.8) and R.box_iou(
        [10, 10, 26, 50], A
    ) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "answer",
    [
        '[{"box": [10, 10, 50]}]',  # three numbers
        # one inverted box spoils the answer
        '[{"box": [10, 10, 50, 50]}, {"box": [90, 90, 60, 60]}]',
        '[{"box": [10, 10, 50, "50"]}]',
        '[{"box": [10, 10, 50, 50], "confidence": 1.5}]',
        '[{"label": "x"}]',
        '[{"box": [10, 10, 50, 50]}',
        "the boxes are [10, 10, 50, 50]",
        "[[10, 10, 50, 50]]",
    ],
)
def test_malformed_box_scores_zero_everywhere(answer):
    assert vr1(ans(answer)) == [0.0, 0.0, 0.0]
    assert vr1(answer) == [0.0, 0.0, 0.0]  # no <answer> tags


def test_dual_format_checks_template_and_content():
    """Eq. 4: f_tem (the JSON template) and f_cont (well-formed boxes inside the image); a box
    outside the image fails f_cont but is still matched by recall and precision."""
    outside = det(A, [60, 60, 90, 130])  # y2 = 130 in a 100 px image
    assert vr1(outside) == [0.0, 0.5, 0.5]
    assert vr1(det(A, [60, 60, 90, 101])) == pytest.approx(
        [1.0, 1.0, (1 + 30 / 41) / 2]
    )  # 1 px slack; IoU 30/41
    assert vr1(det([-1, 0, 50, 50], B))[0] == 1.0 and vr1(det([-2, 0, 50, 50], B))[0] == 0.0
    fenced = ans('```json\n[{"bbox_2d": [10, 10, 50, 50]}, {"bbox_2d": [60, 60, 90, 90]}]\n```')
    assert vr1(fenced) == [1.0, 1.0, 1.0]
    # the model's coordinate space: Qwen2.5-VL's resized input, half the original size here
    resized = {**GT2, "input_width": 50, "input_height": 50, "coord_space": "abs_resized"}
    assert vr1(det([5, 5, 25, 25], [30, 30, 45, 45]), resized) == [1.0, 1.0, 1.0]
    assert (
        vr1(det([5, 5, 25, 25], [30, 30, 45, 60]), resized)[0] == 0.0
    )  # 60 > 50: outside the resized input


def test_rec_is_the_one_box_case():
    rec = {**SIZES, "solution": A}
    for answer in (str(A), json.dumps({"bbox_2d": A}), f'[{{"bbox_2d": {A}, "label": "cat"}}]'):
        assert vr1(ans(answer), rec) == [1.0, 1.0, 1.0], answer
    assert vr1(ans(str(IOU06)), rec) == [1.0, 1.0, 0.6]  # first stage: 0.6 is between xi1 and xi2
    assert vr1(ans(str(IOU08)), rec) == [1.0, 1.0, 1.0]  # 0.8 >= xi2 = 0.75
    assert vr1(ans(str(IOU06)), rec, **STAGE2) == [
        1.0,
        0.0,
        0.0,
    ]  # advanced stage: 0.6 < xi0 = 0.75
    assert vr1(ans(str(IOU08)), rec, **STAGE2) == [1.0, 1.0, 0.8]
    assert vr1(ans(str(IOU095)), rec, **STAGE2) == [1.0, 1.0, 1.0]
    assert vr1(ans(f"[{A}, {B}]"), rec) == [0.0, 0.0, 0.0]  # two bare boxes are no template
    assert vr1(det(A, B), rec) == [
        1.0,
        1.0,
        0.5,
    ]  # a list answer to a REC question: one of two boxes is right


def test_nothing_to_find():
    gt0 = {**SIZES, "solution": []}
    assert vr1(ans("[]"), gt0) == [1.0, 1.0, 1.0]
    assert vr1(det(A), gt0) == [1.0, 0.0, 0.0]


# --- Eq. 3: box-prioritized matching
# ------------------------------------------------------------------------------
def test_matching_is_one_to_one_on_boxes_not_confidence():
    """A wide box overlaps both true boxes at IoU 0.6; a tight one only the first (0.9). Greedy
    matching by confidence (Visual-RFT) gives the confident wide box the first truth and leaves the
    tight one unmatched (IoU 0.27 with the second): recall 1/2. The Hungarian matching on box cost
    pairs each with a truth: recall 1."""
    t1, t2 = [0, 0, 40, 40], [20, 0, 60, 40]
    wide, tight = [10, 0, 50, 40], [0, 0, 36, 40]
    gt = {**SIZES, "solution": [t1, t2]}
    text = ans(json.dumps([{"box": wide, "confidence": 0.9}, {"box": tight, "confidence": 0.5}]))
    preds = R.parse_localization(text)
    assert [(i, j) for i, j, _ in R.match_detections(preds, gt["solution"], 0.5)] == [(0, 0)]
    assert sorted(
        (i, j) for i, j, _ in R.box_prioritized_match(preds, gt["solution"], 100, 100)
    ) == [(0, 1), (1, 0)]
    assert vr1(text, gt, **LINEAR) == pytest.approx([1.0, 1.0, (0.6 + 0.9) / 2])
    assert vr1(text, gt) == pytest.approx([1.0, 1.0, (0.6 + 1) / 2])


def test_assignment_is_optimal():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 4)
        m = rng.randint(n, 6)
        cost = [
            [rng.choice([rng.random(), rng.randint(0, 3), 1e9]) for _ in range(m)] for _ in range(n)
        ]
        col = R._assignment(cost)
        assert len(set(col)) == n
        best = min(
            sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n)
        )
        assert sum(cost[i][col[i]] for i in range(n)) == pytest.approx(best)


# --- Eq. 8 and the staged progression
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("low,high", [(0.5, 0.75), (0.75, 0.9)])
def test_differentiation_at_its_thresholds(low, high):
    f = R.differentiation
    assert f(low - 1e-9, low, high) == 0.0 and f(0.0, low, high) == 0.0  # below xi1: the penalty
    assert f(low, low, high) == low  # at xi1: the value itself
    mid = (low + high) / 2
    assert f(mid, low, high) == mid and f(high - 1e-9, low, high) == high - 1e-9
    assert f(high, low, high) == 1.0 and f(1.0, low, high) == 1.0  # from xi2 on: full reward
    assert [f(x / 10, 0.0, 1.0) for x in range(11)] == [
        x / 10 for x in range(11)
    ]  # (0, 1): the identity


def test_differentiation_applies_per_instance_for_precision_and_once_for_recall():
    three = {**SIZES, "solution": [A, B, [60, 0, 90, 30]]}
    # two of three found, one at IoU 0.6, one at 0.95: recall 2/3 (< 0.75: kept), precision (0.6 +
    # 1) / 2
    text = det(IOU06, [60, 60, 88, 90])
    assert R.box_iou([60, 60, 88, 90], B) == pytest.approx(28 / 30)
    assert vr1(text, three) == pytest.approx([1.0, 2 / 3, 0.8])
    assert vr1(text, three, **STAGE2) == pytest.approx(
        [1.0, 0.0, 0.5]
    )  # 0.6 is no longer valid; 1/3 < 0.75
    assert vr1(det(A), three) == [1.0, 0.0, 1.0]  # recall 1/3 < xi1: penalized to 0


def test_refinement_stage_values():
    assert R.refinement_stage("0.3") == {"iou_threshold": 0.3}
    assert R.refinement_stage("0.75/0.75/0.9") == {
        "iou_threshold": 0.75,
        "penalty_threshold": 0.75,
        "full_threshold": 0.9,
    }
    for bad in ["", "a", "0.5/0.5", "0.5/0.9/0.75", "nan", "0.5/0.5/inf", "0.5/0.5/0.75/1"]:
        with pytest.raises(ValueError):
            R.refinement_stage(bad)
    assert g.parse_args(["--iou-threshold-schedule", "0:0.5/0.5/0.75,150:0.75/0.75/0.9"])
    for bad in ["0:0.5/0.9/0.75", "0:0.5/0.5", "zero:0.5"]:
        with pytest.raises(SystemExit):
            g.parse_args(["--iou-threshold-schedule", bad])


def test_stage_changes_at_the_configured_step():
    """The schedule's rule at steps 149 and 150, through the trainer's gts: the same answer (IoU 0.6
    and 0.8) earns less from step 150 on."""
    spec = "0:0.5/0.5/0.75,150:0.75/0.75/0.9"
    rules = {
        s: recipes.stage_value(spec, s, {"iou_threshold": 0.0}, R.refinement_stage)
        for s in (1, 149, 150, 300)
    }
    assert rules[1] == rules[149] == STAGE1 and rules[150] == rules[300] == STAGE2
    rows, sizes = [{"solution": [A, B], "image": "a.png", "problem": "p"}], [(100, 100, 100, 100)]
    text = det(IOU06, [60, 60, 84, 90])
    before, after = (
        [R.REWARDS[k](text, gt) for k in VR1]
        for s in (149, 150)
        for gt in data.ground_truths(rows, sizes, "abs_original", rules[s])
    )
    # after: IoU 0.6 < xi0 = 0.75 is not valid, recall 1/2 < xi1 = 0.75 is penalized, 0.8 is kept (<
    # xi2 = 0.9)
    assert before == pytest.approx([1.0, 1.0, 0.8]) and after == pytest.approx([1.0, 0.0, 0.4])
    # the single-number form keeps its meaning (xi0 only), and no schedule is the paper's first
    # stage
    assert recipes.stage_value("0:0,300:0.5", 300, {"iou_threshold": 0.0}, R.refinement_stage) == {
        "iou_threshold": 0.5
    }
    assert data.ground_truths(rows, sizes, "abs_original")[0]["iou_threshold"] == 0.0
    assert vr1(text) == vr1(text, **STAGE1)


def test_schedule_reaches_the_rewards_in_training(tmp_path):
    """Two steps on the det base: the logged rule is the schedule's, stage by stage."""
    args = g.parse_args(
        [
            "--task",
            "det",
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
            "--max-completion-length",
            "32",
            "--steps",
            "2",
            "--reward-weights",
            "vr1_format=1,vr1_recall=1,vr1_precision=1,det_iou=0,det_conf=0",
            "--iou-threshold-schedule",
            "0:0.5/0.5/0.75,2:0.75/0.75/0.9",
        ]
    )
    g.train(args)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [{k: r[k] for k in STAGE1} for r in rows] == [STAGE1, STAGE2]
    assert all(f"reward_{k}" in r for r in rows for k in VR1)


# --- reward hacking
# -----------------------------------------------------------------------------------------------
def total(text, gt=GT2, **rule):
    return sum(vr1(text, gt, **rule))


@pytest.mark.parametrize("rule", [{}, STAGE2, LINEAR])
def test_box_spraying_does_not_outscore_an_exact_answer(rule):
    exact = total(det(A, B), **rule)
    assert exact == 3.0
    grid = [[x, y, x + 20, y + 20] for x in range(0, 100, 20) for y in range(0, 100, 20)]
    sprays = [
        det(A, A, B, B),
        det(*[A] * 10, *[B] * 10),
        det(*grid),
        det(*grid, A, B),
        det(A, B, *grid),
        det(A, B, IOU06, IOU08, [60, 60, 84, 90]),
        det(*[[x, x, x + 40, x + 40] for x in range(0, 60, 2)]),
    ]
    for text in sprays:
        assert total(text, **rule) < exact
        assert R.vr1_precision_reward(text, {**GT2, **rule}) <= 0.5


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    truths=st.lists(
        st.tuples(st.integers(0, 80), st.integers(0, 80), st.integers(5, 20), st.integers(5, 20)),
        min_size=1,
        max_size=4,
    ),
    extra=st.lists(
        st.tuples(st.integers(0, 90), st.integers(0, 90), st.integers(1, 60), st.integers(1, 60)),
        min_size=1,
        max_size=6,
    ),
    stage=st.sampled_from([{}, STAGE2, LINEAR]),
)
def test_adding_boxes_to_an_exact_answer_never_pays(truths, extra, stage):
    """Any extra boxes after the exact ones: recall cannot rise above 1 and every extra box is one
    more M in Eq. 6, so the sum of the three rewards falls strictly."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in truths]
    gt = {**SIZES, "solution": boxes}
    exact = total(det(*boxes), gt, **stage)
    assert exact == 3.0
    assert total(det(*boxes, *[[x, y, x + w, y + h] for x, y, w, h in extra]), gt, **stage) < exact
