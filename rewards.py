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
# the progressive rule refinement (Sec. 3.3, Eq. 8). Eq. 7 sums the three parts: --reward-weights
# vr1_format=1,vr1_recall=1,vr1_precision=1. Detection and REC alike: REC is the one-box case. xi0:
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
}
# Reward weights w_k per task (r_i = sum_k w_k * R_k); override with --reward-weights.
TASK_REWARDS = {
    "rec": {"iou": 1.0, "format": 1.0},
    "cls": {"accuracy": 1.0, "format": 1.0},
    "count": {"count": 1.0, "format": 1.0},
    "det": {"det_iou": 1.0, "det_conf": 1.0, "format": 1.0},
}


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


def parse_weights(task, spec=""):
    """{reward name: w_k}: the task's weights, with `spec` ("name=w,...", a name being a built-in
    reward or path/to/file.py:function) overriding them. ValueError says in one line what is
    wrong."""
    weights = dict(TASK_REWARDS[task])
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
        elif name not in REWARDS:
            raise ValueError(
                f"unknown reward {name!r}; known: {sorted(REWARDS)}, or path/to/file.py:function"
            )
        weights[name] = w
    return weights


# ---------------------------------------------------------------------------------------------
# Held-out metrics, built on the same parsers as the rewards: one scored prediction per completion
# (score), and a task's summary of them (summarize). rec:   acc50 (IoU >= 0.5), miou, center_error,
# area_ratio, right_object, parsed_rate, format_rate cls:   accuracy (normalized exact match),
# format_rate count: accuracy (exact numeric match), mae, parsed_rate, format_rate det:   map
# (COCO-style, IoU 0.50:0.95, 101-point), ap50, ap75, pred_per_gt (#pred / #gt), parsed_rate,
# format_rate
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
        "format": format_reward(text),
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
    if task in ("cls", "count"):
        s["accuracy"] = mean(p["correct"] for p in preds)
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
