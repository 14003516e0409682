"""Rule-based, verifiable rewards: pure functions (completion text, ground truth) -> float.

Every function here is total: malformed, empty or absurd output scores 0.0 and never raises.
Ground truth `gt` is a dict; for REC it holds the box in original-image pixels and what is needed to
map the model's coordinates back to those pixels:

    {"solution": [x1, y1, x2, y2], "width": W, "height": H,          # original image
     "input_width": w, "input_height": h,                             # image after the processor resize
     "coord_space": "abs_resized" | "norm1000" | "abs_original"}
"""

import math
import re

FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUM = r"[-+]?\d+(?:\.\d+)?"
BOX_RE = re.compile(rf"\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\]")


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
    """IoU of two [x1, y1, x2, y2] boxes; 0 for degenerate (x2 <= x1 or y2 <= y1) or non-finite boxes."""
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
    """Continuous IoU between the first answered box (rescaled to original pixels) and the truth."""
    box = parse_box(completion)
    if box is None:
        return 0.0
    return box_iou(to_original_pixels(box, gt), [float(v) for v in gt["solution"]])


def hit_reward(completion, gt):
    """1 if the centre of the first answered box lies inside the true box (rescaled first), else 0.

    Credits picking the right object even while the box edges are still off: with several objects,
    continuous IoU is 0 for a box on a distractor and for a box that is slightly beside the target alike.
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


REWARDS = {"format": format_reward, "iou": iou_reward, "hit": hit_reward, "accuracy": accuracy_reward}
# Reward weights w_k per task (r_i = sum_k w_k * R_k); override with --reward-weights.
TASK_REWARDS = {"rec": {"iou": 1.0, "format": 1.0}}
