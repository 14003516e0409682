"""A reward plug-in: grpo_vlm.py --task rec --reward-weights examples/centre_reward.py:centre=0.5

A plug-in is any function (completion, gt) -> float in any file; it is logged as reward_<function
name>. `gt` is the dict rewards.py documents (solution, width, height, input_width, input_height,
coord_space, iou_threshold, image, problem). rewards.py's parsers are there to reuse. If it raises,
or returns anything but a finite number, the run stops with one line naming it and the row: return
0.0 yourself for an answer you cannot score.
"""

import math

import rewards


def centre(completion, gt):
    """1 - (distance between the answered box's centre and the true box's) / image diagonal; 0
    without a box. Denser than IoU: a box that misses the target still scores more the closer it
    lands."""
    box = rewards.parse_box(completion)
    if box is None:
        return 0.0
    x1, y1, x2, y2 = rewards.to_original_pixels(box, gt)
    t = gt["solution"]
    distance = math.hypot((x1 + x2 - t[0] - t[2]) / 2, (y1 + y2 - t[1] - t[3]) / 2)
    return max(0.0, 1.0 - distance / math.hypot(gt["width"], gt["height"]))
