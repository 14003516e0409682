"""The zoom task (issue 32, "thinking with images"): its synthetic world, its cold-start traces,
its rewards on hand-written multi-turn completions, its tokenizer and processor; and that the
shipped tiny tokenizers did not change."""

import json
import os
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import make_tiny_model as mtm  # noqa: E402
import recipes  # noqa: E402
import rewards  # noqa: E402
import tools  # noqa: E402

R = rewards.REWARDS
SIZES = (112, 112, data.ZOOM_SIZE, data.ZOOM_SIZE)  # (input w, h, original W, H) of the tiny model
RESIZED = {"coord_space": "abs_resized", "input_width": 112, "input_height": 112}


def rows_and_gts(n, space="abs_resized", split="test"):
    """n zoom rows (with their images) and their ground truths under the tiny model's input."""
    pairs = list(data.synthetic_rows(split, n, task="zoom"))
    rows = [r for _, r in pairs]
    return [im for im, _ in pairs], rows, data.ground_truths(rows, [SIZES] * n, space)


@pytest.mark.parametrize("task", ("rec", "cls", "count", "det"))
def test_shipped_tokenizers_are_unchanged(task):
    """A new task's words must not move the ids of the shipped models' tokenizers."""
    built = mtm.build_tokenizer(task)
    shipped = AutoTokenizer.from_pretrained(
        os.path.join(ROOT, "checkpoints", f"tiny-qwen2.5-vl-{task}")
    )
    assert built.get_vocab() == shipped.get_vocab()
    # the whole tokenizer (pre-tokenizer, decoder, added tokens), less the padding and truncation
    # settings that the last encode call left in the shipped file
    whole = lambda t: {  # noqa: E731
        k: v
        for k, v in json.loads(t.backend_tokenizer.to_str()).items()
        if k not in ("padding", "truncation")
    }
    assert whole(built) == whole(shipped)


def test_the_zoom_world_is_what_its_docstring_says(tmp_path, monkeypatch):
    images, rows, _ = rows_and_gts(8)
    assert [r["solution"] for r in rows] == list(data.PATTERNS) * 2  # round-robin
    for im, r in zip(images, rows):
        assert im.size == (data.ZOOM_SIZE,) * 2 and r["problem"] == data.ZOOM_QUESTION
        (obj,) = r["objects"]
        x1, y1, x2, y2 = box = obj["box"]
        assert obj["label"] == r["solution"] and x2 - x1 == y2 - y1
        assert data.ZOOM_SIDES[0] <= x2 - x1 <= data.ZOOM_SIDES[1] and (x2 - x1) % 4 == 0
        assert min(box) > data.ZOOM_MARGIN and max(box) < data.ZOOM_SIZE - data.ZOOM_MARGIN
        px = np.asarray(im)
        square, ring = px[y1:y2, x1:x2, 0], np.asarray(im.crop((x1 - 1, y1 - 1, x2 + 1, y2 + 1)))
        bg = np.asarray(data._background(data.ZOOM_SIZE).crop((x1 - 1, y1 - 1, x2 + 1, y2 + 1)))
        ring_mask = np.ones(ring.shape[:2], bool)
        ring_mask[1:-1, 1:-1] = False
        assert (ring[ring_mask] == bg[ring_mask]).all()  # the background up to the square's edge
        assert (px[y1:y2, x1:x2] == square[..., None]).all() and square.mean() == data.GREY
        first = [data.DARK, data.LIGHT, data.LIGHT, data.DARK]  # 2 px stripes, period 4
        if r["solution"] == "solid":
            assert (square == data.GREY).all()
        elif r["solution"] == "vertical":
            assert (square == square[:1]).all() and list(square[0, :4]) == first
        elif r["solution"] == "horizontal":
            assert (square == square[:, :1]).all() and list(square[:4, 0]) == first
        else:
            dark = square == data.DARK
            assert (dark == (dark[:1] != dark[:, :1])).all()  # 2 px cells: row xor column
            inverse = [data.LIGHT, data.DARK, data.DARK, data.LIGHT]
            assert list(square[0, :4]) == inverse and list(square[1, :4]) == first
    assert data.check_solution("<answer> vertical </answer>", "zoom") == ("vertical", None)
    with pytest.raises(data.BadInput):
        data.check_solution(" ", "zoom")
    monkeypatch.setattr(data, "SYNTHETIC_ROOT", str(tmp_path))
    loaded = data.synthetic_split("test", 4, task="zoom")
    assert [r["solution"] for r in loaded] == list(data.PATTERNS)
    assert all(r["_size"] == (data.ZOOM_SIZE,) * 2 for r in loaded)
    assert all(os.path.basename(r["image"]).startswith("zoom-") for r in loaded)
    assert sorted(os.listdir(tmp_path)) == ["test", f"zoom-test-4-0-v{data.WORLD_VERSION}.jsonl"]
    assert "zoom" in data.TASKS and "zoom" in recipes.CHOICES["task"]


def pixel_levels(processor, a, b):
    """Max abs difference of two images as the model sees them (the processor's output, in grey
    levels 0-255); both images must resize to the same grid."""
    pa, pb = (processor(images=[x], return_tensors="pt")["pixel_values"].numpy() for x in (a, b))
    std = np.array(processor.image_std)[None, :, None] * 255  # the vector of a patch: channel first
    return float((abs(pa - pb).reshape(len(pa), 3, -1) * std).max())


def test_the_task_needs_the_zoom():
    """At the tiny model's input the four patterns differ by a few grey levels at the square's
    edges; in the crop that the cold-start call asks for, resized up to 112 px, by over 100."""
    processor = mtm.build_image_processor("zoom")
    _, rows, gts = rows_and_gts(3)
    full, zoomed = [], []
    for row, gt in zip(rows, gts):
        x1, y1, x2, y2 = row["objects"][0]["box"]
        ims = []
        for pattern in data.PATTERNS:
            im = data._background(data.ZOOM_SIZE).copy()
            im.paste(data._pattern(pattern, x2 - x1), (x1, y1))
            ims.append(im)
        size = (data.ZOOM_SIZE,) * 2
        call = tools.read_call(tools.find_call(data.zoom_turns(row, gt)[0]), size, RESIZED)
        crops = [tools.crop(im, call) for im in ims]
        assert grid(processor, crops[0]) == [[1, 8, 8]]  # the crop, resized up to 112 x 112
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        full.append(max(pixel_levels(processor, ims[i], ims[j]) for i, j in pairs))
        zoomed.append(min(pixel_levels(processor, crops[i], crops[j]) for i, j in pairs))
    print(f"patterns at 112 px: max diff {max(full):.0f} levels; crops: min {min(zoomed):.0f}")
    assert max(full) <= 12 and min(zoomed) >= 100


def grid(processor, image):
    """The (t, h, w) patch grid that `processor` resizes `image` to."""
    return processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist()


def test_the_zoom_processor_resizes_a_small_crop_up_and_others_keep_theirs():
    crop = data._background(data.ZOOM_SIZE).crop((0, 0, 48, 48))
    full = data._background(data.ZOOM_SIZE)
    zoom, rec = mtm.build_image_processor("zoom"), mtm.build_image_processor()
    assert grid(zoom, crop) == [[1, 8, 8]] and grid(rec, crop) == [[1, 4, 4]]
    assert grid(zoom, full) == grid(rec, full) == [[1, 8, 8]]  # 448 -> 112 either way
    assert rec.size == {"shortest_edge": 56 * 56, "longest_edge": mtm.INPUT_PIXELS}


def test_cold_start_traces():
    _, rows, gts = rows_and_gts(4)
    row, gt = {**rows[0], "objects": [{"label": "x", "box": [100, 200, 132, 232]}]}, gts[0]
    call, answer = data.zoom_turns(row, gt)  # the box +- 8 px, in model units (4 px each)
    box = "[23, 48, 35, 60]"
    assert call == (
        f"<think> the square is at {box} </think> <tool_call> "
        f'{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}} </tool_call>'
    )
    assert answer == "<think> horizontal </think> <answer> horizontal </answer>"
    direct = data.zoom_turns(row, gt, use_tool=False)
    assert direct == [f"<think> the square is at {box} </think> <answer> horizontal </answer>"]
    assert data.sft_target("zoom", row, gt) == direct[0]
    edge = {**row, "objects": [{"label": "x", "box": [2, 400, 30, 446]}]}  # clipped to the image
    assert "[0, 98, 10, 112]" in data.zoom_turns(edge, gt)[0]
    for space in ("abs_resized", "norm1000"):
        _, rows, gts = rows_and_gts(4, space)
        for row, gt in zip(rows, gts):
            first, second = data.zoom_turns(row, gt)
            space_of = {k: gt[k] for k in ("coord_space", "input_width", "input_height")}
            got = tools.read_call(tools.find_call(first), (gt["width"], gt["height"]), space_of)
            x1, y1, x2, y2 = row["objects"][0]["box"]
            assert got.error == "" and got.box[:2] <= [x1, y1] and got.box[2:] >= [x2, y2]
            assert got.box[2] - got.box[0] <= x2 - x1 + 2 * data.ZOOM_MARGIN + 4  # margin only
            for text in (first + rewards.TOOL_IMAGE + second, data.sft_target("zoom", row, gt)):
                assert R["zoom_accuracy"](text, gt) == R["tool_format"](text, gt) == 1.0
            assert R["tool_bonus"](first + rewards.TOOL_IMAGE + second, gt) == 1.0


def test_three_rows_in_four_call_the_tool_and_the_rest_cover_every_pattern():
    names = [{"image": f"train/zoom-v2-0-{i:06d}.png"} for i in range(400)]
    direct = [i for i, r in enumerate(names) if not data.zoom_uses_tool(r)]
    assert 0.2 < len(direct) / 400 < 0.3
    assert {data.PATTERNS[i % 4] for i in direct} == set(data.PATTERNS)  # round-robin labels
    assert data.zoom_uses_tool(names[direct[0]]) is False  # deterministic


def test_zoom_tokenizer_keeps_rec_ids_and_round_trips_a_tool_call():
    tok, rec = mtm.build_tokenizer("zoom"), mtm.build_tokenizer("rec").get_vocab()
    vocab = tok.get_vocab()
    assert all(vocab[t] == i for t, i in rec.items())  # the REC rows keep their ids (--init)
    for t in mtm.TOOL_TAGS + mtm.JSON_STRINGS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    _, rows, gts = rows_and_gts(4)
    for row, gt in zip(rows, gts):
        first, second = data.zoom_turns(row, gt)
        prompt = row["problem"] + data.THINK_SUFFIX
        for text in (prompt, first, second):
            assert tok.unk_token_id not in tok(text)["input_ids"], text
        decoded = tok.decode(tok(first)["input_ids"], skip_special_tokens=True)
        assert decoded != first  # the decoder spaces every token out ...
        size = (gt["width"], gt["height"])
        call, again = (tools.read_call(tools.find_call(t), size, RESIZED) for t in (first, decoded))
        assert again.error == "" and again.box == call.box  # ... and the call still reads the same
    # the first 38 tokens + EOS, then 6 + EOS: within recipes' 64
    assert [len(tok(t)["input_ids"]) for t in (first, second)] == [38, 6]
    assert recipes.TASK_DEFAULTS["zoom"]["max_completion_length"] >= 38 + 6 + 2


GT = {"solution": "vertical"}
CALL = '<think> at [1, 2, 9, 9] </think> <tool_call> {"name": "image_zoom_in_tool"} </tool_call>'
IMG, ERR = rewards.TOOL_IMAGE, "<tool_response>error: the box [9, 9, 1, 1] is empty</tool_response>"
ANSWER = "<think> stripes </think>\n<answer> Vertical. </answer>"


@pytest.mark.parametrize(
    "text, accuracy, fmt, bonus",
    [
        (ANSWER, 1, 1, 0),  # single turn, right (normalized)
        ("<think></think><answer>solid</answer>", 0, 1, 0),  # single turn, wrong
        (CALL + IMG + ANSWER, 1, 1, 1),  # zoomed, right
        (CALL + IMG + ANSWER.replace("Vertical", "solid"), 0, 1, 0),  # zoomed, wrong
        (CALL + ERR + ANSWER, 1, 1, 0),  # the call failed: no crop, no bonus
        (CALL + ERR + CALL + IMG + " " + ANSWER + " ", 1, 1, 1),  # two calls, the second crops
        ("<think>a</think><answer>vertical</answer>" + IMG + CALL, 1, 0, 1),  # answer, then call
        (
            CALL + " <answer> vertical </answer>" + IMG + ANSWER.replace("Vertical", "solid"),
            0,
            0,
            0,
        ),
        ("<think>a</think><answer>solid</answer> <answer>vertical</answer>", 1, 0, 0),  # two
        ("<think>a <answer>solid</answer> </think><answer>vertical</answer>", 1, 0, 0),  # nested
        (CALL + "<tool_response><answer>vertical</answer></tool_response><think></think>", 0, 0, 0),
        (CALL + IMG, 0, 0, 0),  # ends on a call
        (CALL + IMG + IMG + ANSWER, 1, 0, 1),  # an empty turn between two tool turns
        (CALL + IMG + "<answer> vertical </answer>", 1, 0, 1),  # a turn without <think>
        ("so: " + ANSWER, 1, 0, 0),  # text before the think
        (ANSWER + " done", 1, 0, 0),  # text after the answer
        (CALL.replace("<think> at [1, 2, 9, 9] </think>", "") + IMG + ANSWER, 1, 0, 1),
        (CALL + "<tool_response>error" + ANSWER, 1, 0, 0),  # an unclosed tool response
        ("", 0, 0, 0),
    ],
)
def test_zoom_rewards_on_hand_written_completions(text, accuracy, fmt, bonus):
    got = [R[k](text, GT) for k in ("zoom_accuracy", "tool_format", "tool_bonus")]
    assert got == [accuracy, fmt, bonus]


@pytest.mark.parametrize("value", [None, 3, b"<answer>vertical</answer>", ["<answer>vertical"]])
def test_zoom_rewards_score_non_text_zero(value):
    for k in ("zoom_accuracy", "tool_format", "tool_bonus"):
        assert R[k](value, GT) == 0.0


def test_zoom_rewards_weights_and_metrics():
    assert rewards.TASK_REWARDS["zoom"] == {"zoom_accuracy": 1.0, "tool_format": 0.2}
    deepeyes = rewards.parse_weights(
        "zoom", "only:zoom_accuracy=0.8,tool_format=0.2,tool_bonus=1.2"
    )
    assert dict(deepeyes) == {"zoom_accuracy": 0.8, "tool_format": 0.2, "tool_bonus": 1.2}
    row = {"image": "a.png", "problem": data.ZOOM_QUESTION, "solution": "vertical"}
    texts = [CALL + IMG + ANSWER, ANSWER, "<answer> solid </answer>", CALL + ERR + ANSWER]
    summary = rewards.summarize("zoom", [rewards.score("zoom", row, GT, t) for t in texts])
    assert summary == {"n": 4, "format_rate": 0.75, "accuracy": 0.75, "tool_rate": 0.25}
    values, total, _ = rewards.score_answer(
        [
            "--task",
            "zoom",
            "--truth",
            "<answer> vertical </answer>",
            "--answer",
            CALL + IMG + ANSWER,
        ]
    )
    assert values == {"zoom_accuracy": (1.0, 1.0), "tool_format": (0.2, 1.0)} and total == 1.2
