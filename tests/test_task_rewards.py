"""Known values and adversarial answers for the count and detection rewards, COCO AP by hand and
against pycocotools, and progressive rule refinement (gt["iou_threshold"])."""

import contextlib
import io
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards as R  # noqa: E402

DET = ["det_iou", "det_conf", "det_iou_sum", "det_map"]
SIZES = {
    "width": 100,
    "height": 100,
    "input_width": 100,
    "input_height": 100,
    "coord_space": "abs_original",
}
TRUE = [10, 10, 50, 50]
GT1 = {**SIZES, "solution": [TRUE]}
GT0 = {**SIZES, "solution": []}
BOX = '{"bbox_2d": [10, 10, 50, 50], "confidence": 0.9}'
IOU06 = [10, 10, 34, 50]  # 24 x 40 inside the 40 x 40 true box: IoU 960 / 1600 = 0.6 exactly


def ans(text):
    return f"<think>x</think><answer>{text}</answer>"


def scores(answer, gt=GT1):
    return [R.REWARDS[k](ans(answer), gt) for k in DET]


# --- count ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["3", " 3 ", "3 shapes", "3.0", "There are 3.", "+3"])
def test_count_right(text):
    for gt in ({"solution": 3}, {"solution": 3.0}, {"solution": "3"}):
        assert R.count_reward(ans(text), gt) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "3 or 4",
        "three",
        "",
        "1e999",
        "nan",
        "inf",
        "1e0",
        "3.5",
        "1.2.3",
        ".3",
        "33",
        "3-4",
        "-3",
        "9" * 400,
        "0x3",
    ],
)
def test_count_wrong_or_malformed(text):
    assert R.count_reward(ans(text), {"solution": 3}) == 0.0


def test_parse_number():
    assert R.parse_number(ans("-2")) == -2.0 and R.parse_number(ans("2.50 cm")) == 2.5
    assert R.parse_number(ans("9" * 400)) is None  # overflows to inf: absurd
    assert R.parse_number("3") is None and R.parse_number(None) is None  # no <answer>, not a str
    assert R.count_reward("<think>x</think>3", {"solution": 3}) == 0.0


# --- detection: parsing --------------------------------------------------------------------------
def test_parse_detections_accepts_variants():
    assert R.parse_detections(ans(f"[{BOX}]")) == [([10.0, 10.0, 50.0, 50.0], 0.9)]
    assert R.parse_detections(ans("[]")) == []
    fenced = ans(
        '\n```json\n[{"bbox": [1, 2, 3, 4.5]}]\n```\n'
    )  # code fence; no confidence means 1
    assert R.parse_detections(fenced) == [([1.0, 2.0, 3.0, 4.5], 1.0)]
    keys = ans('[{" BOX ": [1, 2, 3, 4], " Score ": 0.5}, {"Position": [1, 2, 3, 4], "CONF": 0}]')
    assert R.parse_detections(keys) == [([1.0, 2.0, 3.0, 4.0], 0.5), ([1.0, 2.0, 3.0, 4.0], 0.0)]
    # the first present of bbox_2d, bbox, box, position (and of confidence, conf, score) is used
    both = ans('[{"box": [0, 0, 1, 1], "bbox_2d": [1, 2, 3, 4], "score": 0.1, "confidence": 0.7}]')
    assert R.parse_detections(both) == [([1.0, 2.0, 3.0, 4.0], 0.7)]
    assert R.parse_detections(ans('[{"bbox_2d": [-5, -5, 1e308, 1e308]}]')) == [
        ([-5.0, -5.0, 1e308, 1e308], 1.0)
    ]


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "the cat is at 10, 10, 50, 50",
        "[10, 10, 50, 50]",
        BOX,  # not JSON / a dict, not a list
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        f"[[{BOX}]]",  # nesting
        "[{'bbox_2d': [10, 10, 50, 50]}]",  # Python quotes are not JSON
        '[{"bbox_2d": [50, 10, 10, 50]}]',
        '[{"bbox_2d": [10, 10, 10, 50]}]',
        '[{"bbox_2d": [10, 50, 50, 10]}]',
        '[{"bbox_2d": [1e999, 10, 50, 50]}]',
        '[{"bbox_2d": [NaN, 10, 50, 50]}]',
        '[{"bbox_2d": [10, 10, Infinity, 50]}]',
        '[{"bbox_2d": [10, 10, %s, 50]}]' % ("9" * 400),
        '[{"bbox_2d": [10, 10, %s, 50]}]' % ("9" * 5000),
        '[{"bbox_2d": [true, 10, 50, 50]}]',
        '[{"bbox_2d": ["10", 10, 50, 50]}]',
        '[{"bbox_2d": [10, 10, 50]}]',
        '[{"bbox_2d": [10, 10, 50, 50, 60]}]',
        '[{"bbox_2d": {"x1": 10}}]',
        '[{"label": "cat"}]',
        '[{"bbox_2d": null}]',
        '[{"bbox_2d": [10, 10, 50, 50], "confidence": -0.1}]',
        '[{"bbox_2d": [10, 10, 50, 50], "confidence": 1.5}]',
        '[{"bbox_2d": [10, 10, 50, 50], "confidence": NaN}]',
        '[{"bbox_2d": [10, 10, 50, 50], "confidence": true}]',
        '[{"bbox_2d": [10, 10, 50, 50], "score": null}]',
        '[{"bbox_2d": [10, 10, 50, 50], "conf": "0.9"}]',
        f'[{BOX}, {{"bbox_2d": [50, 10, 10, 50]}}]',
        f"[{BOX}, 7]",  # one bad element spoils the answer
    ],
)
def test_malformed_detections_score_zero(answer):
    assert R.parse_detections(ans(answer)) is None
    for gt in (GT1, GT0):
        assert scores(answer, gt) == [0.0, 0.0, 0.0, 0.0]


def test_parse_detections_not_a_str():
    for x in [None, 42, b"<answer>[]</answer>", ["<answer>[]</answer>"], "<answer>[]"]:
        assert R.parse_detections(x) is None


# --- detection: rewards --------------------------------------------------------------------------
def test_det_known_values():
    assert scores(f"[{BOX}]") == [1.0, 0.9, 1.0, 1.0]
    miss = '{"bbox_2d": [60, 60, 90, 90], "confidence": 0.2}'
    # one hit (conf 0.9) and one miss (conf 0.2): iou 1/2; conf (0.9 + 0.8) / 2; AP 1 (the hit ranks
    # first)
    assert scores(f"[{BOX}, {miss}]") == pytest.approx([0.5, 0.85, 1.0, 0.5])
    # the miss ranked first: AP = 0.5 (see test_ap_false_positive_first), times min(1, 1/2)
    hi_miss = '{"bbox_2d": [60, 60, 90, 90], "confidence": 0.95}'
    assert scores(f"[{BOX}, {hi_miss}]") == pytest.approx([0.5, (0.9 + 0.05) / 2, 1.0, 0.25])
    assert (
        scores('[{"bbox_2d": [10, 10, 50, 50], "confidence": 0.0}]')[1] == 0.0
    )  # right box, no confidence


def test_empty_answers():
    assert scores("[]", GT0) == [1.0, 1.0, 1.0, 1.0]  # nothing to find, nothing found
    assert scores("[]", GT1) == [0.0, 0.0, 0.0, 0.0]
    assert scores(f"[{BOX}]", GT0) == [
        0.0,
        pytest.approx(0.1),
        0.0,
        0.0,
    ]  # conf: 1 - 0.9 for the false box
    for empty in ["<answer></answer>", "<think>x</think>", "", "<answer> </answer>"]:
        assert [R.REWARDS[k](empty, GT0) for k in DET] == [0.0] * 4


def test_repeated_box_is_the_hack():
    """A correct box answered 5 times: det_iou and det_map divide by the 5 answers, det_conf pays 1
    - c for the 4 unmatched copies; det_iou_sum keeps 1.0: spraying boxes costs nothing, VLM-R1's
    hack."""
    assert scores(f"[{', '.join([BOX] * 5)}]") == pytest.approx(
        [0.2, (0.9 + 4 * 0.1) / 5, 1.0, 0.2]
    )
    # spraying 30 boxes over the image (one of them right) also keeps det_iou_sum at 1
    grid = [
        f'{{"bbox_2d": [{x}, {y}, {x + 10}, {y + 10}]}}'
        for x in range(0, 100, 20)
        for y in range(0, 100, 20)
    ]
    iou, _, iou_sum, mAP = scores(f"[{', '.join(grid + [BOX])}]")
    assert iou_sum == 1.0 and iou == pytest.approx(1 / 26) and mAP < 0.04


def test_huge_and_negative_coordinates():
    assert scores('[{"bbox_2d": [0, 0, 1e308, 1e308]}]') == [
        0.0,
        0.0,
        0.0,
        0.0,
    ]  # area overflows: IoU 0
    resized = {
        **GT1,
        "coord_space": "abs_resized",
        "input_width": 50,
    }  # x scaled by 2: 1e308 -> inf
    assert scores('[{"bbox_2d": [0, 0, 1e308, 50]}]', resized) == [0.0, 0.0, 0.0, 0.0]
    # a slightly negative box is a box: IoU 40*40 / (42*40) with [10, 10, 50, 50] shifted
    gt = {**SIZES, "solution": [[0, 10, 40, 50]]}
    assert scores('[{"bbox_2d": [-2, 10, 40, 50]}]', gt) == pytest.approx(
        [40 / 42, 1.0, 40 / 42, 1.0]
    )


def test_coord_space_mapping():
    gt = {
        **GT1,
        "width": 200,
        "height": 100,
        "input_width": 100,
        "input_height": 50,
        "coord_space": "abs_resized",
    }
    gt["solution"] = [[20, 20, 100, 100]]
    assert scores('[{"bbox_2d": [10, 10, 50, 50]}]', gt) == [1.0, 1.0, 1.0, 1.0]
    assert scores('[{"bbox_2d": [20, 20, 100, 100]}]', gt) == [
        0.0,
        0.0,
        0.0,
        0.0,
    ]  # unmapped: no match
    norm = {**gt, "coord_space": "norm1000"}
    assert scores('[{"bbox_2d": [100, 200, 500, 1000]}]', norm) == [1.0, 1.0, 1.0, 1.0]


def test_iou_threshold_raises_the_match_threshold():
    box = f'[{{"bbox_2d": {IOU06}}}]'
    assert R.box_iou(IOU06, TRUE) == 0.6
    # threshold 0 (and 0.3): Visual-RFT's 0.5; COCO thresholds 0.50, 0.55, 0.60 of ten match (IoU >=
    # t)
    for t in (None, 0.0, 0.3):
        gt = GT1 if t is None else {**GT1, "iou_threshold": t}
        assert scores(box, gt) == pytest.approx([0.6, 1.0, 0.6, 0.3])
    assert scores(box, {**GT1, "iou_threshold": 0.7}) == [0.0, 0.0, 0.0, 0.0]
    # at exactly 0.6: Visual-RFT needs IoU > 0.6 (no match); det_map's COCO thresholds become 0.6,
    # 0.6, 0.6, 0.65, ..., 0.95, and COCO needs IoU >= t: 3 of 10 match
    assert scores(box, {**GT1, "iou_threshold": 0.6}) == pytest.approx([0.0, 0.0, 0.0, 0.3])
    # REC: IoU below the threshold scores 0, at or above it the IoU itself
    rec = {**SIZES, "solution": TRUE}
    text = ans(str(IOU06))
    assert R.iou_reward(text, rec) == 0.6 == R.iou_reward(text, {**rec, "iou_threshold": 0.6})
    assert R.iou_reward(text, {**rec, "iou_threshold": 0.7}) == 0.0
    assert R.hit_reward(text, {**rec, "iou_threshold": 0.7}) == 1.0  # hit is unchanged


def test_match_detections_greedy_by_confidence():
    gts = [[0, 0, 10, 10], [0, 0, 10, 12]]
    a, b = ([0, 0, 10, 10], 0.5), ([0, 0, 10, 11], 0.9)  # b: IoU 110/120 with g1, 100/110 with g0
    # b goes first (higher confidence) and takes g1; a takes what is left
    assert R.match_detections([a, b], gts, 0.5) == [(1, 1, 110 / 120), (0, 0, 1.0)]
    # equal confidences keep answer order: a first, takes g0 (IoU 1); b takes g1
    assert R.match_detections([a, (b[0], 0.5)], gts, 0.5) == [(0, 0, 1.0), (1, 1, 110 / 120)]
    assert R.match_detections([a, a], [gts[0]], 0.5) == [(0, 0, 1.0)]  # one true box matches once
    assert R.match_detections([], gts, 0.5) == [] and R.match_detections([a], [], 0.5) == []
    assert (
        R.match_detections([(IOU06, 1.0)], [TRUE], 0.6) == []
    )  # strictly greater than the threshold


# --- COCO AP by hand -----------------------------------------------------------------------------
def test_ap_perfect():
    images = [
        ([(TRUE, 0.3)], [TRUE]),
        ([([0, 0, 5, 5], 0.9), ([6, 6, 9, 9], 0.1)], [[6, 6, 9, 9], [0, 0, 5, 5]]),
    ]
    assert R.mean_ap(images) == {"map": 1.0, "ap50": 1.0, "ap75": 1.0}


def test_ap_false_positive_first():
    # ranked: FP (0.9), TP (0.8); 1 true box. precision [0, 1/2], recall [0, 1]; the envelope makes
    # it [1/2, 1/2]. All 101 recall points r (r = 0 included) read 1/2: AP = 101 * 0.5 / 101 = 0.5.
    images = [([([60, 60, 90, 90], 0.9), (TRUE, 0.8)], [TRUE])]
    assert R.mean_ap(images) == {"map": 0.5, "ap50": 0.5, "ap75": 0.5}


def test_ap_miss():
    # 2 true boxes, 1 found: precision [1], recall [1/2]. r = 0.00..0.50 (51 points) read 1, r > 0.5
    # has no curve point: 0. AP = 51 / 101.
    images = [([(TRUE, 1.0)], [TRUE, [60, 60, 90, 90]])]
    assert R.mean_ap(images)["map"] == pytest.approx(51 / 101)


def test_ap_two_images_pooled():
    # image 1: TP 0.9; image 2: FP 0.8 then TP 0.7; 2 true boxes. Pooled by confidence:
    # precision [1, 1/2, 2/3], recall [1/2, 1/2, 1]; envelope [1, 2/3, 2/3].
    # r = 0..0.50 (51 points) -> 1; r = 0.51..1 (50 points) -> 2/3. AP = (51 + 50 * 2/3) / 101.
    other = [60, 60, 90, 90]
    images = [([(TRUE, 0.9)], [TRUE]), ([([0, 0, 5, 5], 0.8), (other, 0.7)], [other])]
    assert R.mean_ap(images)["map"] == pytest.approx((51 + 100 / 3) / 101)
    # the same detections evaluated per image would both be 1 and 0.5: pooling is not averaging
    assert (
        R.average_precision(images[:1], 0.5) == 1.0 and R.average_precision(images[1:], 0.5) == 0.5
    )


def test_ap_iou_thresholds_and_no_truth():
    # IoU exactly 0.6: COCO matches at t = 0.50, 0.55, 0.60 (IoU >= t), not above
    assert R.mean_ap([([(IOU06, 1.0)], [TRUE])]) == {
        "map": pytest.approx(0.3),
        "ap50": 1.0,
        "ap75": 0.0,
    }
    # no true boxes at all (COCO: -1, undefined): 1 when nothing is predicted, 0 otherwise
    assert (
        R.average_precision([([], [])], 0.5) == 1.0
        and R.average_precision([([(TRUE, 1.0)], [])], 0.5) == 0.0
    )
    assert R.average_precision([([], [TRUE])], 0.5) == 0.0


# Two cases where a reading of "COCO AP" that is right on paper differs from pycocotools: 10
# disjoint true boxes; 7 hits, a false positive, a hit. Recall reaches 0.70 at the 7th (precision
# 1), but pycocotools' grid point "0.70" is 70 * 0.01 = 0.7000000000000001, so it reads the 9th
# point (recall 0.8, precision 8/9): AP = (70 + 11 * 8/9) / 101, not (71 + 10 * 8/9) / 101.
TEN = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
GRID_CASE = [([(b, 0.9) for b in TEN[:7]] + [([0, 50, 10, 60], 0.8), (TEN[7], 0.7)], TEN)]
# A (conf 0.9) has IoU 90/110 with both true boxes, B (0.8) IoU 1 with g0 and 80/120 with g1. COCO's
# loop gives A the LAST of equal-IoU boxes (g1), so B gets g0 at t = 0.7: 2 hits. Ties to the first
# (g0) would leave B unmatched at 0.7 (its IoU with g1 is 0.67).
TIE_CASE = [([([1, 0, 11, 10], 0.9), ([0, 0, 10, 10], 0.8)], [[0, 0, 10, 10], [2, 0, 12, 10]])]


def test_ap_float_and_tie_details_follow_pycocotools():
    assert R.average_precision(GRID_CASE, 0.5) == pytest.approx((70 + 11 * 8 / 9) / 101)
    assert R.average_precision(TIE_CASE, 0.7) == 1.0
    assert R.match_detections(*TIE_CASE[0], 0.7) == [
        (0, 0, 90 / 110)
    ]  # Visual-RFT's rule: first box, B unmatched


# --- cross-check with pycocotools ----------------------------------------------------------------
def random_images(rng):
    """1-3 images on a coarse grid (IoU ties and exact-threshold IoUs are common), 0-4 true boxes
    and 0-6 predictions each, some near a true box, confidences from a few values (score ties)."""

    def box():
        x, y = rng.randrange(0, 40, 2), rng.randrange(0, 40, 2)
        return [x, y, x + rng.randrange(2, 30, 2), y + rng.randrange(2, 30, 2)]

    images = []
    for _ in range(rng.randint(1, 3)):
        gts = [box() for _ in range(rng.randint(0, 4))]
        preds = []
        for _ in range(rng.randint(0, 6)):
            if gts and rng.random() < 0.6:
                g = rng.choice(gts)
                b = [v + rng.choice([0, 0, 1, -1, 2, -3]) for v in g]
                b = [b[0], b[1], max(b[2], b[0] + 1), max(b[3], b[1] + 1)]
            else:
                b = box()
            preds.append((b, rng.choice([0.1, 0.3, 0.5, 0.5, 0.7, 0.9, rng.random()])))
        images.append((preds, gts))
    return images


def coco_eval(images):
    """pycocotools' (AP, AP50) for one category, area range all, maxDets 100, silenced."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def dataset(anns):
        out = {
            "images": [{"id": i} for i in range(1, len(images) + 1)],
            "categories": [{"id": 1}],
            "annotations": [],
        }
        for k, (img, (x1, y1, x2, y2), extra) in enumerate(anns, 1):
            out["annotations"].append(
                {
                    "id": k,
                    "image_id": img,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    **extra,
                }
            )
        coco = COCO()
        coco.dataset = out
        coco.createIndex()
        return coco

    with contextlib.redirect_stdout(io.StringIO()):
        gt = dataset([(i, b, {}) for i, (_, gts) in enumerate(images, 1) for b in gts])
        dt = dataset(
            [(i, b, {"score": c}) for i, (preds, _) in enumerate(images, 1) for b, c in preds]
        )
        E = COCOeval(gt, dt, iouType="bbox")
        E.params.catIds = [1]
        E.evaluate()
        E.accumulate()
        E.summarize()
    assert list(E.params.recThrs) == list(R.COCO_RECALLS) and E.params.maxDets[-1] == 100
    return E.stats[0], E.stats[1]


def test_mean_ap_agrees_with_pycocotools():
    mask = pytest.importorskip("pycocotools.mask")
    # pycocotools 2.x computes box IoU as we do, without the old "+1 pixel" in widths and heights
    assert (
        mask.iou([[0, 0, 10, 10]], [[5, 0, 10, 10]], [0])[0][0]
        == R.box_iou([0, 0, 10, 10], [5, 0, 15, 10])
        == 1 / 3
    )
    rng, compared = random.Random(0), 0
    for images in [GRID_CASE, TIE_CASE] + [random_images(rng) for _ in range(60)]:
        ours, (coco_map, coco_ap50) = R.mean_ap(images), coco_eval(images)
        if not any(gts for _, gts in images):  # COCO: -1 (undefined); ours is documented above
            assert coco_map == -1 and ours["map"] == (0.0 if any(p for p, _ in images) else 1.0)
            continue
        assert ours["map"] == pytest.approx(coco_map, abs=1e-6), images
        assert ours["ap50"] == pytest.approx(coco_ap50, abs=1e-6), images
        compared += 1
    assert compared >= 50


def test_task_rewards_table():
    assert R.TASK_REWARDS == {
        "rec": {"iou": 1.0, "format": 1.0},
        "cls": {"accuracy": 1.0, "format": 1.0},
        "count": {"count": 1.0, "format": 1.0},
        "det": {"det_iou": 1.0, "det_conf": 1.0, "format": 1.0},
        "zoom": {"zoom_accuracy": 1.0, "tool_format": 0.2},
    }
    assert all(k in R.REWARDS for weights in R.TASK_REWARDS.values() for k in weights)
    assert {"count", "det_iou", "det_conf", "det_iou_sum", "det_map"} <= set(R.REWARDS)
