"""The zoom tool's environment for multi-turn rollouts ("thinking with images", DeepEyes, arXiv
2505.14362): read a completion's tool call, check it, crop that region of the original
image, and write what the tool turn says (the crop, or a one-line error).

A call is Qwen's tool-call format, a JSON object between <tool_call> tags,

    <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
    </tool_call>

with the box in the family's coordinate space (--coord-space: 0-1000 for Qwen2-VL, pixels of the
resized input for Qwen2.5-VL), as DeepEyes' environment reads it (verl/workers/agent/envs/
mm_process_engine/visual_toolbox_v5.py at commit 522de01: `extract_action` about line 30, the
`bbox_2d` argument about line 74, the error observation in `execute`'s except branch,
`maybe_resize_bbox` about line 131). As there, a box sticking out of the image is clipped to it and
a box thinner than one vision token (data.MIN_SIDE px) is widened about its centre; unlike there, a
box with no area in the image is an error, not a crop.

Status (issue 32, part 2): only this environment is built and tested (tests/test_tools.py). The
multi-turn rollout that would call it (--max-tool-calls), its packing with zero-weight tool turns,
and the zoom task are not built yet. Imports only rewards and data.
"""

import json
import math
import re
from dataclasses import dataclass

import data
import rewards

TOOL_NAME = "image_zoom_in_tool"
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """What the environment made of a completion's tool call."""

    box: list | None  # the region to crop, [x1, y1, x2, y2] in original-image pixels (None: error)
    error: str = ""  # the tool turn's one-line error ("": a valid call)


def find_call(text):
    """The text inside the completion's first <tool_call> ... </tool_call>, or None (no call: the
    completion answers)."""
    m = CALL.search(text)
    return None if m is None else m.group(1).strip()


def read_call(call, image_size, gt_space, calls_made=0, max_calls=1):
    """A ToolCall from `call` (find_call's text). image_size is the original (W, H); gt_space is
    {"coord_space", "input_width", "input_height"} of the family's input, as data.ground_truths
    has them. Invalid JSON, another tool, a box that is not 4 numbers, an empty box, a box outside
    the image, and a call past `max_calls` each give a one-line error; nothing raises."""
    if calls_made >= max_calls:
        return ToolCall(None, f"error: no more tool calls (at most {max_calls}); answer now")
    try:
        obj = json.loads(call)
    except ValueError as e:
        return ToolCall(None, " ".join(f"error: the tool call is not valid JSON ({e})".split()))
    args = obj.get("arguments") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("name") != TOOL_NAME or not isinstance(args, dict):
        return ToolCall(
            None, f'error: call {{"name": "{TOOL_NAME}", "arguments": {{"bbox_2d": ...}}}}'
        )
    box = args.get("bbox_2d")
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (isinstance(box, list) and len(box) == 4 and all(map(is_num, box))):
        return ToolCall(None, "error: bbox_2d must be [x1, y1, x2, y2], four numbers")
    if box[0] >= box[2] or box[1] >= box[3]:
        return ToolCall(None, f"error: the box {box} is empty (x1 < x2 and y1 < y2 are needed)")
    W, H = image_size
    x1, y1, x2, y2 = rewards.to_original_pixels(box, {"width": W, "height": H, **gt_space})
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)  # clipped to the image
    if x1 >= x2 or y1 >= y2:
        return ToolCall(None, f"error: the box {box} lies outside the image")
    return ToolCall(widened([x1, y1, x2, y2], W, H))


def widened(box, W, H, side=data.MIN_SIDE):
    """Integer pixel box holding `box`, at least `side` px a side (within a W x H image): a thinner
    crop would be less than one vision token."""
    out = []
    for lo, hi, size in ((box[0], box[2], W), (box[1], box[3], H)):
        lo, hi = math.floor(lo), math.ceil(hi)
        n = max(hi - lo, min(side, size))  # the side it gets
        lo = min(max(0, lo - (n - (hi - lo)) // 2), size - n)  # about the centre, inside
        out.append((lo, lo + n))
    (x1, x2), (y1, y2) = out
    return [x1, y1, x2, y2]


def crop(image, call):
    """The region of the original PIL `image` that a valid call names (the family's processor
    resizes it within its min and max pixels when the tool turn is encoded)."""
    return image.crop(tuple(call.box))
