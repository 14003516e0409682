"""Issue 6: bad input stops with one line naming the file and the line, or is skipped and
counted."""

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import vlm  # noqa: E402

ROW = {"image": "rgb.png", "problem": "the red square", "solution": [10, 5, 40, 30]}

# rows that must load: odd modes, a huge image, a box sticking out by less than data.BOX_SLACK
GOOD = [
    dict(ROW),
    dict(ROW, image="gray.png"),
    dict(ROW, image="rgba.png"),
    dict(ROW, image="cmyk.jpg"),
    dict(ROW, image="palette.png"),
    dict(ROW, image="huge.png", solution=[1000, 2000, 5000, 9000]),
    dict(ROW, solution=[0, 0, 64.8, 48.5]),
]


def _without(key):
    return json.dumps({k: v for k, v in ROW.items() if k != key})


# (name, JSONL line, what the message must say)
BAD = [
    ("not_json", '{"image": "rgb.png", "problem": "the red', "not valid JSON"),
    ("not_object", '["rgb.png", "the red square", [10, 5, 40, 30]]', "expected a JSON object"),
    ("no_image_key", _without("image"), "missing key 'image'"),
    ("no_problem_key", _without("problem"), "missing key 'problem'"),
    ("no_solution_key", _without("solution"), "missing key 'solution'"),
    ("image_not_string", json.dumps(dict(ROW, image=7)), "image must be a file name"),
    ("missing_file", json.dumps(dict(ROW, image="nope.png")), "nope.png' not found"),
    ("text_as_png", json.dumps(dict(ROW, image="text.png")), "is not an image file"),
    ("truncated_png", json.dumps(dict(ROW, image="truncated.png")), "is corrupt or truncated"),
    ("truncated_jpg", json.dumps(dict(ROW, image="truncated.jpg")), "is corrupt or truncated"),
    (
        "tiny_1x1",
        json.dumps(dict(ROW, image="tiny.png", solution=[0, 0, 1, 1])),
        "is 1x1; both sides must be",
    ),
    (
        "aspect_214",
        json.dumps(dict(ROW, image="wide.png", solution=[0, 0, 10, 10])),
        "is 6000x28; its aspect ratio 214 is above 200",
    ),
    ("bomb_20000x20000", json.dumps(dict(ROW, image="bomb.png")), "is too large"),
    (
        "box_3_numbers",
        json.dumps(dict(ROW, solution=[10, 5, 40])),
        "solution must be [x1, y1, x2, y2]",
    ),
    ("box_strings", json.dumps(dict(ROW, solution=["10", "5", "40", "30"])), "solution must be"),
    ("box_nested", json.dumps(dict(ROW, solution=[[10, 5, 40, 30]])), "solution must be"),
    (
        "box_nan",
        json.dumps(dict(ROW, solution=[10, float("nan"), 40, 30])),
        "got [10, NaN, 40, 30]",
    ),
    ("box_inf", json.dumps(dict(ROW, solution=[10, 5, float("inf"), 30])), "solution must be"),
    ("box_bool", json.dumps(dict(ROW, solution=[False, 5, 40, 30])), "solution must be"),
    ("box_x2_eq_x1", json.dumps(dict(ROW, solution=[40, 5, 40, 30])), "x1 < x2"),
    ("box_y2_lt_y1", json.dumps(dict(ROW, solution=[10, 30, 40, 5])), "y1 < y2"),
    (
        "box_outside",
        json.dumps(dict(ROW, solution=[10, 5, 70, 30])),
        "lies outside the 64x48 image",
    ),
    ("box_negative", json.dumps(dict(ROW, solution=[-5, 5, 40, 30])), "lies outside"),
    (
        "problem_empty",
        json.dumps(dict(ROW, problem="")),
        'problem must be a non-empty string, got ""',
    ),
    (
        "problem_blank",
        json.dumps(dict(ROW, problem=" \n\t ")),
        "problem must be a non-empty string",
    ),
    ("problem_number", json.dumps(dict(ROW, problem=42)), "got 42"),
    ("problem_null", json.dumps(dict(ROW, problem=None)), "got null"),
]


def _bomb_png(path, w, h):
    """A PNG header claiming w x h pixels: PIL refuses it on open, before reading any pixel."""
    Image.new("L", (1, 1)).save(path)
    b = bytearray(open(path, "rb").read())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    open(path, "wb").write(bytes(b))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgb = Image.merge(
        "RGB", [Image.effect_noise((64, 48), 40)] * 3
    )  # noisy, so half a PNG cuts into pixel data
    rgb.save(d / "rgb.png")
    rgb.convert("L").save(d / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", (64, 48), 0))  # fully transparent: must come out white
    rgba.save(d / "rgba.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgb.convert("P").save(d / "palette.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("RGB", (10000, 10000), (200, 30, 30)).save(
            d / "huge.png", compress_level=1
        )  # 100 MP, ~0.3 MB
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("L", (6000, 28)).save(d / "wide.png")
    _bomb_png(d / "bomb.png", 20000, 20000)
    png = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    rgb.save(d / "ok.jpg")
    jpg = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "text.png").write_text("not an image\n")
    return str(d)


@pytest.mark.parametrize("name,line,says", BAD, ids=[b[0] for b in BAD])
def test_each_bad_row_stops_with_file_and_line(root, tmp_path, name, line, says):
    path = str(tmp_path / f"{name}.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(ROW) + "\n\n" + line + "\n")  # the bad row is on line 3
    with pytest.raises(data.BadInput) as e:
        data.load_jsonl(path, root)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and says in msg and "\n" not in msg, msg


def _mixed_file(path, good=GOOD):
    """`good` and BAD interleaved; returns the line numbers of the bad rows."""
    lines = [json.dumps(r) for r in good]
    for i, (_, line, _) in enumerate(BAD):
        lines.insert(2 * i + 1, line)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [i + 1 for i, line in enumerate(lines) if line in [b[1] for b in BAD]]


def test_skip_bad_rows_keeps_the_good_ones_and_lists_each_bad_one(root, tmp_path):
    path = str(tmp_path / "mixed.jsonl")
    bad_lines = _mixed_file(path)
    rows, bad = data.load_jsonl(path, root, skip_bad_rows=True)
    assert [(r["image"], r["solution"]) for r in rows] == [
        (r["image"], r["solution"]) for r in GOOD
    ]
    assert len(bad) == len(BAD)
    for msg, lineno, (_, _, says) in zip(bad, bad_lines, BAD):
        assert msg.startswith(f"{path}:{lineno}: ") and says in msg and "\n" not in msg, msg
    assert [r["image"] for r in data.load_jsonl(path, root, skip_bad_rows=True, limit=2)[0]] == [
        "rgb.png",
        "gray.png",
    ]
    with pytest.raises(data.BadInput, match="no usable rows"):
        only_bad = tmp_path / "only_bad.jsonl"
        only_bad.write_text(BAD[0][1] + "\n")
        data.load_jsonl(str(only_bad), root, skip_bad_rows=True)


def test_odd_modes_and_huge_image_go_through_the_image_processor(root):
    _, family = vlm.load(g.TINY_MODEL)
    rows = [dict(r, image_path=os.path.join(root, r["image"])) for r in GOOD]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt, sizes = family.encode(rows)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert [s[2:] for s in sizes] == [(64, 48)] * 5 + [(10000, 10000), (64, 48)]
    assert all(
        w * h <= family.image_processor.size["longest_edge"] for w, h, _, _ in sizes
    )  # the huge one resized down
    assert len(prompt["input_ids"]) == len(rows) and prompt["pixel_values"].isfinite().all()
    assert data.load_image(os.path.join(root, "rgba.png")).getpixel((5, 5)) == (255, 255, 255)


def test_load_image_failures_are_bad_input_naming_the_file(root):
    for name, says in [
        ("truncated.jpg", "is corrupt or truncated"),
        ("text.png", "is not an image file"),
        ("nope.png", "not found"),
        ("bomb.png", "is too large"),
    ]:
        path = os.path.join(root, name)
        with pytest.raises(data.BadInput) as e:
            data.load_image(path)
        assert str(e.value).startswith(f"image '{path}' {says}"), str(e.value)


def test_eval_cli_one_line_error_or_skip_and_count(root, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    good = [r for r in GOOD if r["image"] != "huge.png"]  # the huge one costs seconds; tested above
    _mixed_file(path, good)
    out = str(tmp_path / "eval.json")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        "--data",
        path,
        "--image-root",
        root,
        "--n",
        "8",
        "--json",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: {path}:2: not valid JSON (Unterminated string starting at: column 33)"
    ], p.stderr
    for form in (
        ["--skip-bad-rows"],
        ["--skip-bad-rows", "true"],
    ):  # the same boolean forms as grpo_vlm.py
        p = subprocess.run(cmd + form, capture_output=True, text=True, cwd=ROOT, env=env)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert (
            f"skipped {len(BAD)} bad rows:" in p.stderr
            and f"... and {len(BAD) - 10} more" in p.stderr
        )
        summary = json.load(open(out))
        assert summary["bad_rows"] == len(BAD) and summary["n"] == len(good)


def test_grpo_cli_one_line_error_or_skip_and_count(root, tmp_path):
    path = str(tmp_path / "bad.jsonl")
    _mixed_file(path, [r for r in GOOD if r["image"] != "huge.png"])
    cmd = [
        sys.executable,
        os.path.join(ROOT, "grpo_vlm.py"),
        "--train-data",
        path,
        "--image-root",
        root,
        "--steps",
        "1",
        "--prompts-per-step",
        "2",
        "--num-generations",
        "2",
        "--max-completion-length",
        "8",
        "--output-dir",
        str(tmp_path / "run"),
        "--sample-every",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "step 1" not in p.stdout, p.stderr
    assert (
        p.stderr.strip().splitlines()[-1]
        == f"error: {path}:2: not valid JSON (Unterminated string starting at: column 33)"
    )
    p = subprocess.run(
        cmd + ["--skip-bad-rows", "true"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert f"skipped {len(BAD)} bad rows" in p.stdout and "step 1/1" in p.stdout
    logged = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged[0] == {"step": 0, "bad_rows": len(BAD)}


def test_an_image_that_fails_mid_run_stops_with_one_line(tmp_path, monkeypatch):
    def broken(path):
        raise data.BadInput(f"image '{path}' is corrupt or truncated (test)")

    monkeypatch.setattr(data, "load_image", broken)  # after the upfront check passed
    args = g.parse_args(
        ["--steps", "1", "--train-size", "8", "--eval-every", "0", "--output-dir", str(tmp_path)]
    )
    with pytest.raises(
        SystemExit, match=r"error: image '.*' is corrupt or truncated \(test\) \(step 1;"
    ):
        g.train(args)
