"""Issue 18: the public data formats load as they are, small datasets train, long prompts are
refused upfront, --eval-data is evaluated during training.

Each format is written here by the test, for REC and for count: problem/solution JSONL (solution as
text), VLM-R1 `conversations` JSONL, chat `messages` JSONL, R1-V-style parquet (image as a {bytes,
path} struct), an Arrow file, a datasets save_to_disk folder (EasyR1 keys: problem/answer/images),
and a hub dataset (a stand-in `datasets` module).
"""

import io
import json
import os
import random
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import vlm  # noqa: E402

TINY = [
    "--steps",
    "2",
    "--num-generations",
    "2",
    "--max-completion-length",
    "8",
    "--sample-every",
    "0",
    "--save-every",
    "0",
]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _items(task, n=2):
    """(file name, PNG bytes, problem, solution as the rewards take it, solution as text) of n
    synthetic rows."""
    out = []
    for i, (im, row) in enumerate(data.synthetic_rows("test", n, task=task)):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        sol = row["solution"]
        text = (
            json.dumps(sol) if task == "rec" else f"<answer> {sol} </answer>"
        )  # "[x1, y1, x2, y2]", R1-V's count
        out.append(
            (
                f"{task}-{i}.png",
                buf.getvalue(),
                row["problem"],
                float(sol) if task == "count" else sol,
                text,
            )
        )
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_all(d, task):
    """Every local format in folder d, two rows each (the same two images and answers); returns
    {format: path}."""
    items = _items(task)
    (d / "imgs").mkdir(exist_ok=True)
    for name, png, *_ in items:
        (d / "imgs" / name).write_bytes(png)
    (fa, png_a, qa, _, ta), (fb, png_b, qb, _, tb) = items
    f = {}
    f["plain"] = _jsonl(
        d / "plain.jsonl",
        [
            {"image": fa, "problem": qa, "solution": ta},
            {"image": fb, "problem": qb, "solution": tb},
        ],
    )
    f["conversations"] = _jsonl(
        d / "conv.jsonl",
        [
            {
                "id": 1,
                "image": fa,
                "conversations": [
                    {"from": "human", "value": "<image>" + qa},
                    {"from": "gpt", "value": ta},
                ],
            },
            {
                "id": 2,
                "image": [fb],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + qb},
                    {"from": "gpt", "value": tb},
                ],
            },
        ],
    )
    f["messages"] = _jsonl(
        d / "chat.jsonl",
        [  # the last assistant message; an `answer` field with a string content
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa}]},
                    {"role": "assistant", "content": ta},
                ],
                "images": [fa],
            },
            {
                "messages": [{"role": "user", "content": "<image>" + qb}],
                "answer": tb,
                "images": [fb],
            },
        ],
    )
    f["parquet"] = str(
        d / "r1v.parquet"
    )  # R1-V / Visual-RFT: image struct {bytes, path}, problem, solution text
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": png_a, "path": fa}, {"bytes": png_b, "path": fb}], IMAGE
                ),
                "problem": [qa, qb],
                "solution": [ta, tb],
            }
        ),
        f["parquet"],
    )
    f["arrow"] = str(d / "rows.arrow")  # an Arrow IPC file; the image as plain bytes
    table = pa.table(
        {"image": pa.array([png_a, png_b], pa.binary()), "problem": [qa, qb], "solution": [ta, tb]}
    )
    with pa.ipc.new_file(f["arrow"], table.schema) as w:
        w.write_table(table)
    f["saved"] = str(
        d / "saved"
    )  # datasets' save_to_disk: an Arrow stream file + state.json; EasyR1's keys
    os.makedirs(f["saved"], exist_ok=True)
    table = pa.table(
        {
            "images": pa.array(
                [[{"bytes": png_a, "path": None}], [{"bytes": png_b, "path": None}]],
                pa.list_(IMAGE),
            ),
            "problem": [qa, qb],
            "answer": [ta, tb],
        }
    )
    with pa.ipc.new_stream(
        os.path.join(f["saved"], "data-00000-of-00001.arrow"), table.schema
    ) as w:
        w.write_table(table)
    json.dump(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None},
        open(os.path.join(f["saved"], "state.json"), "w"),
    )
    json.dump({"features": {}}, open(os.path.join(f["saved"], "dataset_info.json"), "w"))
    return f, items


@pytest.fixture(scope="module", params=["rec", "count"])
def formats(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    f, items = _write_all(d, request.param)
    return request.param, d, f, items


def test_every_format_loads_the_same_rows(formats):
    task, d, f, items = formats
    for name, path in f.items():
        rows, bad = data.load_data(path, str(d / "imgs"), task)
        assert not bad and len(rows) == 2, name
        for r, (img, png, problem, sol, _) in zip(rows, items):
            assert (r["problem"].strip(), r["solution"], r["_size"]) == (
                problem,
                sol,
                (128, 128),
            ), (name, r)
            assert (
                data.load_image(r["image_path"]).tobytes()
                == data.load_image(io.BytesIO(png)).tobytes()
            ), name
            json.dumps(r["image"])  # the name eval.py writes with each prediction
        assert rows[0]["_where"] == f"{path}:1"


def test_hub_dataset_id(formats, monkeypatch):
    """A hub id (a path that does not exist) goes through datasets.load_dataset, imported only then;
    here a stand-in module serves the parquet table. Without `datasets` it is one line."""
    task, d, f, items = formats
    asked, corrupt = [], [s[1] for s in _bad_sources(d) if s[0] == "parquet"][0]

    class Dataset:  # as much of datasets.Dataset as data.hub_table uses
        def __init__(self, path):
            self.path = path

        def with_format(self, kind):
            assert kind == "arrow"
            return self

        def __getitem__(self, rows):
            assert rows == slice(None)
            return pq.read_table(self.path)

    def load_dataset(repo, split):
        asked.append((repo, split))
        return Dataset(corrupt if repo == "someone/bad" else f["parquet"])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows, _ = data.load_data("someone/r1v-data", "", task)
    rows2, _ = data.load_data("someone/r1v-data/validation", "", task)
    assert asked == [("someone/r1v-data", "train"), ("someone/r1v-data", "validation")]
    assert (
        [r["solution"] for r in rows] == [r["solution"] for r in rows2] == [it[3] for it in items]
    )
    assert rows[1]["image"] == "someone/r1v-data:2"
    with pytest.raises(
        data.BadInput, match=r"^someone/bad:2: image 'someone/bad:2' is [^\n]*$"
    ):  # a bad row
        data.load_data("someone/bad", "", "rec")  # (the corrupt table holds REC rows)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(
        data.BadInput,
        match=r"^someone/r1v-data: no such file or folder; as a hub dataset id it "
        r"needs `pip install datasets`$",
    ):
        data.load_data("someone/r1v-data", "", task)


def test_every_format_trains_and_eval_data_is_logged(formats, tmp_path):
    """Each format's rows (joined by ':', one image folder for all) in one 2-step run whose batch
    holds all of them, with --eval-data in yet another format, evaluated at steps 0 and 2 with the
    task's metrics."""
    task, d, f, items = formats
    joined = ":".join(
        f[k] for k in ("plain", "conversations", "messages", "parquet", "arrow", "saved")
    )
    evaluated = f["conversations"] if task == "rec" else f["parquet"]
    args = g.parse_args(
        [
            "--task",
            task,
            "--train-data",
            joined,
            "--image-root",
            str(d / "imgs"),
            *TINY,
            "--prompts-per-step",
            "12",
            "--eval-data",
            evaluated,
            "--eval-every",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert len(data.load_rows(args)[0]) == 12  # so each step's batch is every row of every format
    g.train(args)
    logged = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    key = {"rec": "eval_acc50", "count": "eval_accuracy"}[task]
    assert [r["step"] for r in logged if key in r] == [0, 2] and [
        r["step"] for r in logged if "reward" in r
    ] == [1, 2]
    assert all(0 <= r[key] <= 1 for r in logged if key in r)


def test_image_folders_joined_by_colon(formats, tmp_path):
    """VLM-R1's --image_folders: one folder per data file; a count that matches neither is one
    line."""
    task, d, f, items = formats
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name, png, *_ in items:
        (other / name).write_bytes(png)
    rows, _ = data.load_data(f["plain"] + ":" + f["conversations"], f"{d / 'imgs'}:{other}", task)
    assert [r["image_path"] for r in rows] == [
        str(d / "imgs" / items[0][0]),
        str(d / "imgs" / items[1][0]),
        str(other / items[0][0]),
        str(other / items[1][0]),
    ]
    with pytest.raises(data.BadInput, match="2 data sources but 3 image folders"):
        data.load_data(f["plain"] + ":" + f["conversations"], f"{d}:{other}:{tmp_path}", task)


def test_solution_as_text_for_every_task():
    assert data.check_solution("[10, 10, 100, 100]", "rec") == ([10, 10, 100, 100], None)
    assert data.check_solution("<answer> [10, 10, 100, 100] </answer>", "rec") == (
        [10, 10, 100, 100],
        None,
    )
    assert data.check_solution("<answer> 3 </answer>", "count") == (3.0, None)
    assert data.check_solution("<think> two and one </think> <answer>3</answer>", "count") == (
        3.0,
        None,
    )
    assert data.check_solution("<answer> tabby cat </answer>", "cls") == ("tabby cat", None)
    assert data.check_solution("tabby cat", "cls") == ("tabby cat", None)
    det = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]\n```'  # VLM-R1's OVD solution
    assert data.check_solution(det, "det") == ([[1, 2, 30, 40]], ["cat"])
    assert data.check_solution("<answer>[[5, 5, 9, 9]]</answer>", "det") == ([[5, 5, 9, 9]], [""])
    for sol, task in (
        ("[10, 10, 100", "rec"),
        ("<answer> three </answer>", "count"),
        ("<answer> </answer>", "cls"),
    ):
        with pytest.raises(data.BadInput, match="solution must be"):
            data.check_solution(sol, task)


def test_key_flags(tmp_path):
    """--problem-key, --solution-key, --image-key name other columns (here an image as raw
    bytes)."""
    ((_, png, problem, sol, text),) = _items("count", 1)
    path = str(tmp_path / "custom.parquet")
    pq.write_table(
        pa.table({"img": pa.array([png], pa.binary()), "query": [problem], "label": [text]}), path
    )
    with pytest.raises(
        data.BadInput,
        match=r"custom.parquet:1: missing keys 'image' \(or 'images'\), 'problem' "
        r"\(or 'question'\), 'solution' \(or 'answer'\)$",
    ):
        data.load_data(path, "", "count")
    args = g.parse_args(
        [
            "--task",
            "count",
            "--train-data",
            path,
            "--problem-key",
            "query",
            "--solution-key",
            "label",
            "--image-key",
            "img",
        ]
    )
    rows, _ = data.load_rows(args)
    assert (rows[0]["problem"], rows[0]["solution"]) == (problem, sol)
    with pytest.raises(
        SystemExit, match=r"custom.parquet:1: missing key 'answer_text' \(--solution-key\)$"
    ):
        data.load_rows(
            g.parse_args(
                [
                    "--task",
                    "count",
                    "--train-data",
                    path,
                    "--problem-key",
                    "query",
                    "--solution-key",
                    "answer_text",
                    "--image-key",
                    "img",
                ]
            )
        )


def _bad_sources(d):
    """(format, path, the line's start, what it must say): one bad row (the second) in each format,
    and, in the chat formats, image placeholders that do not match the row's images."""
    ((a, png, problem, _, text),) = _items("rec", 1)
    (d / a).write_bytes(png)
    good = {"image": a, "problem": problem, "solution": text}
    out = [
        (
            "plain",
            _jsonl(d / "p.jsonl", [good, dict(good, solution="[10, 5")]),
            2,
            "solution must be [x1, y1",
        ),
        (
            "conversations",
            _jsonl(
                d / "c.jsonl",
                [
                    good,
                    {
                        "image": a,
                        "conversations": [{"from": "human", "value": "<image>" + problem}],
                    },
                ],
            ),
            2,
            "needs a human turn and a gpt turn after it",
        ),
        (
            "messages",
            _jsonl(
                d / "m.jsonl",
                [
                    good,
                    {"images": [a], "messages": [{"role": "user", "content": "<image>" + problem}]},
                ],
            ),
            2,
            "no solution: no 'solution' or 'answer'",
        ),
        (
            "several, conversations",
            _jsonl(
                d / "c2.jsonl",
                [
                    {
                        "image": a,
                        "conversations": [
                            {"from": "human", "value": "<image><image>" + problem},
                            {"from": "gpt", "value": text},
                        ],
                    }
                ],
            ),
            1,
            "2 image placeholders but 1 image(s) in the row",
        ),
        (
            "several, messages",
            _jsonl(
                d / "m2.jsonl",
                [
                    {
                        "images": [a],
                        "solution": text,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image"},
                                    {"type": "image"},
                                    {"type": "text", "text": "x"},
                                ],
                            }
                        ],
                    }
                ],
            ),
            1,
            "2 image placeholders but 1 image(s) in the row",
        ),
    ]
    path = str(d / "corrupt.parquet")
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": png, "path": None}, {"bytes": png[:40], "path": None}], IMAGE
                ),
                "problem": [problem] * 2,
                "solution": [text] * 2,
            }
        ),
        path,
    )
    out.append(("parquet", path, 2, f"image '{path}:2' is "))
    path = str(d / "empty-list.parquet")
    pq.write_table(
        pa.table(
            {
                "images": pa.array([[{"bytes": png, "path": None}], []], pa.list_(IMAGE)),
                "problem": [problem] * 2,
                "solution": [text] * 2,
            }
        ),
        path,
    )
    out.append(("empty list, parquet", path, 2, "the row's image list is empty"))
    path = str(d / "outside.arrow")
    table = pa.table(
        {
            "image": pa.array([png, png], pa.binary()),
            "problem": [problem] * 2,
            "solution": [text, "[0, 0, 500, 60]"],
        }
    )
    with pa.ipc.new_stream(path, table.schema) as w:
        w.write_table(table)
    out.append(("arrow", path, 2, "lies outside the 128x128 image"))
    return out


def test_several_images_in_each_format_load(tmp_path):
    """Issue 32: VLM-R1's image list with its <image> placeholders, a chat row with several image
    parts, and an HF table's image list load, for count, cls and rec, all images in order; a
    rec box refers to the first image (one inside the second image only is refused)."""
    from PIL import Image

    for task in ("count", "cls", "rec"):
        (a, png, problem, _, text), (b, png2, *_) = _items(task, 2)
        (tmp_path / a).write_bytes(png)
        (tmp_path / b).write_bytes(png2)
        human = {"from": "human", "value": "<image><image>" + problem}
        parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": problem}]
        embedded = [{"bytes": png, "path": None}, {"bytes": png2, "path": None}]
        sources = [
            _jsonl(
                tmp_path / f"{task}-c.jsonl",
                [{"image": [a, b], "conversations": [human, {"from": "gpt", "value": text}]}],
            ),
            _jsonl(
                tmp_path / f"{task}-m.jsonl",
                [
                    {
                        "images": [a, b],
                        "solution": text,
                        "messages": [{"role": "user", "content": parts}],
                    }
                ],
            ),
            str(tmp_path / f"{task}.parquet"),
        ]
        table = {"images": pa.array([embedded], pa.list_(IMAGE)), "problem": [problem]}
        pq.write_table(pa.table({**table, "solution": [text]}), sources[2])
        for path in sources:
            (row,), bad = data.load_data(path, str(tmp_path), task)
            assert not bad and row["problem"] == problem.replace("<image>", "").strip(), path
            assert len(row["image_paths"]) == 2 and row["image_path"] == row["image_paths"][0]
            opened = [data.load_image(p).tobytes() for p in data.row_images(row)]
            assert opened == [
                Image.open(io.BytesIO(x)).convert("RGB").tobytes() for x in (png, png2)
            ]
            assert row["_sizes"] == [data.image_size(p) for p in row["image_paths"]]
            assert row["_size"] == row["_sizes"][0]
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64)).save(small)
    far = {"image": [str(small), a], "problem": problem, "solution": "[70, 70, 90, 90]"}
    with pytest.raises(data.BadInput, match=r"lies outside the 64x64 image '.*small.png'"):
        data.check_row(json.dumps(far), str(tmp_path), "rec")
    far["image"] = [a, str(small)]  # the box lies in the first image: accepted
    assert data.check_row(json.dumps(far), str(tmp_path), "rec")["solution"] == [70, 70, 90, 90]


def test_a_bad_row_in_each_format_is_one_line(tmp_path):
    for name, path, line, says in _bad_sources(tmp_path):
        with pytest.raises(data.BadInput) as e:
            data.load_data(path, str(tmp_path), "rec")
        msg = str(e.value)
        assert msg.startswith(f"{path}:{line}: ") and says in msg and "\n" not in msg, (name, msg)
        if line == 2:  # and --skip-bad-rows keeps the good one
            rows, bad = data.load_data(path, str(tmp_path), "rec", skip_bad_rows=True)
            assert len(rows) == 1 and bad == [msg], name
    with pytest.raises(
        data.BadInput, match="a DatasetDict with splits train, test; give one, e.g. .*/dd/train$"
    ):
        (tmp_path / "dd").mkdir()
        (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
        data.load_data(str(tmp_path / "dd"), "", "rec")


def test_bad_parquet_stops_the_run_before_a_model_loads(tmp_path, monkeypatch):
    name, path, line, says = [s for s in _bad_sources(tmp_path) if s[0] == "parquet"][0]
    monkeypatch.setattr(vlm, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        g.train(g.parse_args(["--train-data", path, *TINY, "--output-dir", str(tmp_path / "run")]))
    assert str(e.value.code).startswith(
        f"error: {path}:2: image '{path}:2' is "
    ) and "\n" not in str(e.value.code)


def test_draw_keeps_the_order_of_rng_sample_and_covers_small_sets():
    rows = list(range(10))
    a, b = random.Random(3), random.Random(3)
    assert [data.draw(a, rows, 4) for _ in range(5)] == [
        b.sample(rows, 4) for _ in range(5)
    ]  # >= k rows: as before
    assert sorted(data.draw(random.Random(0), rows, 10)) == rows
    for n, k in ((2, 4), (3, 4), (1, 5), (3, 8)):
        rng = random.Random(n)
        for _ in range(20):
            got = data.draw(rng, rows[:n], k)
            counts = [got.count(r) for r in rows[:n]]
            assert len(got) == k and max(counts) - min(counts) <= 1, (
                n,
                k,
                got,
            )  # epochs: every row, evenly
    state = random.Random(7)
    state.random()
    saved = state.getstate()
    first = [data.draw(state, rows[:3], 8) for _ in range(3)]
    state.setstate(saved)  # a resume restores the sampler's state: the same draws
    assert [data.draw(state, rows[:3], 8) for _ in range(3)] == first


def _two_rows_and(d, words=0):
    """Two REC rows, and a third whose problem has `words` words if words."""
    ((a, png, problem, _, text),) = _items("rec", 1)
    (d / a).write_bytes(png)
    rows = [
        {"image": a, "problem": problem, "solution": text},
        {"image": a, "problem": problem + " the", "solution": text},
    ]
    rows += (
        [{"image": a, "problem": " ".join(["circle"] * words), "solution": text}] if words else []
    )
    return _jsonl(d / "rows.jsonl", rows)


def test_a_long_prompt_is_refused_before_a_model_loads_and_two_rows_train_with_b4(
    tmp_path, monkeypatch
):
    """The third row's prompt (600 words) is above --max-prompt-length 512: one line, counted by the
    tokenizer and image processor alone. With --skip-bad-rows it is skipped, and the two rows left
    train with B=4."""
    path = _two_rows_and(tmp_path, 600)
    real_load = vlm.load
    monkeypatch.setattr(vlm, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    flags = [
        "--train-data",
        path,
        "--image-root",
        str(tmp_path),
        *TINY,
        "--output-dir",
        str(tmp_path / "run"),
    ]
    with pytest.raises(SystemExit) as e:
        g.train(g.parse_args(flags))
    _, family = real_load(g.TINY_MODEL)
    rows = data.load_data(path, str(tmp_path))[0]
    n = int(family.encode(rows[2:])[0]["attention_mask"].sum())  # what the prompt really is
    assert e.value.code == (
        f"error: {path}:3: the prompt is {n} tokens (16 of them the image's), above "
        f"--max-prompt-length 512"
    )
    monkeypatch.setattr(vlm, "load", real_load)
    g.train(g.parse_args(flags + ["--skip-bad-rows"]))  # B=4 from 2 rows
    logged = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged[0] == {"step": 0, "bad_rows": 1} and [r["step"] for r in logged[1:]] == [1, 2]


def test_prompt_lengths_equal_what_encode_makes(tmp_path):
    """Text once per problem plus the image's tokens from its size: the lengths encode() makes, for
    odd sizes."""
    from PIL import Image

    _, family = vlm.load(g.TINY_MODEL)
    rows = []
    for i, (w, h) in enumerate([(128, 128), (30, 500), (640, 480), (29, 28)]):
        Image.new("RGB", (w, h), (i * 40, 90, 30)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "problem": "the red circle " * i or "x", "solution": "3"})
    rows, _ = data.load_data(_jsonl(tmp_path / "sizes.jsonl", rows), str(tmp_path), "count")
    got = vlm.prompt_lengths(family, rows)
    assert [n for n, _ in got] == [int(family.encode([r])[0]["attention_mask"].sum()) for r in rows]
    assert len({m for _, m in got}) > 1  # the image token counts differ by size


def test_sft_trains_on_two_rows_with_b4(tmp_path):
    import sft

    path = _two_rows_and(tmp_path)
    sft.main(
        [
            "--train-data",
            path,
            "--image-root",
            str(tmp_path),
            "--prompts-per-step",
            "4",
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path / "sft"),
            "--eval-every",
            "0",
        ]
    )
    assert os.path.exists(tmp_path / "sft" / "model.safetensors")


def test_flags_are_documented_and_make_the_run():
    a = g.parse_args(["--eval-data", "v.jsonl", "--max-prompt-length", "2048", "--image-key=img"])
    assert (a.eval_data, a.max_prompt_length, a.image_key) == ("v.jsonl", 2048, "img")
    docs = infra.field_docs(g.Args)
    assert {
        "eval_data",
        "max_prompt_length",
        "problem_key",
        "solution_key",
        "image_key",
        "task",
    } <= set(docs)
    assert {"problem_key", "solution_key", "image_key"} <= set(infra.RUN_DEFINING)
