"""Fuzz the rewards: every function in rewards.REWARDS is total on any completion.

A reward that raises kills a training run hours in; one that returns nan/inf poisons the group
advantages. So on 10,000 generated adversarial completions each reward must return a finite float,
inside [0, 1] unless listed in UNBOUNDED.

What is fuzzed, and why only that: totality is promised on the *completion* (model output, anything
can come back). The ground truth comes from our own loader, so gt is drawn from what the loader can
produce: 4 finite numbers (ints or floats; inverted, zero-size, negative and ~1e308 boxes included),
positive int sizes, one of the three coord spaces or none (then "abs_original"), sometimes an
iou_threshold and (Vision-R1's Eq. 8) a penalty_threshold and a full_threshold in [0, 1]; a count gt
is a finite number or its string; a det gt is a list of 0-4 such boxes. Each reward gets the gts of
the tasks it serves (REWARD_TASKS). Outside that (an unknown coord_space, input_width 0, a missing
key, a REC box given to a det reward) raising is right: it is our bug, and must be loud.
"""

import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402

UNBOUNDED = set()  # rewards allowed outside [0, 1]; a new reward is bounded unless listed here
# the gts each reward is fed (default: rec); "accuracy" serves REC-style prompts and classification
REWARD_TASKS = {
    "accuracy": ("rec", "cls"),
    "count": ("count",),
    "det_iou": ("det",),
    "det_conf": ("det",),
    "det_iou_sum": ("det",),
    "det_map": ("det",),
    "vr1_format": ("rec", "det"),
    "vr1_recall": ("rec", "det"),
    "vr1_precision": ("rec", "det"),
    "zoom_accuracy": ("cls",),  # a label, as cls
    "tool_bonus": ("cls",),
}

# --- adversarial completions -------------------------------------------------------------------
NUMBERS = st.one_of(
    st.sampled_from(
        [
            "1e308",
            "-1e308",
            "1e999",
            "-1e999",
            "1e-400",
            "9" * 400,
            "-" + "9" * 400,
            "nan",
            "NaN",
            "-inf",
            "inf",
            "Infinity",
            "-0",
            "+7",
            "5.",
            ".5",
            "1.2.3",
            "0." + "3" * 80,
            "1_000",
            "0x1F",
            "١٢٣",
            "١٢.٥",
            "１２",
            "٣" * 400,
            "\x00",
            "",
        ]
    ),
    st.integers().map(str),
    st.floats().map(repr),  # nan, inf, subnormals, 1.7976931348623157e+308
    st.integers(0, 1000).map(str),  # plausible pixels
    # digit runs either side of float max (309 digits: finite, then inf once rescaled) and of
    # int()'s 4300
    st.builds(
        lambda d, n: d * n, st.sampled_from("19٣５"), st.sampled_from([308, 309, 400, 4300, 4301])
    ),
)
SEP = st.sampled_from([",", ", ", " ,", ",\n", " ", "，", ";", ",,"])


@st.composite
def box_text(draw):
    """[a, b, c, d] as a bare list or JSON, with plausible or absurd numbers and odd separators."""
    n = draw(st.integers(0, 6)) if draw(st.booleans()) else 4
    body = draw(SEP).join(draw(NUMBERS) for _ in range(n))
    shape = draw(
        st.sampled_from(
            [
                "[{}]",
                "[{}]",
                '{{"bbox_2d": [{}], "label": "cat"}}',
                '[{{"bbox_2d": [{}]}}]',
                "({})",
                "[[{}]]",
                "[{}",
                "{}]",
                "```json\n[{}]\n```",
            ]
        )
    )
    return shape.format(body)


FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<answer",
    "answer>",
    "</answer",
    "<ANSWER>",
    "<think></think>",
    "<answer></answer>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    rewards.TOOL_IMAGE,
    "[",
    "]",
    ",",
    "{",
    "}",
    '"bbox_2d":',
    ":",
    " ",
    "\n",
    "\x00",
    "\ufeff",
    "\u200b",
    "-",
    ".",
    "e",
]
JUNK = st.one_of(st.sampled_from(FRAGMENTS), NUMBERS, box_text(), st.text(max_size=4))
FRAGMENT_SOUP = st.lists(JUNK, max_size=30).map("".join)
# Very long strings, capped at ~40k chars: a completion is at most max_new_tokens long, and the lazy
# regexes are quadratic in the worst case ("<answer>" * 12_000, 96k chars, takes ~5 s; 12k chars 0.1
# s).
LONG = st.builds(
    lambda s, n: s * n,
    st.one_of(
        st.sampled_from(FRAGMENTS + ["9", "<answer>[1, 2, 3, 4]</answer>"]),
        st.text(min_size=1, max_size=8),
    ),
    st.integers(100, 1500),
)
NON_STR = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(),
    st.just(b"<answer>[1, 2, 3, 4]</answer>"),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers()),
)


@st.composite
def tagged(draw, answer):
    """<think>..</think><answer>ANSWER</answer> with each piece kept (mostly), dropped, doubled or
    replaced."""
    pieces = [
        "<think>",
        draw(st.text(max_size=20)),
        "</think>",
        "<answer>",
        draw(answer),
        "</answer>",
    ]
    out = [draw(st.sampled_from(["", " ", "\n"]))]
    for p in pieces:
        op = draw(st.sampled_from(["keep"] * 8 + ["drop", "double", "junk"]))
        out.append({"keep": p, "drop": "", "double": p + p, "junk": draw(JUNK)}[op])
    return "".join(out) + draw(
        st.sampled_from(["", "", "\n", " trailing", "</answer>", "<answer>"])
    )


# detection answers: JSON lists of {box, confidence} dicts; a key is read after strip().lower()
GOOD_KEYS = ["bbox_2d", "bbox", "box", "position", " box ", "BBOX_2D", "Bbox "]
DET_KEYS = st.sampled_from(GOOD_KEYS + ["label", "bbox-2d", "", "boxes"])
CONF_KEYS = st.sampled_from(["confidence", "conf", "score", " Score ", "CONFIDENCE", "prob"])
CONF = st.one_of(
    st.floats(0, 1).map(repr),
    st.sampled_from(["0", "1", "-0.1", "1.5", "NaN", "true", "null", '"0.9"']),
)
VALUE = st.one_of(
    NUMBERS, st.sampled_from(["true", "false", "null", '"7"', "[]", "{}", "[1, 2, 3, 4]"])
)
EXTRA = st.sampled_from(
    [[], [], [], ['"label": "cat"'], ['"bbox_2d": [1, 2, 3, 4]'], ['"x": {"y": [[[]]]}']]
)


@st.composite
def det_item(draw, box=None):
    """One {"box": [...], "confidence": c, ...} dict: key variants, absurd numbers, booleans, extra
    keys."""
    if box is None:
        box = draw(
            st.one_of(
                box_text(),
                st.lists(VALUE, min_size=4, max_size=4).map(lambda v: f"[{', '.join(v)}]"),
            )
        )
    fields = [f'"{draw(DET_KEYS)}": {box}'] + [f'"{draw(CONF_KEYS)}": {draw(CONF)}'] * draw(
        st.integers(0, 2)
    )
    return "{" + ", ".join(draw(st.permutations(fields + draw(EXTRA)))) + "}"


def det_list(draw, items):
    """items as a JSON list: often as is, else repeated (box spraying), fenced, nested or in a
    dict."""
    if items and draw(st.integers(0, 4)) == 0:
        items = items[:1] * draw(st.sampled_from([2, 5, 50, 500]))
    body = "[" + ", ".join(items) + "]"
    return draw(
        st.sampled_from(
            ["{}"] * 6
            + [
                " {}\n",
                "```json\n{}\n```",
                "```{}```",
                '{{"objects": {}}}',
                "[{}]",
                "[" * 3000 + "{}" + "]" * 3000,
                "[" * 3000 + "{}",
            ]
        )
    ).format(body)


@st.composite
def det_text(draw):
    return det_list(draw, draw(st.lists(det_item(), max_size=3)))


def model_scale(gt):
    """(sx, sy) from original pixels to the model's coordinate space."""
    scales = {
        "abs_resized": (gt["input_width"] / gt["width"], gt["input_height"] / gt["height"]),
        "norm1000": (1000 / gt["width"], 1000 / gt["height"]),
    }
    return scales.get(gt.get("coord_space", "abs_original"), (1.0, 1.0))


@st.composite
def near_det(draw, gt):
    """The true boxes in the model's space, nudged, some dropped, plus extras; mostly well-formed
    (one bad element zeroes the whole answer, so without this the det rewards' arithmetic would go
    untested)."""
    sx, sy = model_scale(gt)
    boxes = [
        [v * s for v, s in zip(b, (sx, sy, sx, sy))]
        for b in gt["solution"]
        if draw(st.integers(0, 5))
    ]
    boxes += draw(
        st.lists(st.sampled_from(boxes + [[0, 0, 10, 10], [5, 5, 500, 500]]), max_size=2)
    )  # extras
    items = []
    for b in draw(st.permutations(boxes)):
        nudge = draw(st.sampled_from([0, 0, 0, 1, -1, 7]))
        box = f"[{', '.join(repr(float(v + nudge)) for v in b)}]"
        if draw(st.integers(0, 5)):  # clean: a good key, a confidence or none
            conf = draw(
                st.sampled_from(["", "", ', "confidence": 0.9', ', "score": 0.3', ', "conf": 1'])
            )
            items.append(f'{{"{draw(st.sampled_from(GOOD_KEYS))}": {box}{conf}}}')
        else:
            items.append(draw(det_item(box=box)))
    return det_list(draw, items)


@st.composite
def count_text(draw, n):
    """The true count written right, almost right or wrongly."""
    v = float(n)
    right = st.sampled_from(
        [str(n), f" {n} ", f"{n} shapes", repr(v), f"There are {v:.0f}.", f"[{n}]"]
    )
    wrong = st.sampled_from(
        [f"{v:.0f} or {v + 1:.0f}", f"{v:e}", "three", f"-{n}", f"{n}{n}", f'{{"count": {n}}}']
    )
    return draw(st.one_of(right, wrong, NUMBERS))


@st.composite
def plain(draw, answer):
    """<think>..</think><answer>ANSWER</answer>, or tagged() with its pieces dropped, doubled,
    replaced."""
    a = draw(answer)
    return (
        draw(tagged(st.just(a)))
        if draw(st.integers(0, 3)) == 0
        else f"<think>ok</think><answer>{a}</answer>"
    )


@st.composite
def near_answer(draw, gt, label):
    """The true box mapped to the model's coordinate space and nudged, or the label with noise:
    without these almost every fuzzed iou/hit/accuracy would be 0 and their arithmetic would go
    untested."""
    if draw(st.integers(0, 3)) == 0:
        return draw(
            st.sampled_from(
                [label, label.upper(), f" {label}. ", label + "!", label[:-1], label * 2]
            )
        )
    sx, sy = model_scale(gt)
    box = [
        v * s + draw(st.sampled_from([0, 0, 1, -1, 7, 0.5]))
        for v, s in zip(gt["solution"], (sx, sy, sx, sy))
    ]
    fmt = draw(
        st.sampled_from(["{:.0f}", "{!r}", "{:.20f}"])
    )  # ints, floats, many decimals (300+ digits if huge)
    coords = [fmt.format(float(v)) for v in box]
    if draw(
        st.booleans()
    ):  # a well-formed box with one absurd coordinate: the parser's hardest case
        coords[draw(st.integers(0, 3))] = draw(NUMBERS)
    return draw(
        st.sampled_from(["[{}, {}, {}, {}]", '{{"bbox_2d": [{},{},{},{}], "label": "x"}}'])
    ).format(*coords)


# --- ground truths our loader can produce ------------------------------------------------------
COORD = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False))
PLAUSIBLE_BOX = st.lists(st.integers(0, 1000), min_size=4, max_size=4).map(
    lambda v: [min(v[0], v[1]), min(v[2], v[3]), max(v[0], v[1]), max(v[2], v[3])]
)
SIZE = st.one_of(st.integers(1, 2000), st.integers(1, 10**5))
ANY_BOX = st.one_of(
    PLAUSIBLE_BOX, st.lists(COORD, min_size=4, max_size=4)
)  # inverted, empty, huge, < 0
IMAGE = st.fixed_dictionaries(
    {"width": SIZE, "height": SIZE, "input_width": SIZE, "input_height": SIZE},
    optional={
        "coord_space": st.sampled_from(["abs_resized", "norm1000", "abs_original"]),
        "iou_threshold": st.floats(0, 1),
        "penalty_threshold": st.floats(0, 1),
        "full_threshold": st.floats(0, 1),
    },
)  # Vision-R1's Eq. 8 (vr1_*)
COUNT = st.one_of(
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(0, 20).map(str),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
)


@st.composite
def cases(draw):
    """(completion, {task: gt}); gts first, so that some completions answer them nearly right. The
    rec and det gts share one image, to keep the 10,000 examples fast to draw."""
    label = draw(st.one_of(st.text(), st.sampled_from(["cat", "traffic light", "Ñandú", "42"])))
    image, box = draw(IMAGE), draw(ANY_BOX)
    boxes = draw(
        st.lists(PLAUSIBLE_BOX, max_size=4)
    )  # plus, at times, the REC box (possibly absurd)
    gts = {
        "rec": {**image, "solution": box},
        "cls": {"solution": label},
        "count": {"solution": draw(COUNT)},
        "det": {
            **image,
            "solution": boxes + [box] * (len(boxes) < 4 and draw(st.integers(0, 3)) == 0),
        },
    }
    kind = draw(
        st.sampled_from(
            [
                "unicode",
                "soup",
                "tagged",
                "near",
                "near",
                "long",
                "non_str",
                "det",
                "near_det",
                "near_det",
                "count",
            ]
        )
    )
    completion = draw(
        {
            "unicode": st.text(
                st.characters(exclude_categories=())
            ),  # any code point, lone surrogates
            "soup": FRAGMENT_SOUP,
            "tagged": tagged(box_text()),
            "long": LONG,
            "non_str": NON_STR,
            "near": tagged(near_answer(gts["rec"], label)),
            "det": plain(det_text()),
            "near_det": plain(near_det(gts["det"])),
            "count": plain(count_text(gts["count"]["solution"])),
        }[kind]
    )
    return completion, gts


def check(name, r):
    assert isinstance(r, (float, int)) and not isinstance(r, bool), (name, r)
    assert math.isfinite(r), (name, r)
    assert name in UNBOUNDED or 0.0 <= r <= 1.0, (name, r)


@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(case=cases())
def test_every_reward_total_on_adversarial_completions(case):
    completion, gts = case
    # one example feeds every reward, so each reward sees all 10,000
    for name, f in rewards.REWARDS.items():
        for task in REWARD_TASKS.get(name, ("rec",)):
            check(name, f(completion, gts[task]))


GT = {
    "solution": [10, 20, 30, 40],
    "width": 100,
    "height": 100,
    "input_width": 100,
    "input_height": 100,
    "coord_space": "abs_original",
}


def test_fuzzer_categories_each_score_as_meant():
    R = rewards.REWARDS
    # a 400-digit coordinate is inf to float(); exponents are not in the box grammar; a finite 1e308
    # that overflows once rescaled: all score 0, none raises
    for big in ["9" * 400, "1e999", "1e308"]:
        assert R["iou"](f"<answer>[{big}, 20, 30, 40]</answer>", GT) == 0.0
        assert R["hit"](f"<answer>[{big}, 20, 30, 40]</answer>", GT) == 0.0
    e308 = "1" + "0" * 308
    assert (
        R["iou"](
            f"<answer>[0, 0, {e308}, 1]</answer>", {**GT, "coord_space": "norm1000", "width": 10**5}
        )
        == 0.0
    )
    assert (
        R["iou"]("<answer>[nan, 20, 30, 40]</answer>", GT) == 0.0
    )  # spelled-out nan/inf is not a number
    # re's \d and float() agree on every Unicode decimal digit (checked exhaustively): read as its
    # value
    assert R["iou"]("<answer>[١٠, ٢٠, ３０, ٤٠]</answer>", GT) == 1.0
    # an empty or punctuation-only answer never matches a label (the substring-match hack)
    for empty in ["<answer></answer>", "<answer> .,!? </answer>", "<answer>\x00</answer>"]:
        assert R["accuracy"](empty, {"solution": "cat"}) == 0.0
        assert R["accuracy"](empty, {"solution": ""}) == 0.0
    # a perfect answer that is not a str (bytes, list) scores 0 everywhere
    for not_str in [
        b"<think>x</think><answer>[10, 20, 30, 40]</answer>",
        ["<answer>[10, 20, 30, 40]</answer>"],
    ]:
        assert all(f(not_str, GT) == 0.0 for f in R.values())
    # duplicated/nested tags: the first complete <answer>..</answer> is read; format needs the whole
    # output
    assert R["iou"]("<answer><answer>[10, 20, 30, 40]</answer></answer>", GT) == 1.0
    assert (
        R["format"]("<think>a</think><answer>b</answer><answer>c</answer>") == 1.0
    )  # DOTALL: b</answer><answer>c
    assert R["format"]("<think>a</think><answer>b") == 0.0
    # gt outside the loader's contract is our bug: loud, not a silent 0
    with pytest.raises(ValueError):
        R["iou"]("<answer>[10, 20, 30, 40]</answer>", {**GT, "coord_space": "pixels"})
    with pytest.raises(ZeroDivisionError):
        R["hit"](
            "<answer>[10, 20, 30, 40]</answer>",
            {**GT, "coord_space": "abs_resized", "input_width": 0},
        )
