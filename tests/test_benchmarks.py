"""eval.py --benchmark: the published REC, LISA, SuperCLEVR and Visual-RFT benchmarks (registry.py),
read from fixtures written here in the published formats (the literal rows of
../shared/BENCHMARKS.md, images made here), decoded by the tiny models, and scored from hand-written
--predictions with hand-computed metrics, official quirks included; the official subset; bad input;
two processes under torchrun against one."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import eval as ev  # noqa: E402
import registry  # noqa: E402

from runs import TWO  # noqa: E402

REC = [n for n, b in registry.BENCHMARKS.items() if b.paper == "VLM-R1" and b.task == "rec"]
VRFT = [n for n, b in registry.BENCHMARKS.items() if b.paper == "Visual-RFT" and b.task == "cls"]
TINY = {
    t: os.path.join(ROOT, "checkpoints", f"tiny-qwen2.5-vl-{t}") for t in ("rec", "cls", "count")
}

# BENCHMARKS.md 1(a): the literal rec_jsons_processed row (om-ai-lab/VLM-R1#11)
REC_ROW = {
    "height": 640,
    "width": 427,
    "id": 0,
    "original_id": 1719310,
    "dataset_name": "refcoco",
    "area": 14863.615599999997,
    "iscrowd": 0,
    "image_id": 0,
    "category_id": 1,
    "bbox_list": [[103.93, 299.99, 237.15, 476.40999999999997]],
    "text_type": "caption",
    "image": "train2014/COCO_train2014_000000581857.jpg",
    "problem": "Please provide the bounding box coordinate of the region this sentence describes: "
    "the lady with the blue shirt.",
    "normal_caption": "the lady with the blue shirt",
    "solution": [103.93, 299.99, 238.15, 477.41],
    "normalized_solution": [243, 468, 557, 745],
}
# BENCHMARKS.md 5.1(a): the literal SuperCLEVR row
CLEVR_ROW = {
    "image_path": "./images/superCLEVR_new_025000.png",
    "question": "How many different items are there in the image?",
    "ground_truth": 4,
}
# BENCHMARKS.md 4.1(a): the literal .pth entry; label 76 is line 77 of oxford_flowers.txt
FLOWER_PATH = (
    "/mnt/petrelfs/liuziyu/LLM_Memory/SimplyRetrieve/CLIP-Cls/data/oxford_flowers/jpg/"
    "image_00172.jpg"
)
VRFT_FILES = {  # benchmark: (file stem, cluster folder/subfolder, class count)
    "vrft_flowers": ("oxford_flowers", "oxford_flowers/jpg", 102),
    "vrft_pets": ("pets", "oxford_pets/images", 37),
    "vrft_aircraft": ("fgvc_aircraft", "fgvc_aircraft/images", 100),
    "vrft_cars": ("stanford_cars", "stanford_cars/cars_test", 196),
}


def _image(path, size, color=(120, 90, 60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def rec_rows():
    """The literal row, and two more in its schema on a 200x200 image (LISA: the same schema)."""
    small = {k: v for k, v in REC_ROW.items() if k not in ("bbox_list", "normalized_solution")}
    more = [
        {**small, "id": i, "image": "train2014/small.jpg", "width": 200, "height": 200, **extra}
        for i, extra in (
            (1, {"solution": [0, 0, 100, 100], "problem": REC_ROW["problem"][:-30] + "the cat."}),
            (2, {"solution": [50, 50, 150, 150]}),
        )
    ]
    return [REC_ROW] + more


def pth_entry(path, label):
    return {
        path: {
            "label": torch.tensor(label),
            "pred_logits": torch.zeros(10, dtype=torch.float16),
            "pred_class": torch.arange(10),
        }
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A folder of every benchmark's published file, and an image root for all of them."""
    top = tmp_path_factory.mktemp("published")
    files, root = str(top / "files"), str(top / "images")
    os.makedirs(files)
    _image(os.path.join(root, REC_ROW["image"]), (427, 640))
    _image(os.path.join(root, "train2014/small.jpg"), (200, 200), (30, 160, 200))
    for name in REC:  # the seed-42 shuffle of 3 rows is [1, 0, 2]: refcoco_val's first query is
        # the literal row, the others' a small one (the tiny-model test decodes the first only)
        rows = rec_rows()
        rows = [rows[1], rows[0], rows[2]] if name == "refcoco_val" else rows
        with open(os.path.join(files, f"{name}.json"), "w") as f:
            json.dump(rows if name != "lisa_test" else rows[1:] + rows[1:], f)
    with open(os.path.join(files, registry.BENCHMARKS["superclevr_count"].file), "w") as f:
        for i, gt in enumerate((4, 3, 9)):
            row = {**CLEVR_ROW, "image_path": f"./images/superCLEVR_new_0250{i:02d}.png"}
            f.write(json.dumps({**row, "ground_truth": gt}) + "\n")
            _image(os.path.join(root, row["image_path"]), (96, 64), (80, 80, 80 + 40 * i))
    for name, (stem, sub, k) in VRFT_FILES.items():
        classes = [f"{stem} class {i}" for i in range(k)]
        if stem == "oxford_flowers":
            classes[76] = "passion flower"
        with open(os.path.join(files, f"{stem}.txt"), "w") as f:
            f.write("\n".join(classes) + "\n")
        cluster = FLOWER_PATH.rsplit("oxford_flowers/jpg/", 1)[0] + sub
        entries = [pth_entry(f"{cluster}/img_{i}.jpg", label) for i, label in enumerate((1, 2))]
        if stem == "oxford_flowers":
            entries = [pth_entry(FLOWER_PATH, 76)] + entries
        torch.save(entries, os.path.join(files, f"{stem}.pth"))
        for e in entries:
            rel = next(iter(e)).split("/data/", 1)[1]
            _image(os.path.join(root, rel), (64, 64), (200, 100, 50))
    return files, root


def run_eval(argv, capsys, threads=None):
    """eval.main() in this process: (exit code or 0, stdout, stderr)."""
    old, code = sys.argv, 0
    sys.argv = ["eval.py", *argv]
    n = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        ev.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
        torch.set_num_threads(n)
    out = capsys.readouterr()
    return code, out.out, out.err


def lines_of(path):
    with open(os.path.splitext(path)[0] + ".jsonl") as f:
        return [json.loads(line) for line in f]


def summaries_of(path):
    with open(path) as f:
        s = json.load(f)
    return s if isinstance(s, list) else [s]


FIELDS = {"id", "model", "benchmark", "output", "parsed", "truth", "correct"}


@pytest.mark.parametrize(
    "names,task,n",
    [(REC, "rec", 1), (["superclevr_count"], "count", 0), (VRFT, "cls", 0)],
    ids=["vlm-r1", "r1-v", "visual-rft"],
)
def test_tiny_model_evaluates_each_published_file_and_predictions_rescore_it(
    published, tmp_path, capsys, names, task, n
):
    """The tiny model decodes every fixture from its published format (several benchmarks from one
    --data folder and one --image-root; REC: the first query of each, --n 1, for time); every query
    has one line with the required fields; and --predictions on those lines reproduces each summary
    (input_size carried for the REC boxes)."""
    files, root = published
    out = str(tmp_path / "model.json")
    flags = ["--benchmark", *names, "--data", files, "--max-new-tokens", "4", "--json", out]
    flags += ["--n", str(n)] if n else []
    code, stdout, err = run_eval(
        flags + ["--image-root", root, "--model", TINY[task], "--batch-size", "4"], capsys
    )
    assert code == 0, err
    lines, summaries = lines_of(out), summaries_of(out)
    assert [s["benchmark"] for s in summaries] == names
    for s in summaries:
        bench = registry.BENCHMARKS[s["benchmark"]]
        assert s["official"] and s["n"] == (n or len(bench.read(os.path.join(files, bench.file))))
        assert f"| {s['benchmark']} | {TINY[task]} | paper |" in stdout
        assert "max_new_tokens 4 (official" in " ".join(s["departures"])
    assert len(lines) == sum(s["n"] for s in summaries)
    for line in lines:
        assert FIELDS <= set(line) and isinstance(line["id"], str) and line["output"] is not None
        assert ("input_size" in line) == (task == "rec")  # VLM-R1 rescales by default
    if task == "rec":  # the official pixel limits reached the processor (the tiny model's own
        # max_pixels, 12544, would give 84 x 112 for the literal row's 427 x 640 image)
        sizes = {tuple(x["input_size"]) for x in lines if x["truth"] == REC_ROW["solution"]}
        assert sizes == {(420, 644)}
    again = str(tmp_path / "again.json")
    code, stdout, err = run_eval(
        ["--benchmark", *names, "--data", files, "--predictions", out[:-5] + ".jsonl"]
        + ["--json", again]
        + (["--n", str(n)] if n else []),
        capsys,
    )
    assert code == 0, err
    for a, b in zip(summaries, summaries_of(again), strict=True):
        assert {k: a[k] for k in ("benchmark", "model", "n", "accuracy", "parsed_rate")} == {
            k: b[k] for k in ("benchmark", "model", "n", "accuracy", "parsed_rate")
        }
        assert b["no_prediction"] == 0
    assert [(x["id"], x["correct"], x["parsed"]) for x in lines] == [
        (x["id"], x["correct"], x["parsed"]) for x in lines_of(again)
    ]


def write_preds(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def one_file(tmp_path, name, rows):
    path = str(tmp_path / registry.BENCHMARKS[name].file)
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


ANS = "<think> ... </think> <answer>{}</answer>"


def test_vlmr1_predictions_hand_scored(tmp_path, capsys):
    """VLM-R1's REC quirks, by hand. Truth [0, 0, 100, 100] in a 200 x 200 image. Rows: 0 exact
    ({...} JSON, ints): right; 1 a bare list (no {...}): a parse failure, wrong and in the
    denominator; 2 IoU exactly 0.5 ([0, 0, 100, 50]): wrong under the strict > 0.5; 3 floats:
    wrong for the RL parser, right for the baseline parser; 4 no prediction: wrong; 5 a halved box
    with input_size [100, 100]. Paper prompt, no rescale: row 0, 1/6. Rescaled (rows 0-3 by the
    processor's 196 x 196 input: x 200/196): rows 0, 5, and 2, whose IoU becomes 0.505: 3/6.
    Baseline, no rescale: rows 0, 1, 3: 3/6."""
    rows = [
        {**REC_ROW, "solution": [0, 0, 100, 100], "width": 200, "height": 200} for _ in range(6)
    ]
    data = one_file(tmp_path, "refcoco_val", rows)
    box = '{{"bbox_2d": [{}], "label": "lady"}}'
    preds = write_preds(
        tmp_path / "p.jsonl",
        [
            {"id": "0", "output": ANS.format(box.format("0, 0, 100, 100"))},
            {"id": "1", "output": ANS.format("[0, 0, 100, 100]")},
            {"id": "2", "output": ANS.format(box.format("0, 0, 100, 50"))},
            {"id": "3", "output": ANS.format(box.format("0.0, 0.0, 100.0, 100.0"))},
            {"id": "5", "output": ANS.format(box.format("0, 0, 50, 50")), "input_size": [100, 100]},
        ],
    )
    out = str(tmp_path / "s.json")
    base = ["--benchmark", "refcoco_val", "--data", data, "--predictions", preds, "--json", out]
    expect = {"false": (1 / 6, [1, 0, 0, 0, 0, 0]), "true": (3 / 6, [1, 0, 1, 0, 0, 1])}
    for rescale, (acc, correct) in expect.items():
        code, stdout, err = run_eval(base + ["--rescale-boxes", rescale], capsys)
        if rescale == "true":  # lines 0-3 have no input_size and there is no --model
            assert code and " of refcoco_val has no input_size;" in str(code), (code, err)
            code, stdout, err = run_eval(
                base + ["--rescale-boxes", rescale, "--model", TINY["rec"]], capsys
            )
        assert code == 0, (code, err)
        (s,) = summaries_of(out)
        got = {x["id"]: x["correct"] for x in lines_of(out)}
        assert [got[str(i)] for i in range(6)] == correct and s["accuracy"] == pytest.approx(acc)
        assert s["n"] == 6 and s["no_prediction"] == 1
    # --model gave the input size from the processor with the official pixel limits: 200 x 200
    # -> smart_resize -> 196 x 196 (a multiple of 28), so [0, 0, 100, 100] maps to 102 px
    line = {x["id"]: x for x in lines_of(out)}["0"]
    assert line["input_size"] == [196, 196] and line["parsed"][2] == pytest.approx(100 * 200 / 196)
    code, _, err = run_eval(base + ["--rescale-boxes", "false", "--prompt", "baseline"], capsys)
    (s,) = summaries_of(out)
    assert code == 0 and s["accuracy"] == pytest.approx(3 / 6) and not s["rescale_boxes"], err
    got = {x["id"]: x["correct"] for x in lines_of(out)}
    assert [got[str(i)] for i in range(6)] == [1, 1, 0, 1, 0, 0]
    # the native prompt is ours: IoU >= 0.5 counts (row 2), any box in <answer> parses (row 1)
    code, stdout, err = run_eval(base + ["--prompt", "native", "--model", TINY["rec"]], capsys)
    (s,) = summaries_of(out)
    assert code == 0 and not s["official"] and "native (not official)" in stdout, err
    got = {x["id"]: x["correct"] for x in lines_of(out)}
    assert [got[str(i)] for i in range(6)] == [1, 1, 1, 1, 0, 1] and s["accuracy"] == 5 / 6


def test_superclevr_predictions_hand_scored(tmp_path, capsys):
    """R1-V: an integer alone in <answer> (first match of the pattern) equals ground_truth; 4.0,
    "four" and -4 do not parse; a missing prediction is wrong. 2 of 7 right."""
    path = str(tmp_path / registry.BENCHMARKS["superclevr_count"].file)
    with open(path, "w") as f:
        f.writelines(json.dumps(CLEVR_ROW) + "\n" for _ in range(7))
    outputs = [
        ANS.format("4"),
        ANS.format(" 4.0 "),
        ANS.format("four"),
        ANS.format("-4"),
        "<answer>3 apples</answer> <answer> 4 </answer>",  # the first full match: 4, right
        ANS.format("5"),
    ]
    preds = write_preds(
        tmp_path / "p.jsonl", [{"id": str(i), "output": o} for i, o in enumerate(outputs)]
    )
    out = str(tmp_path / "s.json")
    code, stdout, err = run_eval(
        ["--benchmark", "superclevr_count", "--data", path, "--predictions", preds, "--json", out],
        capsys,
    )
    assert code == 0, err
    (s,) = summaries_of(out)
    assert s["accuracy"] == pytest.approx(2 / 7) and s["parsed_rate"] == pytest.approx(3 / 7)
    assert [x["parsed"] for x in lines_of(out)] == [4, None, None, None, 4, 5, None]
    assert "| superclevr_count | " in stdout and "48 (R1-V README" in stdout
    # `model` gives one summary per model: B answers 4 everywhere but on row 6 (missing): 6/7
    lines = [{"id": str(i), "output": o, "model": "A"} for i, o in enumerate(outputs)]
    lines += [{"id": str(i), "output": ANS.format("4"), "model": "B"} for i in range(6)]
    flags = ["--benchmark", "superclevr_count", "--data", path, "--json", out, "--predictions"]
    code, stdout, err = run_eval(flags + [write_preds(tmp_path / "ab.jsonl", lines)], capsys)
    got = {s["model"]: (s["accuracy"], s["no_prediction"]) for s in summaries_of(out)}
    assert code == 0 and got == {"A": (2 / 7, 1), "B": (6 / 7, 1)}, err


def test_visual_rft_predictions_hand_scored(published, tmp_path, capsys):
    """Visual-RFT's two-way substring match (spaces and underscores dropped, lower case): exact,
    empty, a part and a superset are all right; text with no <answer> on one line is wrong; exact
    match beside it. Truth "passion flower" (label 76, the literal entry) for all six rows."""
    files, _ = published
    pth = str(tmp_path / "oxford_flowers.pth")
    torch.save([pth_entry(FLOWER_PATH, 76) for _ in range(6)], pth)
    with open(os.path.join(files, "oxford_flowers.txt")) as f, open(pth[:-4] + ".txt", "w") as g:
        g.write(f.read())
    outputs = {
        "0": ANS.format("Passion_Flower"),  # right, exact
        "1": ANS.format(""),  # right (the empty string is in every label), not exact
        "2": ANS.format("passion"),  # right: the answer is in the label
        "3": ANS.format("a passion flower plant"),  # right: the label is in the answer
        "4": "passion flower",  # no <answer>: wrong
        "5": "<answer>passion\nflower</answer>",  # no DOTALL: no match, wrong
    }
    preds = write_preds(tmp_path / "p.jsonl", [{"id": k, "output": v} for k, v in outputs.items()])
    out = str(tmp_path / "s.json")
    flags = ["--benchmark", "vrft_flowers", "--data", pth, "--predictions", preds, "--json", out]
    code, stdout, err = run_eval(flags, capsys)
    assert code == 0, err
    (s,) = summaries_of(out)
    assert s["accuracy"] == pytest.approx(4 / 6) and s["exact"] == pytest.approx(1 / 6)
    assert "66.67 (exact 16.67)" in stdout and "54.8 (Visual-RFT Table 2, Flower102)" in stdout
    assert lines_of(out)[0]["truth"] == "passion flower"


def test_official_subset_is_the_seed_42_shuffle(tmp_path, capsys):
    """VLM-R1's subset: random.seed(42); random.shuffle(rows); rows[:2000] over all rows in file
    order (a 2500-row fixture); --subset full is every row in file order; --n cuts after it."""
    rows = [{**REC_ROW, "problem": f"row {i}"} for i in range(2500)]
    path = one_file(tmp_path, "refcocog_test", rows)
    want = list(rows)
    random.seed(42)
    random.shuffle(want)
    bench = registry.BENCHMARKS["refcocog_test"]
    queries = bench.read(path)
    got = registry.select(bench, queries, "official")
    assert [q.fields["problem"] for q in got] == [r["problem"] for r in want[:2000]]
    assert [q.id for q in registry.select(bench, queries, "full")] == [str(i) for i in range(2500)]
    assert len(registry.select(bench, queries, "official", 7)) == 7
    assert len(registry.select(registry.BENCHMARKS["lisa_test"], queries, "official")) == 2500
    preds = write_preds(tmp_path / "p.jsonl", [{"id": "5", "output": ANS.format("{[0,0,1,1]}")}])
    out = str(tmp_path / "s.json")
    flags = ["--benchmark", "refcocog_test", "--data", path, "--predictions", preds]
    code, _, err = run_eval(flags + ["--rescale-boxes", "false", "--json", out], capsys)
    (s,) = summaries_of(out)
    assert code == 0 and s["n"] == 2000 and s["no_prediction"] == 2000 - ("5" in got_ids(got))


def got_ids(queries):
    return {q.id for q in queries}


def test_bad_input_is_one_line_before_any_model_loads(published, tmp_path, capsys):
    """A missing file, an unknown name, a row off the published format, an image that will not
    open, a prompt or flag the entry does not have, a duplicate or unknown id: one line each, with
    a --model that does not exist (so nothing was loaded). --skip-bad-rows: a bad row inside the
    official subset counts as wrong; --subset full drops it."""
    files, root = published
    nomodel = ["--model", str(tmp_path / "no-such-model")]

    def one_line(argv, *needles):
        code, _, err = run_eval(argv, capsys)
        assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
        assert all(n in code for n in needles), code
        return code

    one_line(["--benchmark", "refcoco_val", "--data", str(tmp_path)] + nomodel, "no such file")
    one_line(["--benchmark", "refcoco_vall", "--data", files] + nomodel, "unknown benchmark")
    rows = rec_rows()
    rows[1] = {**rows[1], "solution": [1, 2, 3]}
    path = one_file(tmp_path, "refcoco_val", rows)
    flags = ["--benchmark", "refcoco_val", "--data", path, "--image-root", root]
    one_line(flags + nomodel, f"{path}: row 1: 'solution' must be [x1, y1, x2, y2]")
    os.makedirs(tmp_path / "broken/train2014")
    (tmp_path / "broken/train2014/small.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken" / REC_ROW["image"]).write_bytes(b"")
    rows = rec_rows()
    one_line(
        ["--benchmark", "refcoco_val", "--data", one_file(tmp_path, "refcoco_val", rows)]
        + ["--image-root", str(tmp_path / "broken")]
        + nomodel,
        ": row ",
        "is not an image file PIL can read",
    )
    clevr = os.path.join(files, registry.BENCHMARKS["superclevr_count"].file)
    c = ["--benchmark", "superclevr_count", "--data", clevr, "--image-root", root]
    one_line(c + ["--prompt", "baseline"] + nomodel, "superclevr_count has no baseline prompt")
    one_line(c + ["--rescale-boxes", "true"] + nomodel, "--rescale-boxes does not apply")
    one_line(c + ["--visualize", "2"] + nomodel, "--visualize draws")
    one_line(["--benchmark", "superclevr_count", "lisa_test", "--data", clevr] + nomodel, "folder")
    dup = write_preds(tmp_path / "d.jsonl", [{"id": "1", "output": ""}, {"id": "1", "output": ""}])
    one_line(c + ["--predictions", dup], f"{dup}:2: duplicate id '1'")
    unknown = write_preds(tmp_path / "u.jsonl", [{"id": "3", "output": ""}])
    one_line(c + ["--predictions", unknown], f"{unknown}:1: unknown id '3'")
    as_int = write_preds(tmp_path / "i.jsonl", [{"id": 0, "output": ""}])
    one_line(c + ["--predictions", as_int], "'id' must be a JSON string")
    # skip: the bad row 1 stays in the official subset as wrong; --subset full drops it
    rows = rec_rows()
    rows[1] = {**rows[1], "problem": ""}
    path = one_file(tmp_path, "refcoco_val", rows)
    preds = write_preds(tmp_path / "p.jsonl", [{"id": str(i), "output": "x"} for i in range(3)])
    out = str(tmp_path / "s.json")
    flags = ["--benchmark", "refcoco_val", "--data", path, "--predictions", preds, "--json", out]
    flags += ["--rescale-boxes", "false", "--skip-bad-rows"]
    for subset, n, in_subset in (("official", 3, 1), ("full", 2, 0)):
        code, _, err = run_eval(flags + ["--subset", subset], capsys)
        (s,) = summaries_of(out)
        assert code == 0 and "1 bad rows" in err and s["bad_rows"] == 1, (code, err)
        assert s["n"] == n and s["bad_in_subset"] == in_subset


def test_two_processes_give_the_summary_of_one(published, tmp_path, capsys):
    """torchrun (2 gloo processes) splits the queries in whole batches and gathers them: the same
    summary and lines as one process (one thread each, so both round alike)."""
    files, root = published
    flags = ["--benchmark", "superclevr_count", "vrft_pets", "--data", files, "--image-root", root]
    flags += ["--model", TINY["count"], "--batch-size", "1", "--max-new-tokens", "4"]
    two = str(tmp_path / "two.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        TWO + [os.path.join(ROOT, "eval.py"), *flags, "--json", two],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(process 0 of 2)" in res.stdout and "rows/s" in res.stdout
    one = str(tmp_path / "one.json")
    code, _, err = run_eval(flags + ["--json", one], capsys, threads=1)
    assert code == 0, err
    assert summaries_of(two) == summaries_of(one) and lines_of(two) == lines_of(one)
    assert len(lines_of(one)) == 3 + 2


def test_prompt_reaches_the_family_and_training_prompts_are_unchanged():
    """A benchmark's user text and system prompt reach the chat template as given (no suffix of
    ours); a training row (no `chat`) still gets the problem and our think/answer suffix."""
    import data
    import vlm

    family = vlm.adapter(TINY["rec"])
    plain = family.prompt_text("the problem.", 2)
    assert "the problem." + data.THINK_SUFFIX in plain and "SYSTEM" not in plain
    assert plain.count("<|image_pad|>") == 2
    bench = registry.BENCHMARKS["superclevr_count"]
    q = registry.Query("0", "f: row 0", fields={"question": CLEVR_ROW["question"]})
    chat = registry.chat(bench, bench.prompts["paper"], q)
    text = family.prompt_text("ignored", 2, {**chat, "system": "SYSTEM PROMPT"})
    assert chat["text"] in text and data.THINK_SUFFIX not in text and "ignored" not in text
    assert text.index("SYSTEM PROMPT") < text.index(CLEVR_ROW["question"])
    assert chat["text"] == CLEVR_ROW["question"] + (
        " First output the thinking process in <think> </think> and final answer (number) in"
        " <answer> </answer> tags."
    )
