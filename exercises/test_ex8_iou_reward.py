"""Exercise 8: the REC IoU reward, with the coordinate space of the model family,
rewards.iou_reward."""

import rewards


def answer(box):
    return f"<think>the red circle</think><answer>{box}</answer>"


def gt(solution, space="abs_original", **extra):
    # a 256 x 128 image that the processor resized to 112 x 56
    return {
        "solution": solution,
        "width": 256,
        "height": 128,
        "input_width": 112,
        "input_height": 56,
        "coord_space": space,
        **extra,
    }


def test_partial_overlap_in_original_pixels():
    # [0, 0, 10, 10] and [5, 0, 15, 10]: intersection 50, union 150
    assert abs(rewards.iou_reward(answer([0, 0, 10, 10]), gt([5, 0, 15, 10])) - 1 / 3) < 1e-9
    # one box inside the other: 25 / 100
    assert abs(rewards.iou_reward(answer([0, 0, 10, 10]), gt([0, 0, 5, 5])) - 0.25) < 1e-9
    assert abs(rewards.iou_reward(answer([0, 0, 5, 5]), gt([0, 0, 10, 10])) - 0.25) < 1e-9
    # [0, 0, 4, 2] and [2, 0, 6, 3]: intersection 4, union 8 + 12 - 4
    assert abs(rewards.iou_reward(answer([0, 0, 4, 2]), gt([2, 0, 6, 3])) - 0.25) < 1e-9
    assert rewards.iou_reward(answer([0, 0, 10, 10]), gt([0, 0, 10, 10])) == 1.0


def test_disjoint_and_touching_boxes_score_zero():
    assert rewards.iou_reward(answer([0, 0, 10, 10]), gt([20, 20, 30, 30])) == 0.0
    assert rewards.iou_reward(answer([0, 0, 10, 10]), gt([10, 0, 20, 10])) == 0.0
    assert rewards.iou_reward(answer([0, 0, 10, 10]), gt([0, 12, 10, 20])) == 0.0


def test_qwen25_boxes_are_in_the_resized_image():
    # Qwen2.5-VL answers in pixels of the 112 x 56 input: x scales by 256/112, y by 128/56
    truth = [64, 32, 192, 96]  # original pixels
    resized = [28, 14, 84, 42]
    assert abs(rewards.iou_reward(answer(resized), gt(truth, "abs_resized")) - 1.0) < 1e-9
    assert rewards.iou_reward(answer(truth), gt(truth, "abs_resized")) < 0.5


def test_qwen2_boxes_are_in_thousandths():
    truth = [64, 32, 192, 96]  # x / 256 * 1000, y / 128 * 1000
    assert abs(rewards.iou_reward(answer([250, 250, 750, 750]), gt(truth, "norm1000")) - 1) < 1e-9
    assert rewards.iou_reward(answer(truth), gt(truth, "norm1000")) < 0.1


def test_the_threshold_of_rule_refinement():
    g = gt([5, 0, 15, 10], iou_threshold=0.3)  # IoU 1/3 counts from 0.3
    assert abs(rewards.iou_reward(answer([0, 0, 10, 10]), g) - 1 / 3) < 1e-9
    g = gt([5, 0, 15, 10], iou_threshold=0.5)
    assert rewards.iou_reward(answer([0, 0, 10, 10]), g) == 0.0
    g = gt([0, 0, 4, 2], iou_threshold=0.25)  # exactly at the threshold: it counts
    assert rewards.iou_reward(answer([0, 0, 2, 2]), g) == 0.5
    g = gt([0, 0, 4, 2], iou_threshold=0.5)
    assert rewards.iou_reward(answer([0, 0, 2, 2]), g) == 0.5


def test_no_box_or_a_degenerate_box_scores_zero():
    g = gt([0, 0, 10, 10])
    assert rewards.iou_reward("<think>x</think><answer>none</answer>", g) == 0.0
    assert rewards.iou_reward("[0, 0, 10, 10]", g) == 0.0  # not inside <answer>
    assert rewards.iou_reward(answer([10, 10, 0, 0]), g) == 0.0  # x2 < x1
    assert rewards.iou_reward(answer([0, 0, 0, 10]), g) == 0.0  # zero width
    assert rewards.iou_reward(answer([0, 0, 10, 10]), gt([0, 0, 0, 0])) == 0.0  # empty truth
