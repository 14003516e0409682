"""The zoom tool's environment (issue 32, part 2, tools.py) on hand-written calls: a valid call in
each coordinate space crops the right region of the original image; bad JSON, another tool, a box
that is not 4 numbers, an empty box, a box outside the image and a call past the cap each give a
one-line error and never raise."""

import os
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import tools  # noqa: E402

NORM = {"coord_space": "norm1000", "input_width": 0, "input_height": 0}
RESIZED = {"coord_space": "abs_resized", "input_width": 320, "input_height": 240}  # half of 640x480


def call(box, name=tools.TOOL_NAME):
    return f'<tool_call>{{"name": "{name}", "arguments": {{"bbox_2d": {box}}}}}</tool_call>'


def test_a_valid_call_crops_its_region_of_the_original_image():
    text = "<think>the sign is small</think>" + call([100, 200, 300, 400])
    found = tools.find_call(text)
    assert tools.read_call(found, (640, 480), NORM).box == [64, 96, 192, 192]  # 0-1000 -> px
    got = tools.read_call(found, (640, 480), RESIZED)
    assert got.box == [200, 400, 600, 480] and got.error == ""  # clipped at the bottom
    image = Image.new("RGB", (640, 480), (0, 0, 0))
    image.paste((255, 0, 0), (64, 96, 192, 192))
    zoomed = tools.crop(image, tools.read_call(found, (640, 480), NORM))
    assert zoomed.size == (128, 96) and zoomed.getcolors() == [(128 * 96, (255, 0, 0))]
    assert tools.find_call("<answer> red </answer>") is None  # no call: the completion answers


def test_a_tiny_box_is_widened_to_one_vision_token_inside_the_image():
    got = tools.read_call(tools.find_call(call([0, 0, 5, 5])), (640, 480), RESIZED)
    assert got.box == [0, 0, data.MIN_SIDE, data.MIN_SIDE]
    got = tools.read_call(tools.find_call(call([310, 100, 320, 102])), (640, 480), RESIZED)
    x1, y1, x2, y2 = got.box
    assert (x2, x2 - x1, y2 - y1) == (640, data.MIN_SIDE, data.MIN_SIDE) and y1 <= 200 < y2


def test_invalid_calls_and_a_call_past_the_cap_are_one_line_errors():
    cases = {
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}': "not valid JSON",
        call([1, 2, 3, 4], "image_rotate_tool")[11:-12]: '{"name": "image_zoom_in_tool"',
        call("[1, 2, 3]")[11:-12]: "four numbers",
        call('[1, 2, "a", 4]')[11:-12]: "four numbers",
        call([300, 200, 100, 400])[11:-12]: "is empty",
        call([10, 10, 10, 40])[11:-12]: "is empty",
        call([1100, 200, 1300, 400])[11:-12]: "lies outside the image",
        "[]": '{"name": "image_zoom_in_tool"',
        "": "not valid JSON",
    }
    for text, says in cases.items():
        got = tools.read_call(text, (640, 480), NORM)
        assert got.box is None and says in got.error and "\n" not in got.error, (text, got)
    valid = call([100, 200, 300, 400])[11:-12]
    assert tools.read_call(valid, (640, 480), NORM, calls_made=1, max_calls=2).box
    past = tools.read_call(valid, (640, 480), NORM, calls_made=2, max_calls=2)
    assert past.box is None and past.error == "error: no more tool calls (at most 2); answer now"
