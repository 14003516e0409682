"""Rule-based, verifiable rewards: pure functions (completion text, ground truth) -> float.

Every function here is total: malformed, empty or absurd output scores 0.0 and never raises.
Ground truth `gt` is a dict; every task's gt holds what is needed to map the model's coordinates
back to original-image pixels:

    {"width": W, "height": H,                                # original image
     "input_width": w, "input_height": h,                    # image after the processor resize
     "coord_space": "abs_resized" | "norm1000" | "abs_original",
     "iou_threshold": t}                                     # optional, default 0.0 (see below)

`image` (the row's image, as written in the row) and `problem` (the prompt's text), which say which
row a completion answers; and `solution`, per task:

    rec    [x1, y1, x2, y2]                   the box, original pixels
    cls    "label"                            normalized exact match
    zoom   "pattern"                          normalized exact match (multi-turn: TOOL_IMAGE)
    count  3 | 3.0 | "3"                      a number
    det    [[x1, y1, x2, y2], ...]            the true boxes, original pixels (possibly [])

`iou_threshold` is Vision-R1's progressive rule refinement: the trainer raises it over training to
make the box rules stricter (REC IoU below it scores 0; detection matching never looser than 0.5).
The Vision-R1 rewards (vr1_*) also read "penalty_threshold" and "full_threshold", the thresholds of
their differentiation mapping (Eq. 8; default 0.5 and 0.75, the paper's first stage).
--iou-threshold-schedule sets all three by stage (refinement_stage).
"""

import importlib.util
import inspect
import json
import math
import os
import re
import sys
from typing import NamedTuple

FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUM = r"[-+]?\d+(?:\.\d+)?"
BOX_RE = re.compile(rf"\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\]")
# a whole number token: "1.2.3", ".5", "1e9", "0x1F" are not one number (they hold 0 or 2+ tokens)
NUMBER_RE = re.compile(rf"(?<![\d.]){NUM}(?!\.?\d)")
FENCE_RE = re.compile(r"\s*```(?:json)?(.*?)```\s*", re.DOTALL)
BOX_KEYS = ("bbox_2d", "bbox", "box", "position")
CONF_KEYS = ("confidence", "conf", "score")
# 0.50, ..., 0.95; pycocotools has 0.8999999999999999 for 0.9: they differ only for an IoU in
# between
COCO_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# pycocotools' recall grid bit for bit (np.linspace = i * 0.01): i / 100 differs by one ulp at 10
# points (0.35, 0.41, ..., 0.95), which decides ties such as recall 7/10 against 0.70 (COCO: not
# reached)
COCO_RECALLS = tuple(i * 0.01 for i in range(101))


def format_reward(completion, gt=None):
    """1 if the *whole* output is <think>...</think><answer>...</answer> (DOTALL), else 0."""
    return 1.0 if isinstance(completion, str) and FORMAT_RE.fullmatch(completion) else 0.0


def extract_answer(completion):
    """The text inside the first <answer>...</answer>, or None."""
    m = ANSWER_RE.search(completion) if isinstance(completion, str) else None
    return m.group(1) if m else None


def parse_box(completion):
    """The first [x1, y1, x2, y2] inside <answer> (ints or floats, JSON or a bare list), or None."""
    answer = extract_answer(completion)
    m = BOX_RE.search(answer) if answer is not None else None
    if not m:
        return None
    box = [float(v) for v in m.groups()]
    return box if all(math.isfinite(v) for v in box) else None


def to_original_pixels(box, gt):
    """Map a predicted box from the model's coordinate space to original-image pixels.

    The classic bug: Qwen2.5-VL answers in absolute pixels of the *resized* model input, Qwen2-VL in
    0-1000 normalized units; the ground truth is in original pixels. Compare only after this.
    """
    space, W, H = gt.get("coord_space", "abs_original"), gt["width"], gt["height"]
    if space == "abs_resized":
        sx, sy = W / gt["input_width"], H / gt["input_height"]
    elif space == "norm1000":
        sx, sy = W / 1000, H / 1000
    elif space == "abs_original":
        sx, sy = 1.0, 1.0
    else:
        raise ValueError(f"unknown coord_space {space!r}")
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def box_iou(a, b):
    """IoU of two [x1, y1, x2, y2] boxes; 0 for degenerate (x2 <= x1 or y2 <= y1) or non-finite
    boxes."""
    if not all(math.isfinite(v) for v in (*a, *b)):
        return 0.0
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / union if union > 0 and math.isfinite(union) else 0.0


def iou_reward(completion, gt):
    """Continuous IoU between the first answered box (rescaled to original pixels) and the truth;
    0 below gt["iou_threshold"] (Vision-R1's progressive rule refinement; default 0: plain IoU)."""
    box = parse_box(completion)
    if box is None:
        return 0.0
    iou = box_iou(to_original_pixels(box, gt), [float(v) for v in gt["solution"]])
    return iou if iou >= gt.get("iou_threshold", 0.0) else 0.0


def hit_reward(completion, gt):
    """1 if the centre of the first answered box lies inside the true box (rescaled first), else 0.

    Credits picking the right object even while the box edges are still off: with several objects,
    continuous IoU is 0 for a box on a distractor and for a box that is slightly beside the target
    alike.
    """
    box = parse_box(completion)
    if box is None:
        return 0.0
    x1, y1, x2, y2 = to_original_pixels(box, gt)
    if not (x2 > x1 and y2 > y1):  # a degenerate or inverted box points at nothing
        return 0.0
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    t = [float(v) for v in gt["solution"]]
    return 1.0 if t[0] <= cx <= t[2] and t[1] <= cy <= t[3] else 0.0


def normalize_text(s):
    """Lower-case, strip surrounding punctuation/space and collapse inner whitespace."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(s).lower()).split())


def accuracy_reward(completion, gt):
    """1 if the normalized <answer> equals the normalized solution exactly (no substring match:
    "gt in answer or answer in gt" lets an empty answer score 1)."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    a, s = normalize_text(answer), normalize_text(gt["solution"])
    return 1.0 if a and a == s else 0.0


def parse_number(completion):
    """The one number in <answer> ("3", " -2 ", "3.0", "3 shapes") as a finite float; None for no
    answer, no number, two or more ("3 or 4", "1e9") or one that overflows."""
    answer = extract_answer(completion)
    found = NUMBER_RE.findall(answer) if answer is not None else []
    if len(found) != 1:
        return None
    v = float(found[0])
    return v if math.isfinite(v) else None


def count_reward(completion, gt):
    """1 if the answered number equals the true count exactly, else 0."""
    v = parse_number(completion)
    return 1.0 if v is not None and v == float(gt["solution"]) else 0.0


def _finite(v):
    """v as a float if it is a finite int or float (bool is not a number), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:  # an int beyond float range
        return None
    return v if math.isfinite(v) else None


def _detection(item):
    """(box, confidence) from one answered dict, or None if it is malformed."""
    if not isinstance(item, dict):
        return None
    d = {}
    for k, v in item.items():  # JSON keys are str; our tokenizer may decode "box" as " box "
        d.setdefault(k.strip().lower(), v)
    box = next((d[k] for k in BOX_KEYS if k in d), None)
    conf = next((d[k] for k in CONF_KEYS if k in d), 1.0)
    if not isinstance(box, list) or len(box) != 4:
        return None
    box, conf = [_finite(v) for v in box], _finite(conf)
    if (
        None in box
        or conf is None
        or not (box[0] < box[2] and box[1] < box[3] and 0.0 <= conf <= 1.0)
    ):
        return None
    return box, conf


def parse_detections(completion):
    """The <answer> as a JSON list (optionally in a ```json fence) of {box, confidence} dicts ->
    [(box, conf)]; None if missing or if ANY element is malformed (strict, like the format
    reward)."""
    answer = extract_answer(completion)
    if answer is None:
        return None
    m = FENCE_RE.fullmatch(answer)
    try:
        items = json.loads(m.group(1) if m else answer)
    except (ValueError, RecursionError):  # not JSON, ints past int()'s digit limit, "[" * 100000
        return None
    if not isinstance(items, list):
        return None
    out = [_detection(item) for item in items]
    return None if None in out else out


def _greedy(preds, gt_boxes, thr, coco):
    """Visit predictions by confidence (descending, stable); match each to the free true box of
    highest IoU. Visual-RFT: IoU > thr, ties to the first box. COCO: IoU >= thr, ties to the last
    (its loop)."""
    order = sorted(range(len(preds)), key=lambda i: -preds[i][1])
    free, matches = list(range(len(gt_boxes))), []
    for i in order:
        best, best_iou = None, thr
        for j in free:
            iou = box_iou(preds[i][0], gt_boxes[j])
            if iou > best_iou or (coco and iou == best_iou):
                best, best_iou = j, iou
        if best is not None:
            free.remove(best)
            matches.append((i, best, best_iou))
    return matches


def match_detections(preds, gt_boxes, thr):
    """Visual-RFT's greedy matching (IoU > thr) -> [(pred_index, gt_index, iou)]; boxes in original
    pixels."""
    return _greedy(preds, gt_boxes, thr, coco=False)


def average_precision(images, thr):
    """COCO AP of one category at IoU threshold thr, pooled over images = [(preds [(box, conf)],
    gt_boxes)].

    COCO matching (IoU >= thr), precision envelope, 101-point interpolation. No true boxes at all
    (COCO says -1, undefined): 0.0 if there are predictions, 1.0 if there are none.
    """
    npos, scored = sum(len(g) for _, g in images), []
    for preds, gts in images:
        hit = {i for i, _, _ in _greedy(preds, gts, thr, coco=True)}
        scored += [(c, i in hit) for i, (_, c) in enumerate(preds)]
    if npos == 0:
        return 0.0 if scored else 1.0
    scored.sort(
        key=lambda s: -s[0]
    )  # stable: ties keep image, then answer order, as COCO's mergesort
    precision, recall, tp = [], [], 0
    for k, (_, is_tp) in enumerate(scored, 1):
        tp += is_tp
        precision.append(tp / k)
        recall.append(tp / npos)
    for k in range(len(precision) - 2, -1, -1):  # envelope: monotone non-increasing from the right
        precision[k] = max(precision[k], precision[k + 1])
    total, k = 0.0, 0
    for r in (
        COCO_RECALLS
    ):  # precision at the first point with recall >= r; 0 once recall never gets there
        while k < len(recall) and recall[k] < r:
            k += 1
        if k == len(recall):
            break
        total += precision[k]
    return total / len(COCO_RECALLS)


def mean_ap(images, thresholds=COCO_IOUS):
    """COCO mAP (mean AP over IoU thresholds), AP50 and AP75 of one category pooled over images."""
    return {
        "map": sum(average_precision(images, t) for t in thresholds) / len(thresholds),
        "ap50": average_precision(images, 0.5),
        "ap75": average_precision(images, 0.75),
    }


def _det_inputs(completion, gt):
    """(preds in original pixels, true boxes, match threshold), or None if the answer is
    malformed."""
    preds = parse_detections(completion)
    if preds is None:
        return None
    preds = [(to_original_pixels(box, gt), c) for box, c in preds]
    # progressive rule refinement: stricter over training, never looser than Visual-RFT's 0.5
    return (
        preds,
        [[float(v) for v in b] for b in gt["solution"]],
        max(0.5, gt.get("iou_threshold", 0.0)),
    )


def det_iou_reward(completion, gt):
    """Visual-RFT's IoU reward: sum of matched IoUs / max(#gt, #pred); extra boxes dilute it."""
    inputs = _det_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, gts, thr = inputs
    if not preds and not gts:
        return 1.0
    return sum(iou for *_, iou in match_detections(preds, gts, thr)) / max(len(gts), len(preds))


def det_conf_reward(completion, gt):
    """Visual-RFT's confidence reward: mean over predictions of c if matched else 1 - c."""
    inputs = _det_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, gts, thr = inputs
    if not preds:
        return 0.0 if gts else 1.0
    hit = {i for i, _, _ in match_detections(preds, gts, thr)}
    return sum(c if i in hit else 1.0 - c for i, (_, c) in enumerate(preds)) / len(preds)


def det_iou_sum_reward(completion, gt):
    """HACKABLE on purpose, do not train with it: sum of matched IoUs / #gt, no penalty for extra
    boxes.

    Kept to reproduce VLM-R1's detection reward hacking: spraying boxes never lowers it, so the
    policy learns to answer many (repeated) boxes. Use det_iou or det_map for real training.
    """
    inputs = _det_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, gts, thr = inputs
    if not gts:
        return 0.0 if preds else 1.0
    return sum(iou for *_, iou in match_detections(preds, gts, thr)) / len(gts)


def det_map_reward(completion, gt):
    """VLM-R1's length-aware reward: this image's COCO mAP * min(1, #gt / #pred); thresholds below
    gt["iou_threshold"] are raised to it (progressive rule refinement)."""
    inputs = _det_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, gts, _ = inputs
    if not preds or not gts:
        return 1.0 if not preds and not gts else 0.0
    floor = gt.get("iou_threshold", 0.0)
    ap = sum(average_precision([(preds, gts)], max(t, floor)) for t in COCO_IOUS) / len(COCO_IOUS)
    return ap * min(1.0, len(gts) / len(preds))


# ---------------------------------------------------------------------------------------------
# Vision-R1 (Zhan et al., arXiv 2503.18013): the criterion-driven reward (Sec. 3.2, Eqs. 3-7) and
# the progressive rule refinement (Sec. 3.3, Eq. 8). Eq. 7 sums the three parts, alone:
# --reward-weights only:vr1_format=1,vr1_recall=1,vr1_precision=1 (the official code's numbers:
# --preset vision-r1-zhan). Detection and REC alike: REC is the one-box case. xi0:
# a matched prediction is valid (a true positive) at IoU >= xi0   gt["iou_threshold"], never below
# 0.5 xi1, xi2: Eq. 8 maps x < xi1 to 0 and x >= xi2 to 1                  gt["penalty_threshold"],
# gt["full_threshold"] Staged progression (Sec. 3.3): (xi0, xi1, xi2) = (0.5, 0.5, 0.75) in the
# initial stage and (0.75, 0.75, 0.9) in the advanced one, from a step STEP on:
# --iou-threshold-schedule "0:0.5/0.5/0.75,STEP:0.75/0.75/0.9".
# ---------------------------------------------------------------------------------------------
VISION_R1_STAGES = ((0.5, 0.5, 0.75), (0.75, 0.75, 0.9))
_NO_MATCH = 1e9  # the cost of a pair whose cost is not a finite number (boxes past float range)


def refinement_stage(text):
    """One stage's value of --iou-threshold-schedule -> the gt keys it sets. "t": the IoU threshold
    xi0 = t alone (the Vision-R1 rewards keep Eq. 8's default thresholds); "t/lo/hi": xi0 = t and
    Eq. 8's xi1 = lo, xi2 = hi. ValueError if it is neither, if a number is not finite, or if lo >
    hi."""
    try:
        values = [float(v) for v in text.split("/")]
    except ValueError:
        values = []
    if (
        len(values) not in (1, 3)
        or not all(map(math.isfinite, values))
        or (len(values) == 3 and values[1] > values[2])
    ):
        raise ValueError(
            f"a stage's value is t or t/lo/hi, finite numbers with lo <= hi, not {text!r}"
        )
    return dict(zip(("iou_threshold", "penalty_threshold", "full_threshold"), values))


def differentiation(x, low, high):
    """Vision-R1's differentiation policy (Eq. 8): f(x) = 1 if x >= xi2 (high), 0 if x < xi1 (low),
    else x. It pushes near-misses to 0 and good enough values to 1; low = 0, high = 1 is the plain
    value on [0, 1]."""
    return 1.0 if x >= high else 0.0 if x < low else x


def _vr1_rule(gt):
    """(xi0, xi1, xi2) of a gt: the progressive rule refinement in force for this rollout."""
    _, low, high = VISION_R1_STAGES[0]
    return (
        max(0.5, gt.get("iou_threshold", 0.0)),
        gt.get("penalty_threshold", low),
        gt.get("full_threshold", high),
    )


def parse_localization(completion):
    """The answer's boxes [(box, confidence)]: a detection list (parse_detections), or REC's one
    box, a bare [x1, y1, x2, y2] or one {"bbox_2d": [...]} dict, as one prediction of confidence 1.
    None if malformed."""
    dets = parse_detections(completion)
    answer = extract_answer(completion) if dets is None else None
    if answer is None:
        return dets
    m = FENCE_RE.fullmatch(answer)
    try:
        item = json.loads(m.group(1) if m else answer)
    except (ValueError, RecursionError):
        return None
    if (
        isinstance(item, list)
        and len(item) == 4
        and not any(isinstance(v, (list, dict)) for v in item)
    ):
        item = {"box": item}
    one = _detection(item)
    return None if one is None else [one]


def _truths(gt):
    """The true boxes of a gt in original pixels: REC's one box, or detection's list."""
    sol = gt["solution"]
    if len(sol) == 4 and not isinstance(sol[0], (list, tuple)):  # REC: [x1, y1, x2, y2]
        sol = [sol]
    return [[float(v) for v in b] for b in sol]


def _box_cost(p, t, width, height):
    """The box-only cost of matching prediction p to truth t: DETR's Hungarian-matcher box terms
    with its weights, 5 x L1 of the image-normalized corners + 2 x (1 - GIoU), the class term
    dropped (Vision-R1's Eq. 3, Table 3)."""
    area = lambda b: max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])  # noqa: E731
    inter = area([max(p[0], t[0]), max(p[1], t[1]), min(p[2], t[2]), min(p[3], t[3])])
    union, hull = (
        area(p) + area(t) - inter,
        area([min(p[0], t[0]), min(p[1], t[1]), max(p[2], t[2]), max(p[3], t[3])]),
    )
    giou = (inter / union if union > 0 else 0.0) - ((hull - union) / hull if hull > 0 else 0.0)
    l1 = sum(abs(a - b) / s for a, b, s in zip(p, t, (width, height, width, height)))
    cost = 5 * l1 + 2 * (1 - giou)
    return cost if math.isfinite(cost) else _NO_MATCH


def _assignment(cost):
    """Minimum-cost assignment of every row to its own column of a rows <= columns cost matrix: the
    Hungarian method with potentials and shortest augmenting paths, O(rows^2 x columns). Returns
    each row's column."""
    n, m, inf = len(cost), len(cost[0]), float("inf")
    u, v, owner, way = (
        [0.0] * (n + 1),
        [0.0] * (m + 1),
        [0] * (m + 1),
        [0] * (m + 1),
    )  # 1-based; column 0: the root
    for i in range(1, n + 1):
        owner[0], j0, slack, used = i, 0, [inf] * (m + 1), [False] * (m + 1)
        while owner[j0]:  # grow the alternating tree from row i until it reaches a free column
            used[j0], i0, delta, j1 = True, owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    c = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if c < slack[j]:
                        slack[j], way[j] = c, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            owner[j0], j0 = owner[way[j0]], way[j0]
    col = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            col[owner[j] - 1] = j - 1
    return col


def box_prioritized_match(preds, truths, width, height):
    """Vision-R1's box-prioritized prediction matching (Eq. 3): a one-to-one Hungarian matching of
    predicted to true boxes on box cost alone (no class term) -> [(pred_index, truth_index, IoU)],
    min(#pred, #truth) pairs."""
    if not preds or not truths:
        return []
    cost = [[_box_cost(p, t, width, height) for t in truths] for p, _ in preds]
    if len(preds) <= len(truths):
        pairs = enumerate(_assignment(cost))
    else:
        pairs = ((i, j) for j, i in enumerate(_assignment([list(c) for c in zip(*cost)])))
    return [(i, j, box_iou(preds[i][0], truths[j])) for i, j in pairs]


def _vr1_inputs(completion, gt):
    """(preds in original pixels, true boxes, matches), or None if the answer is malformed."""
    preds = parse_localization(completion)
    if preds is None:
        return None
    preds, truths = [(to_original_pixels(b, gt), c) for b, c in preds], _truths(gt)
    return preds, truths, box_prioritized_match(preds, truths, gt["width"], gt["height"])


def vr1_format_reward(completion, gt):
    """Vision-R1's dual format reward (Eq. 4): 1 iff f_tem (the <answer> is the designated template:
    a JSON list of box dicts, or REC's one box) and f_cont (every box four finite numbers with x1 <
    x2, y1 < y2, inside the image with 1 px slack, and any confidence in [0, 1]), else 0. The
    <think>/<answer> frame is `format`'s."""
    preds = parse_localization(completion)
    if preds is None:
        return 0.0
    W, H = gt["width"], gt["height"]
    inside = lambda b: -1 <= b[0] and -1 <= b[1] and b[2] <= W + 1 and b[3] <= H + 1  # noqa: E731
    return 1.0 if all(inside(to_original_pixels(b, gt)) for b, _ in preds) else 0.0


def vr1_recall_reward(completion, gt):
    """Vision-R1's recall reward (Eq. 5) under Eq. 8: f(#valid matched predictions (IoU >= xi0) /
    #true boxes). No true boxes: 1 for no prediction, else 0."""
    inputs = _vr1_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, truths, matches = inputs
    if not truths:
        return 0.0 if preds else 1.0
    xi0, xi1, xi2 = _vr1_rule(gt)
    return differentiation(sum(iou >= xi0 for *_, iou in matches) / len(truths), xi1, xi2)


def vr1_precision_reward(completion, gt):
    """Vision-R1's precision reward (Eq. 6) with Eq. 8 on each instance: the sum over matched
    predictions of (IoU >= xi0) * f(IoU), over ALL M predictions, so unmatched (extra, duplicate)
    boxes count 0. No prediction: 1 if there is nothing to find, else 0."""
    inputs = _vr1_inputs(completion, gt)
    if inputs is None:
        return 0.0
    preds, truths, matches = inputs
    if not preds:
        return 0.0 if truths else 1.0
    xi0, xi1, xi2 = _vr1_rule(gt)
    return sum(differentiation(iou, xi1, xi2) for *_, iou in matches if iou >= xi0) / len(preds)


# ---------------------------------------------------------------------------------------------
# The zoom task's multi-turn completions ("thinking with images", DeepEyes, arXiv 2505.14362). A
# rollout with tool calls reaches the rewards as ONE string: the assistant turns' texts in order,
# each tool turn written between them as TOOL_IMAGE (the call returned a crop) or
# <tool_response>error: ...</tool_response> (an invalid call). A single-turn completion has none.
# ---------------------------------------------------------------------------------------------
TOOL_IMAGE = "<tool_response><image></tool_response>"
TOOL_RESPONSE_RE = re.compile(r"<tool_response>.*?</tool_response>", re.DOTALL)
# a tag's body: text holding no turn tag, so that one <answer> cannot swallow a second
_BODY = r"(?:(?!</?(?:think|answer|tool_call|tool_response)>).)*"
CALL_TURN_RE = re.compile(rf"\s*<think>{_BODY}</think>\s*<tool_call>{_BODY}</tool_call>\s*", re.S)
ANSWER_TURN_RE = re.compile(rf"\s*<think>{_BODY}</think>\s*<answer>{_BODY}</answer>\s*", re.S)


def zoom_accuracy(completion, gt):
    """1 if the last <answer>...</answer> of the assistant's turns (tool responses left out),
    normalized, equals the solution, else 0. The last, as DeepEyes reads it (Visual-Agent/DeepEyes
    at 6c5e796, verl/utils/reward_score/vl_agent.py, compute_score)."""
    answer = normalize_text(last_answer(completion) or "")
    return 1.0 if answer and answer == normalize_text(gt["solution"]) else 0.0


def last_answer(completion):
    """The text of the last <answer>...</answer> outside the tool responses, or None."""
    if not isinstance(completion, str):
        return None
    answers = ANSWER_RE.findall(TOOL_RESPONSE_RE.sub(" ", completion))
    return answers[-1] if answers else None


def tool_format(completion, gt=None):
    """1 if every assistant turn (the text between tool responses) is <think>...</think> and then
    exactly one <tool_call>...</tool_call> (a turn a tool response follows) or <answer>...</answer>
    (the last turn), with only whitespace around; else 0. DeepEyes' format term as 0/1 (its
    compute_score gives 0 or -1, on tag counts only)."""
    if not isinstance(completion, str):
        return 0.0
    *calls, last = TOOL_RESPONSE_RE.split(completion)
    ok = all(CALL_TURN_RE.fullmatch(t) for t in calls) and ANSWER_TURN_RE.fullmatch(last)
    return 1.0 if ok else 0.0


def tool_bonus(completion, gt):
    """1 if a tool call returned a crop (TOOL_IMAGE) and the answer is right (zoom_accuracy), else
    0: DeepEyes pays its tool reward only then (vl_agent.py at 6c5e796, compute_score line 261:
    `tool_reward = 1.0 if count_vision_1 > 0 and acc_reward > 0.5 else 0.0`)."""
    used = isinstance(completion, str) and TOOL_IMAGE in completion
    return 1.0 if used and zoom_accuracy(completion, gt) else 0.0


REWARDS = {
    "format": format_reward,
    "iou": iou_reward,
    "hit": hit_reward,
    "accuracy": accuracy_reward,
    "count": count_reward,
    "det_iou": det_iou_reward,
    "det_conf": det_conf_reward,
    "det_iou_sum": det_iou_sum_reward,
    "det_map": det_map_reward,
    "vr1_format": vr1_format_reward,
    "vr1_recall": vr1_recall_reward,
    "vr1_precision": vr1_precision_reward,
    "zoom_accuracy": zoom_accuracy,
    "tool_format": tool_format,
    "tool_bonus": tool_bonus,
}
# Reward weights w_k per task (r_i = sum_k w_k * R_k); override with --reward-weights.
# zoom: the answer, and the turns' format at DeepEyes' weight 0.2. DeepEyes' whole reward
# (vl_agent.py at 6c5e796, compute_score line 266: 0.8 acc + 0.2 format + 1.2 tool, its format 0 or
# -1) is --reward-weights only:zoom_accuracy=0.8,tool_format=0.2,tool_bonus=1.2, up to its looser
# format check and a constant (-0.2) that the group mean removes; --tool-bonus W adds W * tool_bonus
# to our default.
TASK_REWARDS = {
    "rec": {"iou": 1.0, "format": 1.0},
    "cls": {"accuracy": 1.0, "format": 1.0},
    "count": {"count": 1.0, "format": 1.0},
    "det": {"det_iou": 1.0, "det_conf": 1.0, "format": 1.0},
    "zoom": {"zoom_accuracy": 1.0, "tool_format": 0.2},
}


# ---------------------------------------------------------------------------------------------
# Each paper's reward as its official code computes it. A paper preset (recipes.PRESETS) names a
# recipe here: the rewards it sums, their weights, and the parsers that read the answer (RECIPES).
# Where the official parser drops a malformed element and scores the rest (Vision-R1 of Zhan et
# al., VLM-R1's odLength), so does its recipe: a departure from REFERENCE.md ("any reward on
# malformed output returns 0"), which the default rewards above keep. Each function cites the
# official file and line it follows (snapshots of om-ai-lab/VLM-R1, Liuziyu77/Visual-RFT,
# Deep-Agent/R1-V, jefferyZhan/Griffon); the code is ours.
# ---------------------------------------------------------------------------------------------
R1_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
INT_BOX = r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\]"  # four whole numbers, as VLM-R1 reads a box
# VLM-R1's REC format: a think block, then an answer holding {...[x1, y1, x2, y2]...}, anywhere
VLMR1_REC_FORMAT_RE = re.compile(
    r"<think>.*?</think>\s*<answer>.*?\{.*" + INT_BOX + r".*\}.*?</answer>", re.DOTALL
)
JSON_FENCES_RE = re.compile(r"```json(.*?)```", re.DOTALL)
UNTIL_1000 = r"(\d{1,3}|1000)"
ZHAN_ITEM_RE = re.compile(
    r'\{"bbox_2d": \[' + ", ".join([UNTIL_1000] * 4) + r'\], "label": "([^"]+)"\}'
)
MAX_DETS = 100  # COCOeval's largest maxDets, which VLM-R1's mAP (stats[0]) reads


def r1_format_reward(completion, gt=None):
    """1 if the whole output is <think>...</think> <answer>...</answer>, nothing before or after
    (re.fullmatch, DOTALL): R1-V src/r1-v/src/open_r1/grpo.py:96-100, Visual-RFT
    src/virft/src/open_r1/grpo.py:352-358, VLM-R1 src/open-r1-multimodal/src/open_r1/
    grpo_jsonl.py:882-886. Ours (`format`) also allows white space around it."""
    return 1.0 if isinstance(completion, str) and R1_FORMAT_RE.fullmatch(completion) else 0.0


def vlmr1_rec_format_reward(completion, gt=None):
    """VLM-R1's REC format (src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py:88-105):
    re.search for a think block, then an <answer> holding a {...} around [x1, y1, x2, y2] of
    whole numbers. Text may come before <think>; an answer with no box scores 0."""
    ok = isinstance(completion, str) and VLMR1_REC_FORMAT_RE.search(completion)
    return 1.0 if ok else 0.0


def vlmr1_iou_reward(completion, gt):
    """VLM-R1's REC IoU (qwen_module.py:108-176): the first [x1, y1, x2, y2] of whole numbers in
    the first <answer>, rescaled to original pixels, against the true box; the intersection counts
    only where it is more than 1 px wide and high (its min(x2) - 1 > max(x1), line 116-121)."""
    answer = extract_answer(completion)
    m = re.search(INT_BOX, answer.strip()) if answer is not None else None
    if not m:
        return 0.0
    p, t = to_original_pixels([int(v) for v in m.groups()], gt), [float(v) for v in gt["solution"]]
    w, h = min(p[2], t[2]) - max(p[0], t[0]), min(p[3], t[3]) - max(p[1], t[1])
    inter = w * h if w > 1 and h > 1 else 0.0
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    return inter / union if union and math.isfinite(union) else 0.0


def _labelled_truths(gt):
    """[(box, label)] of a gt: its boxes (_truths) with gt["labels"] ("" where there is none)."""
    boxes = _truths(gt)
    labels = list(gt.get("labels") or [])
    return [(b, str(labels[i]) if i < len(labels) else "") for i, b in enumerate(boxes)]


def od_length_reward(completion, gt):
    """VLM-R1's odLength reward (src/open-r1-multimodal/src/open_r1/grpo_jsonl.py:237-416): the
    LAST <answer>, the last ```json fence in it, a JSON list of {"bbox_2d", "label"}; COCO mAP
    (0.50:0.95) per label of the truth, averaged over those labels, with every box's score 1.0 (so
    the answer's order ranks the boxes: line 280), at most 100 boxes per label (COCOeval's maxDets);
    times min(1, #truth / #answered). An element that is not such a dict, or names a label the
    truth lacks, is dropped (line 283-284) but still counts in #answered. Truth without labels:
    one class, every box's label ignored."""
    answers = ANSWER_RE.findall(completion) if isinstance(completion, str) else []
    if not answers:
        return 0.0
    fences = JSON_FENCES_RE.findall(answers[-1].strip())
    try:
        items = json.loads(fences[-1].strip()) if fences else []
    except (ValueError, RecursionError):
        items = []
    items = items if isinstance(items, list) else []
    truths = _labelled_truths(gt)
    if not items or not truths:
        return 1.0 if not items and not truths else 0.0
    unlabelled = not any(label for _, label in truths)
    by_label = {label: [] for _, label in truths}
    for item in items:
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        label = "" if unlabelled else item.get("label") if isinstance(item, dict) else None
        box = [_finite(v) for v in box] if isinstance(box, list) and len(box) == 4 else [None]
        if None not in box and isinstance(label, str) and label in by_label:
            by_label[label].append((to_original_pixels(box, gt), 1.0))
    if not any(by_label.values()):
        return 0.0  # no detection left: VLM-R1 returns 0 (line 286-287)
    floor = gt.get("iou_threshold", 0.0)
    aps = [
        sum(
            average_precision(
                [(preds[:MAX_DETS], [b for b, lb in truths if lb == label])], max(t, floor)
            )
            for t in COCO_IOUS
        )
        / len(COCO_IOUS)
        for label, preds in by_label.items()
    ]
    return sum(aps) / len(aps) * min(1.0, len(truths) / len(items))


def _vrft_detections(completion):
    """Visual-RFT's answer, [(box, confidence)] (src/virft/src/open_r1/grpo.py:54-85, 239-262): the
    first <answer> on one line (no DOTALL), else the whole output; "[[" and "]]" made single, line
    breaks removed, a cut-off list closed after its last whole element, single quotes read as
    double; a JSON list of {"Position": [x1, y1, x2, y2], "Confidence": c}, duplicates removed.
    None where the official code raises or finds no list (its reward is then 0)."""
    if not isinstance(completion, str):
        return None
    m = re.search(r"<answer>(.*?)</answer>", completion)
    text = (m.group(1) if m else completion).strip()
    text = text.replace("[[", "[").replace("]]", "]").replace("\n", "")
    text = text if text.endswith("]") else text.rsplit("},", 1)[0] + "}]"
    try:
        items = json.loads(text.replace("'", '"'))
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return None
    out, seen = [], set()
    for item in items:
        box, conf = item.get("Position") if isinstance(item, dict) else None, None
        if isinstance(item, dict) and "Confidence" in item:
            conf = _finite(item["Confidence"])
        if not isinstance(box, list) or len(box) != 4 or conf is None:
            return None  # a KeyError or a bad unpacking in the official code: reward 0
        box = [_finite(v) for v in box]
        if None in box:
            return None
        if tuple(box) not in seen:  # remove_duplicates, line 136-149
            seen.add(tuple(box))
            out.append((box, conf))
    return out


def vrft_iou_reward(completion, gt):
    """Visual-RFT's IoU reward (grpo.py:109-134, 172-192, 214-280): predictions by confidence,
    each matched to the free true box of highest IoU if above 0.5; sum of matched IoUs / max(#truth,
    #pred), at most 1."""
    preds = _vrft_detections(completion)
    if preds is None:
        return 0.0
    preds, truths = [(to_original_pixels(b, gt), c) for b, c in preds], _truths(gt)
    thr = max(0.5, gt.get("iou_threshold", 0.0))
    total = sum(iou for *_, iou in match_detections(preds, truths, thr))
    return min(1.0, total / max(len(truths), len(preds)))


def vrft_conf_reward(completion, gt):
    """Visual-RFT's confidence reward (grpo.py:194-212, 282-350): the mean over predictions of c if
    matched, else 1 - c."""
    preds = _vrft_detections(completion)
    if preds is None:
        return 0.0
    preds, truths = [(to_original_pixels(b, gt), c) for b, c in preds], _truths(gt)
    hit = {i for i, *_ in match_detections(preds, truths, max(0.5, gt.get("iou_threshold", 0.0)))}
    return sum(c if i in hit else 1.0 - c for i, (_, c) in enumerate(preds)) / len(preds)


def _zhan_json(text):
    """Vision-R1's parse_json (Griffon Vision-R1/vision_r1/visionr1_qwen.py:30-46): a first line
    "```json..." dropped, the text cut at the next ```, then JSON; None if that fails."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    if lines[0].startswith("```json"):
        text = "\n".join(lines[1:])
    try:
        return json.loads(text.split("```")[0] if "```" in text else text)
    except (ValueError, RecursionError):
        return None


def zhan_detections(completion):
    """Vision-R1's (Zhan et al.) answer, [(box, label)] (visionr1_qwen.py:48-98): the model's own
    format, a JSON list of {"bbox_2d": [...], "label": ...} (in a ```json fence or bare), each
    coordinate cut to a whole number (int()); an element that is not a dict, or whose box is not 4
    numbers with x1 < x2 and y1 < y2, is DROPPED and the rest kept. Nothing kept: every
    {"bbox_2d": [a, b, c, d], "label": "..."} written exactly so (numbers 0-1000) anywhere in the
    text."""
    if not isinstance(completion, str):
        return []
    items, out = _zhan_json(completion.strip()), []
    for item in items if isinstance(items, list) else []:
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        if not isinstance(box, list) or len(box) != 4:
            continue
        try:
            box = [int(v) for v in box]
        except (TypeError, ValueError, OverflowError):
            continue
        if box[0] < box[2] and box[1] < box[3]:
            out.append((box, item.get("label")))
    if not out:
        for *box, label in ZHAN_ITEM_RE.findall(completion):
            box = [int(v) for v in box]
            if box[0] < box[2] and box[1] < box[3]:
                out.append((box, label))
    return out


def _giou(p, t):
    """Generalized IoU of two boxes with positive area: IoU - (hull - union) / hull."""
    area = lambda b: max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])  # noqa: E731
    inter = area([max(p[0], t[0]), max(p[1], t[1]), min(p[2], t[2]), min(p[3], t[3])])
    union = area(p) + area(t) - inter
    hull = area([min(p[0], t[0]), min(p[1], t[1]), max(p[2], t[2]), max(p[3], t[3])])
    return inter / union - (hull - union) / hull if union > 0 and hull > 0 else 0.0


def _official_map(x, low, high):
    """Vision-R1's modify_list / modify_tensor (visionr1_qwen.py:191-195, 232-239): 0 below low, 1
    ABOVE high (strictly), else x itself."""
    return 0.0 if x < low else 1.0 if x > high else x


def _zhan_matches(completion, gt):
    """(#predictions, the GIoUs of Vision-R1's BoxPriorMatcher pairs) (visionr1_qwen.py:131-189):
    a one-to-one assignment on cost L1 (pixels) - [same label] - GIoU, min(#pred, #truth) pairs;
    the pairs' GIoU (not IoU) is what the rewards read. None if nothing was parsed."""
    preds = zhan_detections(completion)
    if not preds:
        return None
    preds, truths = [(to_original_pixels(b, gt), lb) for b, lb in preds], _labelled_truths(gt)
    if not truths:
        return len(preds), []
    same = lambda a, b: bool(b) and isinstance(a, str) and a.strip().lower() == b.lower()  # noqa: E731
    cost = [
        [sum(abs(a - b) for a, b in zip(p, t)) - same(lp, lt) - _giou(p, t) for t, lt in truths]
        for p, lp in preds
    ]
    if len(preds) <= len(truths):
        pairs = enumerate(_assignment(cost))
    else:
        pairs = ((i, j) for j, i in enumerate(_assignment([list(c) for c in zip(*cost)])))
    return len(preds), [_giou(preds[i][0], truths[j][0]) for i, j in pairs]


def zhan_format_reward(completion, gt):
    """Vision-R1's dual format reward as its code computes it (visionr1_qwen.py:198-230): the text,
    "```json<newline>" and "<newline>```" removed, is JSON, and each dict element with "bbox_2d"
    and "label" has a 4-element list as its box; an inverted box still passes. With no true box:
    1 - that."""
    if not isinstance(completion, str):
        return 0.0
    try:
        items = json.loads(re.sub(r"```json\n|\n```", "", completion).strip())
        ok = not any(
            isinstance(x, dict)
            and "bbox_2d" in x
            and "label" in x
            and not (isinstance(x["bbox_2d"], list) and len(x["bbox_2d"]) == 4)
            for x in (items if isinstance(items, list) else [])
        )
    except (ValueError, RecursionError):
        ok = False
    return float(ok) if _truths(gt) else 1.0 - ok


def zhan_recall_reward(completion, gt):
    """Vision-R1's recall reward as its code computes it (visionr1_qwen.py:241-314): a pair counts
    1 if its GIoU is above xi0, 0 below, xi0 itself at xi0; their sum / #truth, mapped by 0 below
    0.5, 1 above 0.75 (these two fixed at every stage). Nothing parsed: 1 if there is nothing to
    find, else 0."""
    found, truths = _zhan_matches(completion, gt), _truths(gt)
    if found is None or not truths:
        return 1.0 if found is None and not truths else 0.0
    xi0 = max(0.5, gt.get("iou_threshold", 0.0))
    tp = sum(_official_map(g, xi0, xi0) for g in found[1])
    return _official_map(tp / len(truths), *VISION_R1_STAGES[0][1:])


def zhan_precision_reward(completion, gt):
    """Vision-R1's precision reward as its code computes it (visionr1_qwen.py:316-404): each pair's
    GIoU mapped by 0 below xi1, 1 above xi2, else itself; their mean over the PAIRS (min(#pred,
    #truth)). Nothing parsed: 1 if there is nothing to find, else 0."""
    found = _zhan_matches(completion, gt)
    if found is None or not found[1]:
        return 1.0 if found is None and not _truths(gt) else 0.0
    _, xi1, xi2 = _vr1_rule(gt)
    return sum(_official_map(g, xi1, xi2) for g in found[1]) / len(found[1])


def hard_format_result(result):
    """Vision-R1's (Huang et al.) hard formatting result reward (HFRRF): 1 only if the format is
    right AND the result is, from `result`, the task's result reward."""

    def reward(completion, gt):
        return 1.0 if format_reward(completion) and result(completion, gt) >= 1.0 else 0.0

    reward.__name__ = f"hfrrf({result.__name__})"
    return reward


class Recipe(NamedTuple):
    """A paper's reward: for each task it covers, {component: (weight, function)}; its prompts,
    {task: the user turn, {problem} the row's question} (a task not there: ours, the question then
    data.THINK_SUFFIX), and its system prompt ("": the chat template's); any
    --iou-threshold-schedule its code applies; `source`: where each comes from."""

    source: str
    rewards: dict
    prompts: dict = {}
    schedule: str = ""
    system: str = ""


R1V_PROMPT = (  # R1-V src/r1-v/src/open_r1/grpo.py:148
    "{problem}  Output the thinking process in <think> </think> and final answer (number) in "
    "<answer> </answer> tags."
)
R1_SYSTEM = (  # Visual-RFT src/virft/src/open_r1/grpo.py:368-373, 392 (a system turn)
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>"
)
OD_PROMPT = (  # VLM-R1 qwen_module.py:76-83 (odLength)
    "First thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer "
    "here </answer>\n{problem}"
)
RECIPES = {
    "vlm-r1": Recipe(
        "VLM-R1 (arXiv 2504.07615): REC qwen_module.py:73, 88-176; OVD grpo_jsonl.py:385-416, 882",
        {
            "rec": {"iou": (1.0, vlmr1_iou_reward), "format": (1.0, vlmr1_rec_format_reward)},
            "det": {"od_length": (1.0, od_length_reward), "format": (1.0, r1_format_reward)},
        },
        prompts={"det": OD_PROMPT},  # REC: ours is VLM-R1's (qwen_module.py:73)
    ),
    "visual-rft": Recipe(
        "Visual-RFT (arXiv 2503.01785): grpo.py:214-358 (det), grpo_classification.py:55-107 (cls)",
        {
            "cls": {"accuracy": (1.0, accuracy_reward), "format": (1.0, r1_format_reward)},
            "det": {
                "det_iou": (1.0, vrft_iou_reward),
                "det_conf": (1.0, vrft_conf_reward),
                "format": (1.0, r1_format_reward),
            },
        },
        prompts={"cls": "{problem}", "det": "{problem}"},
        system=R1_SYSTEM,
    ),
    "r1-v": Recipe(
        "R1-V (Deep-Agent/R1-V): src/r1-v/src/open_r1/grpo.py:53-100, 148",
        {"count": {"count": (1.0, count_reward), "format": (1.0, r1_format_reward)}},
        prompts={"count": R1V_PROMPT},
    ),
    "vision-r1-zhan": Recipe(
        "Vision-R1 (Zhan et al., arXiv 2503.18013) Eq. 7: Griffon Vision-R1/vision_r1/"
        "visionr1_qwen.py:112, 198-404; stage switch at step 1500 (lines 251, 322, 330)",
        {
            task: {
                "vr1_format": (1.0, zhan_format_reward),
                "vr1_recall": (1.0, zhan_recall_reward),
                "vr1_precision": (1.0, zhan_precision_reward),
            }
            for task in ("det", "rec")
        },
        prompts={"det": "{problem}", "rec": "{problem}"},  # no think/answer frame (423-448)
        schedule="0:0.5/0.5/0.75,1500:0.75/0.75/0.9",
    ),
    "vision-r1-huang": Recipe(
        "Vision-R1 (Huang et al., arXiv 2503.06749): HFRRF, Osilly/Vision-R1 README.md:102",
        {
            "cls": {"hfrrf": (1.0, hard_format_result(accuracy_reward))},
            "count": {"hfrrf": (1.0, hard_format_result(count_reward))},
        },
    ),
}
REWARDS["od_length"] = od_length_reward  # also a built-in: --reward-weights od_length=1
PER_LABEL = {"od_length"}  # rewards that read the truth's labels


# ---------------------------------------------------------------------------------------------
# Reward plug-ins: --reward-weights path/to/file.py:function=w adds `function` from that file as a
# component named after the function (logged as reward_<function>, like a built-in). It takes
# (completion, gt) -> float, the `gt` above. Policy: a plug-in that raises, or returns anything but
# a finite number, stops the run with one line naming the function and the row (RewardPluginError);
# a reward it did not compute is never replaced by 0.
# ---------------------------------------------------------------------------------------------
class RewardPluginError(SystemExit):
    """A reward plug-in failed on a completion: exits with status 1 and its one-line message when
    not caught."""


def _one_line(text, n=200):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def guarded(fn, label):
    """`fn` as a reward that returns a finite float or raises RewardPluginError naming `label` and
    the row."""

    def reward(completion, gt):
        try:
            value = fn(completion, gt)
            ok = not isinstance(value, (str, bytes)) and math.isfinite(float(value))
        except Exception as e:  # the plug-in's own bug, or a value float() refuses
            raise RewardPluginError(
                f"error: reward plug-in {label} raised {type(e).__name__}: {_one_line(e, 120)} "
                f"{_where(completion, gt)}"
            ) from e
        if not ok:
            raise RewardPluginError(
                f"error: reward plug-in {label} returned {_one_line(repr(value), 60)}, not a "
                f"finite number, {_where(completion, gt)}"
            )
        return float(value)

    reward.plugin = label
    return reward


def _where(completion, gt):
    problem = _one_line(gt.get("problem", ""), 10**6)
    return (
        f"on row {gt.get('image')!r} ({'...' * (len(problem) > 60) + problem[-60:]!r}), completion "
        f"{_one_line(repr(completion), 60)}; fix it and --resume from the last checkpoint"
    )


def load_plugin(spec):
    """'path/to/file.py:function' -> the function's name, with the function (guarded) added to
    REWARDS under it. ValueError says in one line what is wrong: no file, an import that fails, no
    such function, a signature that cannot take (completion, gt), or a name a built-in reward
    already has."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ValueError(f"reward plug-in {spec!r}: no file {path!r}")
    module_spec = importlib.util.spec_from_file_location(
        "reward_plugin_" + re.sub(r"\W", "_", path), path
    )
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(
            f"reward plug-in {spec!r}: importing {path} raised {type(e).__name__}: {_one_line(e)}"
        ) from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward plug-in {spec!r}: {path} has no function {name!r}")
    try:
        inspect.signature(fn).bind("completion", {})
    except TypeError:
        raise ValueError(
            f"reward plug-in {spec!r}: {name}{inspect.signature(fn)} cannot be called as "
            f"{name}(completion, gt)"
        ) from None
    if (
        name in REWARDS and getattr(REWARDS[name], "plugin", None) != spec
    ):  # a built-in, or another file's
        raise ValueError(
            f"reward plug-in {spec!r}: a reward is already called {name!r}; rename the function"
        )
    REWARDS[name] = guarded(fn, spec)
    return name


class Weights(dict):
    """{reward name: w_k}, and in `functions` each name's R_k: its recipe's own, else REWARDS'."""

    def __init__(self, weights, functions):
        super().__init__(weights)
        self.functions = functions


def function(weights, name):
    """R_k of reward `name` under `weights` (a Weights, or a plain {name: w} of built-ins)."""
    return getattr(weights, "functions", {}).get(name) or REWARDS[name]


EXACT = "only:"  # --reward-weights only:a=1,b=1: the whole reward, the defaults dropped


def recipe_rewards(task, recipe=""):
    """{name: (w_k, R_k)} of a task: its recipe's (a paper preset), else the task's defaults.
    ValueError if the recipe does not cover the task."""
    if not recipe:
        return {k: (w, REWARDS[k]) for k, w in TASK_REWARDS[task].items()}
    if recipe not in RECIPES:
        raise ValueError(f"no reward recipe {recipe!r}; known: {sorted(RECIPES)}")
    covered = RECIPES[recipe].rewards
    if task not in covered:
        raise ValueError(
            f"preset {recipe} has no reward for --task {task}; it covers {sorted(covered)}"
        )
    return covered[task]


def parse_weights(task, spec="", recipe=""):
    """Weights {reward name: w_k}: the task's (or its paper recipe's) weights, with `spec`
    ("name=w,...", a name being a built-in reward or path/to/file.py:function) overriding them, or,
    after "only:", replacing them whole. A name of the recipe keeps the recipe's function.
    ValueError says in one line what is wrong."""
    base = recipe_rewards(task, recipe)
    exact = spec.strip().startswith(EXACT)
    spec = spec.strip().removeprefix(EXACT) if exact else spec
    weights = {} if exact else {k: w for k, (w, _) in base.items()}
    functions = {k: fn for k, (_, fn) in base.items()}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, eq, w = item.rpartition("=")
        try:
            w = float(w) if eq else None
        except ValueError:
            w = None
        if w is None or not math.isfinite(w):
            raise ValueError(f"{item!r}: expected name=weight with a finite number as the weight")
        if ".py:" in name:
            name = load_plugin(name)
        elif name not in REWARDS and name not in functions:
            raise ValueError(
                f"unknown reward {name!r}; known: {sorted(REWARDS)}, or path/to/file.py:function"
            )
        weights[name] = w
    if exact and not weights:
        raise ValueError(f"{EXACT} gives the whole reward: name at least one reward after it")
    return Weights(weights, {k: functions.get(k, REWARDS.get(k)) for k in weights})


def prompt_template(task, preset=""):
    """The prompt of the paper recipe in `preset` ("a" or "a,b"): {"text": its user turn,
    "{problem}" the question, "system": its system prompt or None}; None for ours."""
    recipe = RECIPES.get(next((n.strip() for n in preset.split(",") if n.strip() in RECIPES), ""))
    if recipe is None or task not in recipe.prompts:
        return None
    return {"text": recipe.prompts[task], "system": recipe.system or None}


# ---------------------------------------------------------------------------------------------
# Held-out metrics, built on the same parsers as the rewards: one scored prediction per completion
# (score), and a task's summary of them (summarize).
#   rec:   acc50 (IoU >= 0.5), miou, center_error, area_ratio, right_object, parsed_rate,
#          format_rate
#   cls:   accuracy (normalized exact match), format_rate
#   count: accuracy (exact numeric match), mae, parsed_rate, format_rate
#   det:   map (COCO-style, IoU 0.50:0.95, 101-point), ap50, ap75, pred_per_gt (#pred / #gt),
#          parsed_rate, format_rate
#   zoom:  accuracy (zoom_accuracy), tool_rate (a crop came before the answer), format_rate,
#          useful_rate (with the tool: a crop held the whole target)
#          (tool_format)
# ---------------------------------------------------------------------------------------------
def box_metrics(pred, gt_box, width, height):
    """IoU, centre distance / image diagonal, and predicted area / true area."""
    iou = box_iou(pred, gt_box)
    cx = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
    (px, py), (tx, ty) = cx(pred), cx(gt_box)
    center = math.hypot(px - tx, py - ty) / math.hypot(width, height)
    area = lambda b: max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])  # noqa: E731
    return iou, center, area(pred) / max(area(gt_box), 1e-9)


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def score(task, row, gt, text):
    """One prediction of `task`, scored against its row; boxes go back to original pixels."""
    p = {
        "image": row["image"],
        "problem": row["problem"],
        "completion": text,
        "solution": row["solution"],
        "format": tool_format(text) if task == "zoom" else format_reward(text),
    }
    if task == "rec":
        box = parse_box(text)
        pred = to_original_pixels(box, gt) if box else None
        iou, center, area = (
            box_metrics(pred, gt["solution"], gt["width"], gt["height"])
            if pred
            else (0.0, None, None)
        )
        # which object the box overlaps most (0 = the target), when the rows list the objects
        ious = [box_iou(pred, o["box"]) for o in row.get("objects", [])] if pred else []
        chosen = max(range(len(ious)), key=ious.__getitem__) if ious and max(ious) > 0 else None
        return {
            **p,
            "pred_box": pred,
            "iou": iou,
            "center_error": center,
            "area_ratio": area,
            "chosen_object": chosen,
        }
    if task == "cls":
        return {**p, "correct": accuracy_reward(text, gt)}
    if task == "zoom":
        return {**p, "correct": zoom_accuracy(text, gt), "tool": float(TOOL_IMAGE in text)}
    if task == "count":
        return {**p, "pred": parse_number(text), "correct": count_reward(text, gt)}
    dets = parse_detections(text)  # det
    return {
        **p,
        "pred_boxes": None if dets is None else [(to_original_pixels(b, gt), c) for b, c in dets],
    }


def summarize(task, preds):
    s = {"n": len(preds)}
    if task == "rec":
        parsed = [p for p in preds if p["pred_box"] is not None]
        s.update(acc50=mean(p["iou"] >= 0.5 for p in preds), miou=mean(p["iou"] for p in preds))
        s["format_rate"] = mean(p["format"] for p in preds)
        s.update(
            parsed_rate=len(parsed) / len(preds),
            center_error=mean(p["center_error"] for p in parsed),
            area_ratio=mean(p["area_ratio"] for p in parsed),
            # of the boxes that overlap some object, the share whose best-overlapping object is the
            # target
            right_object=mean(
                p["chosen_object"] == 0 for p in parsed if p["chosen_object"] is not None
            ),
        )
        return s
    s["format_rate"] = mean(p["format"] for p in preds)
    if task in ("cls", "count", "zoom"):
        s["accuracy"] = mean(p["correct"] for p in preds)
    if task == "zoom":  # the share of answers that a crop came before
        s["tool_rate"] = mean(p["tool"] for p in preds)
    if any("useful" in p for p in preds):  # evaluation.py, with the tool: a crop held the target
        s["useful_rate"] = mean(p.get("useful", False) for p in preds)
    if task == "count":
        parsed = [p for p in preds if p["pred"] is not None]
        s.update(
            parsed_rate=len(parsed) / len(preds),
            mae=mean(abs(p["pred"] - p["solution"]) for p in parsed),
        )
    if task == "det":  # an unparsable answer predicts no boxes
        s.update(mean_ap([(p["pred_boxes"] or [], p["solution"]) for p in preds]))
        s["parsed_rate"] = mean(p["pred_boxes"] is not None for p in preds)
        s["pred_per_gt"] = sum(len(p["pred_boxes"] or []) for p in preds) / max(
            1, sum(len(p["solution"]) for p in preds)
        )
    return s


def rollout_stats(task, texts, gts):
    """Statistics of a step's sampled completions, logged beside the rewards: for det, #pred / #gt
    (VLM-R1's detection reward hacking shows as its climb)."""
    if task != "det":
        return {}
    n_pred = sum(len(parse_detections(t) or []) for t in texts)
    return {"pred_per_gt": n_pred / max(1, sum(len(gt["solution"]) for gt in gts))}


# ---------------------------------------------------------------------------------------------
# Score one answer from the command line: what does this answer get, under this recipe?
#     python rewards.py --task det --preset vision-r1-zhan --image-size 640x480 \
#         --truth '[{"bbox_2d": [10, 10, 50, 50], "label": "dog"}]' \
#         --answer '[{"bbox_2d": [7, 7, 47, 47], "label": "dog"}]'
# ---------------------------------------------------------------------------------------------
def stage_value(spec, step, default, parse=None):
    """A stage schedule "step:value,..." at `step`: the value of the last stage begun by then (read
    by `parse`)."""
    value, parse = default, parse or type(default)
    stages = (
        (int(a), parse(b)) for a, _, b in (item.partition(":") for item in spec.split(",") if item)
    )
    for start, v in sorted(stages, key=lambda stage: stage[0]):
        if step >= start:
            value = v
    return value


def read_truth(text, task):
    """(solution, labels) from --truth in any form a row's `solution` takes: JSON or text, maybe in
    <answer> tags or a ```json fence; det: boxes or {"bbox_2d" (or bbox, box), "label"} dicts.
    ValueError in one line if it is not a solution of the task."""
    tagged = ANSWER_RE.findall(text)
    body = tagged[-1].strip() if tagged else text.strip()
    fenced = FENCE_RE.fullmatch(body)
    body = fenced.group(1).strip() if fenced else body
    try:
        sol = json.loads(body)
    except ValueError:
        sol = body
    box = lambda b: isinstance(b, list) and len(b) == 4 and None not in map(_finite, b)  # noqa: E731
    if task == "rec" and box(sol):
        return [float(v) for v in sol], []
    if task == "det" and isinstance(sol, list):
        key = lambda d: next((d[k] for k in ("bbox_2d", "bbox", "box") if k in d), None)  # noqa: E731
        boxes = [key(d) if isinstance(d, dict) else d for d in sol]
        if all(box(b) for b in boxes):
            labels = [str(d.get("label", "")) if isinstance(d, dict) else "" for d in sol]
            return [[float(v) for v in b] for b in boxes], labels
    if task in ("cls", "zoom") and str(sol).strip():
        return str(sol), []
    if (
        task == "count"
        and _finite(sol) is not None
        or task == "count"
        and NUMBER_RE.fullmatch(str(sol).strip())
    ):
        return float(sol), []
    forms = {
        "rec": "[x1, y1, x2, y2]",
        "det": 'a list of [x1, y1, x2, y2] or {"bbox_2d": [...], "label": ...}',
        "cls": "a label",
        "zoom": "a label",
        "count": "a number",
    }
    raise ValueError(f"--truth {text[:80]!r} is not a {task} solution: expected {forms[task]}")


def _size(text, flag):
    w, x, h = text.lower().partition("x")
    if not (x and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise ValueError(f"{flag} {text!r}: expected WxH, e.g. 640x480")
    return int(w), int(h)


def score_answer(argv=None):
    """Parse the command line, score --answer against --truth; {name: (w, value)} and the total.
    ValueError in one line on a bad flag value."""
    import argparse

    p = argparse.ArgumentParser(
        prog="rewards.py", description="Score one answer: each reward component, then the total."
    )
    p.add_argument("--task", default="rec", choices=sorted(TASK_REWARDS))
    p.add_argument("--preset", default="", help=f"a paper's reward recipe: {sorted(RECIPES)}")
    p.add_argument("--reward-weights", default="", help="as grpo_vlm.py's ('only:' replaces)")
    p.add_argument("--truth", required=True, help="the row's solution, in any form a row takes")
    p.add_argument("--answer", required=True, help="the completion text")
    p.add_argument("--image-size", default="640x480", help="the original image, WxH")
    p.add_argument(
        "--input-size", default="", help="the model's resized input, WxH (default: same)"
    )
    p.add_argument(
        "--coord-space", default="abs_original", choices=("abs_resized", "norm1000", "abs_original")
    )
    p.add_argument("--step", type=int, default=0, help="apply the schedules at this step")
    p.add_argument("--iou-threshold-schedule", default="", help="as grpo_vlm.py's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    recipes_given = [x for x in a.preset.split(",") if x in RECIPES]
    unknown = [x for x in a.preset.split(",") if x and x not in RECIPES]
    if unknown or len(recipes_given) > 1:
        raise ValueError(f"--preset {a.preset!r}: give one of {sorted(RECIPES)}")
    recipe = recipes_given[0] if recipes_given else ""
    weights = parse_weights(a.task, a.reward_weights, recipe)
    solution, labels = read_truth(a.truth, a.task)
    per_label = sorted(PER_LABEL & set(weights))
    if per_label and not any(labels):
        raise ValueError(f"{per_label[0]} scores per label: give each true box a label in --truth")
    W, H = _size(a.image_size, "--image-size")
    w, h = _size(a.input_size, "--input-size") if a.input_size else (W, H)
    schedule = a.iou_threshold_schedule or (RECIPES[recipe].schedule if recipe else "")
    rule = stage_value(schedule, a.step, {"iou_threshold": 0.0}, refinement_stage)
    gt = {"solution": solution, "labels": labels, "width": W, "height": H, "input_width": w}
    gt.update(input_height=h, coord_space=a.coord_space, **rule)
    gt.update(image="--truth", problem="")
    values = {k: (wk, function(weights, k)(a.answer, gt)) for k, wk in weights.items()}
    return values, sum(wk * v for wk, v in values.values()), a.json


def main(argv=None):
    """python rewards.py ...: one line per component, `NAME weight W value V`, then `total T`."""
    try:
        values, total, as_json = score_answer(argv)
    except (ValueError, RewardPluginError) as e:
        msg = str(e) if str(e).startswith("error:") else f"error: {e}"
        print(msg, file=sys.stderr)
        return 2
    if as_json:
        comps = {k: {"weight": w, "value": v} for k, (w, v) in values.items()}
        print(json.dumps({"components": comps, "total": total}))
    else:
        for k, (w, v) in values.items():
            print(f"{k} weight {w:g} value {v:.6g}")
        print(f"total {total:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
