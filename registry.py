"""The published benchmarks of the seed papers, read as published and scored as the papers scored
them: one `Benchmark` entry per benchmark in `BENCHMARKS`, below eval.py (`eval.py --benchmark`).

An entry names the reader of the published file, the task, the prompts (the paper's RL prompt, its
baseline prompt where it has one, and the model family's native prompt) with the official parser of
each official prompt, the official metric and subset rule, the official decoding, and the papers'
numbers with their tables. Every entry cites the official file (commit in ../shared/BENCHMARKS.md)
that it follows, and says where we depart. The code here is ours: the official regexes are the
specification, so they are repeated, nothing else is copied.

A reader returns one `Query` per row of the file, in file order, its `id` the row's 0-based index
as a string; a row that does not match the published format carries `bad` (one line) instead of
raising, so that the official subset is drawn over every row as the official script draws it.
Scoring is pure: `Benchmark.judge(query, output, input_size, rescale)` -> {parsed, correct, ...} and
`Benchmark.summarize(records)` -> the metrics. Part 2 (detection: COCO, ODinW-13, Visual-RFT
few-shot and open-vocabulary COCO, OVDEval), at the end, adds entries whose readers, parsers
and corpus-level `summarize(records, queries, every)` (COCO AP, per-class AP, NMS-AP) are
detection.py's; a detection Query carries its annotation file (`gt`), image id and asked categories.
"""

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable

import data
import detection
import rewards


# ---------------------------------------------------------------------------------------------
# What an entry holds
# ---------------------------------------------------------------------------------------------
@dataclass
class Query:
    """One row of a published file: `id` (0-based row index, a string), where it is ("FILE: row
    I"), the image (path under --image-root, and the size the row states, if any), the row's fields
    (`fields`, what the prompts format) and the truth; `bad` holds why a row is unusable."""

    id: str
    where: str
    image: str = ""
    truth: object = None
    fields: dict = field(default_factory=dict)
    size: tuple | None = None  # (W, H) the row states; the opened image's size replaces it
    bad: str = ""
    # detection (detection.py): the annotation file, the image id, the categories asked about
    gt: object = None
    image_id: object = None
    cat_ids: list | None = None


@dataclass(frozen=True)
class Prompt:
    """A prompt: the user text (`template.format(**query.fields)`) after the image, the system
    prompt (None: the chat template's own default turn, as the official scripts), and the parser
    that goes with it (None: our own lenient parser, rewards.py, "not official"); `source` cites
    it."""

    template: str
    parse: Callable | None
    source: str
    system: str | None = None

    @property
    def official(self):
        return self.parse is not None


@dataclass(frozen=True)
class Decoding:
    """The official decoding: new-token limit, greedy or not, the image processor's pixel limits
    (min_pixels, max_pixels: the resize keeps the pixel count inside them), the official batch size;
    `ours` says where our decoding departs from it (we always decode greedily: an entry whose
    evaluator samples says so here; precision, attention)."""

    max_new_tokens: int
    greedy: bool
    min_pixels: int
    max_pixels: int
    batch_size: int
    source: str
    ours: str = ""


@dataclass(frozen=True)
class Number:
    """A paper's number (percent), its source table, and whether only a second-hand source gives
    it (BENCHMARKS.md's [3rd] tag: not checked against the paper's PDF)."""

    value: float
    table: str
    second_hand: bool = False

    def __str__(self):
        return f"{self.value:g} ({self.table}{', 2nd-hand' if self.second_hand else ''})"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. `read(path, image_root)` -> [Query] in file order; `file` is the published
    file name (a --data folder holds it); `judge(prompt, query, output, input_size, rescale)` ->
    {parsed, correct, ...}; `summarize(records)` -> metrics, `headline` the key of the one the
    papers report (a fraction; the table prints percent) and `metric` its name; `subset`:
    "seed42_2000" (VLM-R1), "all", or a function [Query] -> [Query]; `rescale`: the official
    --rescale-boxes default, None where the flag does not apply; `numbers`: {"base"|"sft"|"rl":
    Number}, for `paper_model`."""

    name: str
    paper: str
    task: str
    file: str
    read: Callable
    prompts: dict
    judge: Callable
    summarize: Callable
    metric: str
    subset: str | Callable
    decoding: Decoding
    rescale: bool | None
    numbers: dict
    paper_model: str
    source: str
    notes: str = ""
    headline: str = "accuracy"
    corpus: bool = False  # summarize(records, queries, every): a corpus-level metric (mAP)
    options: tuple = ()  # eval.py flags the reader and the judge take (box_score, exist_map)


# ---------------------------------------------------------------------------------------------
# Readers of the published files. Errors name the file and the 0-based row (= the query's id).
# ---------------------------------------------------------------------------------------------
def _short(v, n=60):
    s = json.dumps(v, ensure_ascii=False, default=lambda x: f"<{type(x).__name__}>")
    return s if len(s) <= n else s[: n - 3] + "..."


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonempty(row, key):
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise data.BadInput(f"{key!r} must be a non-empty string, got {_short(v)}")
    return v


def _rows(path, read_all):
    """The rows of `path` by read_all(open file); a missing or unreadable file is one line."""
    if not os.path.isfile(path):
        raise data.BadInput(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return read_all(f)
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise data.BadInput(" ".join(f"{path}: cannot be read ({e})".split())) from None


def _each(path, rows, check):
    """[Query] of every row; a row that check() refuses carries the one-line reason in `bad`."""
    out = []
    for i, row in enumerate(rows):
        q = Query(id=str(i), where=f"{path}: row {i}")
        try:
            check(q, row)
        except data.BadInput as e:
            q.bad = f"{q.where}: {e}"
        out.append(q)
    return out


def _rec_row(q, row):
    """VLM-R1's rec_jsons_processed row: `image` (under the folder that holds train2014/, or the
    LISA folder), `problem`, `solution` [x1, y1, x2, y2] in original pixels (the evaluator's truth),
    `width`/`height` (used only to rescale --predictions that carry no input_size)."""
    if not isinstance(row, dict):
        raise data.BadInput(f"expected a JSON object, got {_short(row)}")
    q.image, q.fields = _nonempty(row, "image"), {"problem": _nonempty(row, "problem")}
    box = row.get("solution")
    if not (isinstance(box, list) and len(box) == 4 and all(map(_is_number, box))):
        raise data.BadInput(f"'solution' must be [x1, y1, x2, y2], got {_short(box)}")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise data.BadInput(f"'solution' {_short(box)} needs x1 < x2 and y1 < y2")
    q.truth = [float(v) for v in box]
    w, h = row.get("width"), row.get("height")
    q.size = (w, h) if _is_number(w) and _is_number(h) and w > 0 and h > 0 else None


def read_vlmr1(path, image_root=""):
    """A JSON array of REC rows (rec_jsons_processed/*.json, lisa_test.json), as published."""
    rows = _rows(path, json.load)
    if not isinstance(rows, list):
        raise data.BadInput(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
    return _each(path, rows, _rec_row)


def _superclevr_row(q, row):
    """R1-V's row: `image_path` ("./images/superCLEVR_new_025000.png", under the folder that holds
    images/), `question`, `ground_truth` an int."""
    if not isinstance(row, dict):
        raise data.BadInput(f"expected a JSON object, got {_short(row)}")
    q.image = os.path.normpath(_nonempty(row, "image_path"))
    q.fields = {"question": _nonempty(row, "question")}
    gt = row.get("ground_truth")
    if not isinstance(gt, int) or isinstance(gt, bool):
        raise data.BadInput(f"'ground_truth' must be an integer, got {_short(gt)}")
    q.truth = gt


def read_superclevr(path, image_root=""):
    """R1-V's superclevr_test200_counting_problems.jsonl: one JSON object a line (blank lines are
    not rows); a line that is not JSON is a bad row."""

    def lines(f):
        return [line for line in f.read().decode("utf-8").splitlines() if line.strip()]

    def check(q, line):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise data.BadInput(f"not valid JSON ({getattr(e, 'msg', e)})") from None
        _superclevr_row(q, row)

    return _each(path, _rows(path, lines), check)


# Visual-RFT's .pth keys are paths on the authors' cluster; the image is kept from the data set's
# folder on (.../data/oxford_flowers/jpg/image_00172.jpg -> IMAGE_ROOT/oxford_flowers/jpg/...).
VRFT_FOLDERS = {
    "oxford_flowers": "oxford_flowers",
    "pets": "oxford_pets",
    "fgvc_aircraft": "fgvc_aircraft",
    "stanford_cars": "stanford_cars",
}


def read_vrft(path, image_root=""):
    """Visual-RFT's classification/val_data/NAME.pth (a torch.save'd list of one-key dicts {cluster
    path: {"label": int64 tensor, ...}}) and its class list NAME.txt beside it (one class a line,
    the label its 0-based index). Loaded with torch.load(weights_only=True), never a full unpickle.
    """
    import torch

    stem = os.path.splitext(os.path.basename(path))[0]
    folder = VRFT_FOLDERS.get(stem)
    if folder is None:
        raise data.BadInput(
            f"{path}: expected one of {', '.join(f + '.pth' for f in VRFT_FOLDERS)}"
        )
    classes_path = os.path.splitext(path)[0] + ".txt"
    classes = _rows(classes_path, lambda f: [c.strip() for c in f.read().decode().splitlines()])
    if not os.path.isfile(path):
        raise data.BadInput(f"{path}: no such file")
    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (not weights-only), a truncated file, ...
        raise data.BadInput(
            " ".join(f"{path}: cannot be read by torch.load(weights_only=True) ({e})".split())[:300]
        ) from None
    if not isinstance(items, list):
        raise data.BadInput(f"{path}: expected a list of {{path: {{label}}}}, got {type(items)}")

    def check(q, item):
        if not (isinstance(item, dict) and len(item) == 1):
            raise data.BadInput(f"expected a one-key dict {{path: {{'label': ...}}}}, got {item!r}")
        ((key, value),) = item.items()
        label = value.get("label") if isinstance(value, dict) else None
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(classes):
            raise data.BadInput(
                f"'label' must be an integer index into the {len(classes)} classes of "
                f"{classes_path}, got {str(label)[:40]}"
            )
        parts = str(key).replace("\\", "/").split("/")
        if folder not in parts[:-1]:
            raise data.BadInput(f"image path {str(key)[:80]!r} has no folder {folder!r}")
        at = len(parts) - 1 - parts[::-1].index(folder)
        q.image, q.truth = "/".join(parts[at:]), classes[label]
        q.fields = {"cluster_path": key}

    return _each(path, items, check)


# ---------------------------------------------------------------------------------------------
# The subset rule and the images
# ---------------------------------------------------------------------------------------------
def select(bench, queries, subset="official", n=0):
    """The queries scored. official: the entry's rule (VLM-R1 REC: random.seed(42);
    random.shuffle(rows); rows[:2000] over every row in file order; else every row) with a bad row
    kept (it counts as wrong, as the official denominator keeps it); full: every good row in file
    order. `n` caps the result after the subset."""
    if subset == "official" and callable(bench.subset):
        out = bench.subset(list(queries))
    elif subset == "official" and bench.subset == "seed42_2000":
        order = list(queries)
        random.Random(42).shuffle(order)  # the same permutation as random.seed(42); shuffle()
        out = order[:2000]
    elif subset == "official":
        out = list(queries)
    else:
        out = [q for q in queries if not q.bad]
    return out[:n] if n else out


def check_images(queries, image_root, bad_ok):
    """Open every selected query's image (data.image_size: the whole file decodes) and record its
    size (detection keeps the file's); an image that will not open, or is too small or too narrow
    for the processor, is one line naming the file and row, or with bad_ok makes the query bad (it
    then counts as wrong)."""
    sizes = {}
    for q in queries:
        if q.bad:
            continue
        path = os.path.join(image_root or "", q.image)
        if path not in sizes:
            try:
                w, h = data.image_size(path)
                if min(w, h) < data.MIN_SIDE or max(w, h) / min(w, h) > data.MAX_ASPECT:
                    raise data.BadInput(
                        f"image '{path}' is {w}x{h}: below {data.MIN_SIDE} px a side, or an "
                        f"aspect ratio above {data.MAX_ASPECT}"
                    )
                sizes[path] = (w, h)
            except data.BadInput as e:
                sizes[path] = str(e)
        if isinstance(sizes[path], str):
            q.bad = f"{q.where}: {sizes[path]}"
            if not bad_ok:
                raise data.BadInput(q.bad)
        else:  # detection keeps the annotation file's width and height, as its official code
            q.size = q.size if q.gt is not None else sizes[path]
            q.fields = {**q.fields, "image_path": path}


# ---------------------------------------------------------------------------------------------
# Official parsers and metrics (each cites the line it follows)
# ---------------------------------------------------------------------------------------------
ANSWER_DOTALL = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# VLM-R1 src/eval/test_rec_r1.py:70-79: the box must be 4 non-negative integers inside {...} inside
# <answer>; the greedy .* takes the last such list
R1_BOX = re.compile(r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}", re.DOTALL)
# VLM-R1 src/eval/test_rec_baseline.py:62-70: the first list of 4 numbers anywhere in the output
BASE_NUM = r"(\s*-?\d*\.?\d+\s*)"
BASELINE_BOX = re.compile(rf"\[{BASE_NUM},\s*{BASE_NUM},\s*{BASE_NUM},\s*{BASE_NUM}\]")
# R1-V src/eval/test_qwen2vl_counting_superclevr.py:88-95: an unsigned integer alone in <answer>
R1V_COUNT = re.compile(r"<answer>\s*(\d+)\s*</answer>")
# Visual-RFT classification/Qwen2_VL_classification_infere.py:166 (no DOTALL: one line)
VRFT_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def vlmr1_r1_box(text):
    """The RL prompt's box (test_rec_r1.py:68-79); None where the official code uses [0,0,0,0]."""
    m = ANSWER_DOTALL.search(text)
    b = R1_BOX.search(m.group(1).strip()) if m else None
    return [int(v) for v in b.groups()] if b else None


def vlmr1_baseline_box(text):
    """The baseline prompt's box (test_rec_baseline.py:62-70): floats, no <answer> needed."""
    b = BASELINE_BOX.search(text)
    return [float(v) for v in b.groups()] if b else None


def vlmr1_iou(a, b):
    """test_rec_r1.py:81-91: continuous IoU, except that an overlap of 1 px or less counts as 0.
    Departure: a union of 0 or less (a degenerate predicted box) scores 0 where it would divide by
    zero or go negative."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2] - 1, b[2] - 1), min(a[3] - 1, b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def r1v_count(text):
    m = R1V_COUNT.search(text)
    return int(m.group(1)) if m else None


def vrft_answer(text):
    m = VRFT_ANSWER.search(text)
    return m.group(1) if m else None


def _vrft_norm(s):
    """Qwen2_VL_classification_infere.py:169-170."""
    return s.replace(" ", "").replace("_", "").lower()


# The native prompt's parsers: our own, lenient (rewards.py), marked "not official" in the table.
def native_box(text):
    return rewards.parse_box(text)


def native_number(text):
    return rewards.parse_number(text)


def native_label(text):
    a = rewards.extract_answer(text)
    return None if a is None else rewards.normalize_text(a.replace("_", " "))


def judge_rec(prompt, q, output, input_size, rescale, coord_space="abs_resized"):
    """VLM-R1 REC/LISA (test_rec_r1.py:203-214): Acc@0.5 counts IoU(pred, solution) > 0.5,
    strictly; the box is rescaled from the resized input (input_size = (w, h)) to the original
    pixels (q.size) when `rescale` (the code since 2025-06-26, 00755a2). A parse failure is wrong.
    The native prompt: our lenient parser, the family's coordinate space, IoU >= 0.5 (our acc50)."""
    box = prompt.parse(output) if prompt.official else native_box(output)
    if box is None:
        return {"parsed": None, "correct": 0, "iou": 0.0}
    if not prompt.official:
        W, H = q.size
        gt = {"width": W, "height": H, "coord_space": coord_space}
        if coord_space == "abs_resized":
            gt.update(input_width=input_size[0], input_height=input_size[1])
        pred = rewards.to_original_pixels(box, gt)
        iou = rewards.box_iou(pred, q.truth)
        return {"parsed": pred, "correct": int(iou >= 0.5), "iou": iou}
    pred = list(box)
    if rescale:
        (w, h), (W, H) = input_size, q.size
        pred = [pred[0] * W / w, pred[1] * H / h, pred[2] * W / w, pred[3] * H / h]
    iou = vlmr1_iou(pred, q.truth)
    return {"parsed": pred, "correct": int(iou > 0.5), "iou": iou}


def judge_count(prompt, q, output, input_size=None, rescale=None, coord_space=None):
    """R1-V (test_qwen2vl_counting_superclevr.py:101-117): the integer equals ground_truth; no
    answer is wrong. Native: our parse_number (any one number), compared as a number."""
    v = prompt.parse(output) if prompt.official else native_number(output)
    return {"parsed": v, "correct": int(v is not None and v == q.truth)}


def judge_cls(prompt, q, output, input_size=None, rescale=None, coord_space=None):
    """Visual-RFT (Qwen2_VL_classification_infere.py:165-179): both sides lose spaces and
    underscores and are lower-cased; correct if either holds the other (so an empty answer is
    correct); no <answer> on one line is an error, counted wrong. `exact`: the same normalized
    strings equal. Native: our normalize_text, exact match."""
    if not prompt.official:
        a = native_label(output)
        ok = int(a is not None and a != "" and a == native_label(f"<answer>{q.truth}</answer>"))
        return {"parsed": a, "correct": ok, "exact": ok}
    a = prompt.parse(output)
    if a is None:
        return {"parsed": None, "correct": 0, "exact": 0}
    x, t = _vrft_norm(a), _vrft_norm(q.truth)
    return {"parsed": a, "correct": int(t in x or x in t), "exact": int(x == t)}


def accuracy(extra=()):
    """summarize(): accuracy = right / all scored queries (a parse failure, a missing prediction and
    a bad row in the official subset stay in the denominator), parsed_rate, and `extra` means."""

    def summarize(records):
        n = len(records)
        s = {"n": n, "accuracy": sum(r["correct"] for r in records) / n if n else float("nan")}
        s["parsed_rate"] = sum(r["parsed"] is not None for r in records) / n if n else float("nan")
        for k in extra:
            s[k] = sum(r.get(k, 0) for r in records) / n if n else float("nan")
        return s

    return summarize


# ---------------------------------------------------------------------------------------------
# The entries
# ---------------------------------------------------------------------------------------------
# Native prompt: the family adapter's own prompt, as the trainer asks (data.build_messages: the
# question, then our think/answer suffix, in the family's chat template), parsed by rewards.py.
NATIVE = "{question}" + data.THINK_SUFFIX
QWEN_PIXELS = (3136, 12845056)  # qwen_vl_utils / the Qwen2(.5)-VL processor defaults
OURS = "bf16 + flash-attn-2 there; fp32 on the CPU, bf16 autocast + SDPA on a GPU here"
VLMR1 = "om-ai-lab/VLM-R1 90052f4"
REC_R1 = Prompt(
    "{problem} First output the thinking process in <think> </think> tags and then output the final"
    " answer in <answer> </answer> tags. Output the final answer in JSON format.",
    vlmr1_r1_box,
    f"{VLMR1} src/eval/test_rec_r1.py:111 (QUESTION_TEMPLATE), parser :68-79",
)
REC_BASELINE = Prompt(
    "{problem} Please provide the bounding box coordinate in JSON format.",
    vlmr1_baseline_box,
    f"{VLMR1} src/eval/test_rec_baseline.py:104 (since 2025-02-19), parser :62-70",
)
REC_NATIVE = Prompt(NATIVE.replace("question", "problem"), None, "grpo-vlm data.build_messages")
REC_DECODING = Decoding(
    256,
    True,
    *QWEN_PIXELS,
    2,
    f"{VLMR1} src/eval/test_rec_r1.py:162 (greedy, max_new_tokens=256), :46 (batch 2; baseline 4)",
    OURS,
)


def _rec(name, numbers, notes=""):
    return Benchmark(
        name=name,
        paper="VLM-R1",
        task="rec",
        file=f"{name}.json",
        read=read_vlmr1,
        prompts={"paper": REC_R1, "baseline": REC_BASELINE, "native": REC_NATIVE},
        judge=judge_rec,
        summarize=accuracy(("iou",)),
        metric="Acc@0.5 (IoU > 0.5)",
        subset="seed42_2000",
        decoding=REC_DECODING,
        rescale=True,
        numbers=numbers,
        paper_model="Qwen2.5-VL-3B-Instruct",
        source=f"{VLMR1} src/eval/test_rec_r1.py:101-109 (subset), :203-230 (metric)",
        notes=notes,
    )


T1 = "VLM-R1 Table 1"
BENCHMARKS = {
    b.name: b
    for b in [
        _rec("refcoco_val", {"base": Number(89.1, T1, True)}),
        _rec("refcoco_testA", {}),
        _rec("refcoco_testB", {}),
        _rec("refcocop_val", {"base": Number(82.4, T1, True)}),
        _rec("refcocop_testA", {}),
        _rec("refcocop_testB", {}),
        _rec("refcocog_val", {"base": Number(85.2, T1, True)}),
        _rec("refcocog_test", {}),
        Benchmark(
            name="lisa_test",
            paper="VLM-R1",
            task="rec",
            file="lisa_test.json",
            read=read_vlmr1,
            prompts={"paper": REC_R1, "baseline": REC_BASELINE, "native": REC_NATIVE},
            judge=judge_rec,
            summarize=accuracy(("iou",)),
            metric="Acc@0.5 (IoU > 0.5)",
            subset="all",  # 1,658 rows < 2000: the seed-42 cut keeps every row (#271)
            decoding=REC_DECODING,
            rescale=True,
            numbers={
                "base": Number(56.51, "VLM-R1 Table 2", True),
                "sft": Number(54.82, "VLM-R1 Table 2", True),
                "rl": Number(63.14, "VLM-R1 Table 2", True),
            },
            paper_model="Qwen2.5-VL-3B-Instruct",
            source=f"{VLMR1} src/eval/test_rec_r1.py:53-54 (TEST_DATASETS=['lisa_test'])",
            notes="the full set: fewer rows than the 2000 cut, and a shuffle does not change a "
            "mean (we keep file order)",
        ),
        Benchmark(
            name="superclevr_count",
            paper="R1-V",
            task="count",
            file="superclevr_test200_counting_problems.jsonl",
            read=read_superclevr,
            prompts={
                "paper": Prompt(
                    "{question} First output the thinking process in <think> </think> and final"
                    " answer (number) in <answer> </answer> tags.",
                    r1v_count,
                    "Deep-Agent/R1-V bbbbe3d src/eval/test_qwen2vl_counting_superclevr.py:32, "
                    "parser :88-95",
                ),
                "native": Prompt(NATIVE, None, "grpo-vlm data.build_messages"),
            },
            judge=judge_count,
            summarize=accuracy(),
            metric="accuracy (integer exact match)",
            subset="all",
            decoding=Decoding(
                256,
                True,
                *QWEN_PIXELS,
                64,
                "Deep-Agent/R1-V bbbbe3d src/eval/test_qwen2vl_counting_superclevr.py:75, :11",
                OURS,
            ),
            rescale=None,
            numbers={
                "base": Number(48.0, "R1-V README, src/eval/logs"),
                "rl": Number(82.5, "R1-V README (GRPO, 100 steps)"),
            },
            paper_model="Qwen2-VL-2B-Instruct",
            source="Deep-Agent/R1-V bbbbe3d src/eval/test_qwen2vl_counting_superclevr.py:98-120",
            notes="reproductions report base 42.5 and RL 71.5 (R1-V #100, #156, #170)",
        ),
    ]
}

VRFT = "Liuziyu77/Visual-RFT 9486633 classification/Qwen2_VL_classification_infere.py"
VRFT_KIND = {  # the training data's problem strings (BENCHMARKS.md 4.1c); flowers: paper Table 1
    "vrft_flowers": ("oxford_flowers", "a plant", "the species of the plant", "Flower102"),
    "vrft_pets": ("pets", "a pet", "the species of the pet", "Pets37"),
    "vrft_aircraft": ("fgvc_aircraft", "an aircraft", "the model of the aircraft", "FGVC"),
    "vrft_cars": ("stanford_cars", "a car", "the model of the car", "Cars196"),
}
VRFT_TABLE2 = {  # Visual-RFT Table 2, Qwen2-VL-2B: base, 4-shot RFT (the released 4-shot sets)
    "vrft_flowers": (54.8, 71.4),
    "vrft_pets": (66.4, 86.1),
    "vrft_aircraft": (45.9, 74.8),
    "vrft_cars": (56.8, 95.3),
}
for _name, (_stem, _what, _ask, _column) in VRFT_KIND.items():
    _question = f"This is an image containing {_what}. Please identify {_ask} based on the image."
    BENCHMARKS[_name] = Benchmark(
        name=_name,
        paper="Visual-RFT",
        task="cls",
        file=f"{_stem}.pth",
        read=read_vrft,
        prompts={
            "paper": Prompt(
                # the user text is "<image>\n" + question (:127), after the image item
                "<image>\n" + _question + "\nOutput the thinking process in <think> </think> and "
                "final answer in <answer> </answer> tags.The output answer format should be as "
                "follows:\n<think> ... </think> <answer>species name</answer>\nPlease strictly "
                "follow the format.",
                vrft_answer,
                f"{VRFT}:118-127 (aircraft; the others from the training sets' problem), "
                "parser :166-172",
            ),
            "native": Prompt(_question + data.THINK_SUFFIX, None, "grpo-vlm data.build_messages"),
        },
        judge=judge_cls,
        summarize=accuracy(("exact",)),
        metric="accuracy (two-way substring; empty answer = right)",
        subset="all",
        decoding=Decoding(
            1024,
            False,
            *QWEN_PIXELS,
            1,
            f"{VRFT}:155 (max_new_tokens=1024, sampling per the checkpoint's generation_config, "
            "torch.manual_seed(1234) :17), one image a call",
            OURS + "; greedy where the official evaluator samples",
        ),
        rescale=None,
        numbers={
            "base": Number(VRFT_TABLE2[_name][0], f"Visual-RFT Table 2, {_column}"),
            "rl": Number(VRFT_TABLE2[_name][1], f"Visual-RFT Table 2, {_column}, 4-shot RFT"),
        },
        paper_model="Qwen2-VL-2B-Instruct",
        source=f"{VRFT}:87-95 (val set), :165-179 (metric), accuracy = right / len(val set)",
        notes="per-data-set SFT not in our source (4-shot SFT average 55.6, 1-shot 51.7); 1-shot "
        "RFT 70.8 / 84.1 / 72.5 / 93.8; the script is hard-wired to aircraft",
    )


def prompt_of(bench, which):
    """The entry's prompt `which` (paper, baseline, native), or a one-line ValueError."""
    if which not in bench.prompts:
        raise ValueError(
            f"{bench.name} has no {which} prompt ({bench.paper}'s evaluation has none); it has: "
            f"{', '.join(bench.prompts)}"
        )
    return bench.prompts[which]


def chat(bench, prompt, q):
    """The prompt a family encodes for a query (data.build_messages' `chat`): the user text and the
    system prompt. The native prompt formats the row's question field."""
    fields = {"question": q.fields.get("problem") or q.fields.get("question") or "", **q.fields}
    return {"text": prompt.template.format(**fields), "system": prompt.system}


def input_size(processor, W, H, min_pixels, max_pixels):
    """(w, h) of a W x H image after a Qwen2/2.5-VL processor's resize (smart_resize with the
    entry's pixel limits): the size the model's boxes are in, for --predictions lines without
    input_size."""
    import sys

    smart_resize = sys.modules[type(processor).__module__].smart_resize  # its own, any version
    factor = processor.patch_size * processor.merge_size
    h, w = smart_resize(int(H), int(W), factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


# ---------------------------------------------------------------------------------------------
# Part 2: detection (detection.py). A per-image query's id is the image id; a per-category one's
# IMAGE_ID:CATEGORY_ID; in a folder of several files (ODinW-13, OVDEval) NAME/ before it.
# ---------------------------------------------------------------------------------------------
# GLIP's odinw_35 layout, relative to the folder that holds the 13 data sets (Vision-R1
# eval_localization.py:70-83, DATASET_MAP); the images sit beside each annotation file
VALID = "valid/annotations_without_background.json"
ODINW13 = {
    "AerialMaritimeDrone": f"AerialMaritimeDrone/large/{VALID}",
    "Aquarium": f"Aquarium/Aquarium Combined.v2-raw-1024.coco/{VALID}",
    "CottontailRabbits": f"CottontailRabbits/{VALID}",
    "EgoHands": f"EgoHands/generic/{VALID}",
    "NorthAmericaMushrooms": "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco/"
    + VALID,
    "Packages": f"Packages/Raw/{VALID}",
    "PascalVOC": f"PascalVOC/{VALID}",
    "pistols": "pistols/export/val_annotations_without_background.json",
    "pothole": f"pothole/{VALID}",
    "Raccoon": f"Raccoon/Raccoon.v2-raw.coco/{VALID}",
    "ShellfishOpenImages": f"ShellfishOpenImages/raw/{VALID}",
    "thermalDogsAndPeople": f"thermalDogsAndPeople/{VALID}",
    "VehiclesOpenImages": f"VehiclesOpenImages/416x416/{VALID}",
}
VRFT_FEWSHOT = ["bus", "train", "fire hydrant", "stop sign", "cat", "dog", "bed", "toilet"]
VRFT_OV = ["mouse", "fork", "hot dog", "cat", "airplane", "suitcase", "parking meter", "sandwich"]
VRFT_OV += ["train", "hair drier", "toilet", "toaster", "snowboard", "frisbee", "bear"]
EXIST_MAP = "exist_map_coco_Qwen2_vl_2B_baseline.json"


def read_coco(path, image_root="", **_):
    """instances_val2017.json: one query per image (Vision-R1's EVALDataset)."""
    return detection.coco_queries(Query, detection.read_gt(path, "coco_val2017"))


def read_odinw(path, image_root="", **_):
    """The folder holding GLIP's 13 ODinW data sets (ODINW13's paths), or one annotation file:
    one query per image and present category (--single --pos); --image-root is not used."""
    files = {os.path.basename(path): path} if os.path.isfile(path) else None
    if files is None:
        files = {k: os.path.join(path, v) for k, v in ODINW13.items()}
        missing = [v for v in files.values() if not os.path.isfile(v)]
        if missing:
            raise data.BadInput(f"{missing[0]}: no such file (--data: the folder of ODinW's 13)")
    out = []
    for name, f in files.items():
        gt = detection.read_gt(f, name, os.path.abspath(os.path.dirname(f)))
        out += detection.positive_queries(Query, gt, f"{name}/" if len(files) > 1 else "")
    return out


def _read_vrft_coco(selected):
    def read(path, image_root="", exist_map="", **_):
        """instances_val2017.json and Visual-RFT's exist_map (--exist-map; default the 2B COCO map
        beside the annotation file): one query per image and mapped category in the list."""
        em = exist_map or os.path.join(os.path.dirname(path), EXIST_MAP)
        return detection.exist_map_queries(Query, detection.read_gt(path), em, selected)

    return read


def read_ovdeval(path, image_root="", **_):
    """One OVDEval sub-task file (its file_names under --image-root), or the folder of them (every
    *.json; images under --image-root/images/<sub-task>/): one query per image."""
    if os.path.isfile(path):
        return detection.ovdeval_queries(Query, detection.read_gt(path))
    if not os.path.isdir(path):
        raise data.BadInput(f"{path}: no such file or folder")
    files = sorted(f for f in os.listdir(path) if f.endswith(".json"))
    if not files:
        raise data.BadInput(f"{path}: no OVDEval .json files in this folder")
    out = []
    for f in files:
        stem = f[:-5]
        where = os.path.abspath(os.path.join(image_root or "", "images", stem))
        gt = detection.read_gt(os.path.join(path, f), stem, where)
        out += detection.ovdeval_queries(Query, gt, f"{stem}/")
    return out


def judge_det(official_space, official_score):
    """judge(): the answer's boxes as COCO results in original pixels. Official prompts: Vision-R1
    and VLM-R1 boxes are in the resized input (x W / input w when rescaled, as given when not);
    Visual-RFT's in 0-1000. --box-score official: `official_score`; constant: the entry's constant
    for every box; stated: the answer's confidence, else the constant. `correct`: the query's true
    boxes found at IoU 0.5 (greedy)."""

    def judge(prompt, q, output, input_size, rescale, coord_space="abs_resized", box_score=""):
        items = prompt.parse(output) if prompt.official else detection.native_parse(output)
        if items is None:
            return {"parsed": None, "correct": 0}
        kind, c = official_score
        score = {"constant": ("constant", c), "stated": ("stated", c)}.get(box_score, (kind, c))
        space = official_space if official_space == "norm1000" else "resized" if rescale else "none"
        res = detection.to_results(
            q, items, space if prompt.official else coord_space, input_size, score
        )
        truth = [{"image_id": q.image_id, **t} for t in q.truth]
        tp = sum(v[0] for v in detection.greedy_f1(res, truth, q.cat_ids).values())
        return {"parsed": res, "correct": tp}

    return judge


VR1 = "jefferyZhan/Griffon 9866875 Vision-R1/eval/eval_localization"
VR1_PARSE = f"{VR1}.py:1066-1092 (parse_json :226-234)"
VR1_DECODING = Decoding(
    512,
    True,
    28 * 28,
    12800 * 28 * 28,
    1,
    f"{VR1}.py:926 (greedy, max_new_tokens=512), :924 (batch 1); pixel limits 28*28, 12800*28*28",
    OURS,
)
# the family's own detection prompt: the trainer's (data.DET_QUESTION), naming the categories
NATIVE_DET = Prompt(
    data.DET_QUESTION.replace("{shape}", "{categories}") + data.THINK_SUFFIX,
    None,
    "grpo-vlm data.DET_QUESTION + data.build_messages",
)
VRFT_DET = "Liuziyu77/Visual-RFT 9486633 coco_evaluation/Qwen2_VL_coco_infere.py"
VRFT_DET_PROMPT = Prompt(
    "<image>\nDetect all objects belonging to the category '{category}' in the image, and provide "
    "the bounding boxes (between 0 and 1000, integer) and confidence (between 0 and 1, with two "
    "decimal places).\nIf no object belonging to the category '{category}' in the image, return "
    "'No Objects'.\nOutput the thinking process in <think> </think> and final answer in <answer> "
    "</answer> tags.The output answer format should be as follows:\n<think> ... </think> "
    "<answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer>\nPlease "
    "strictly follow the format.",
    detection.vrft_parse,
    f"{VRFT_DET}:245-255, parser :293-321 and :56-87",
)
OVD_PROMPT = Prompt(
    "First thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer "
    "here </answer>\nPlease carefully check the image and detect the following objects: "
    "[{categories}]. Output the bbox coordinates of detected objects in <answer></answer>. The "
    'bbox coordinates in Markdown format should be:\n```json\n[{{"bbox_2d": [x1, y1, x2, y2], '
    '"label": "object name"}}]\n```\nIf no targets are detected in the image, simply respond '
    'with "None".',
    detection.vlmr1_ovd_parse,
    "VLM-R1 blog 2025-03-24 (OVD prompt; the list's format inferred: names joined by ', '), "
    f"{VLMR1} src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py:76-83 (odLength "
    "prefix); parser "
    f"{VLMR1} src/open-r1-multimodal/src/open_r1/grpo_jsonl.py:404-405, :324-331, :274-284",
)


def _det(name, paper, file, read, prompts, summarize, metric, **kw):
    return Benchmark(
        name=name,
        paper=paper,
        task="det",
        file=file,
        read=read,
        prompts={**prompts, "native": NATIVE_DET},
        summarize=summarize,
        metric=metric,
        subset="all",
        headline="map",
        corpus=True,
        **kw,
    )


T1V = "Vision-R1 Table 1"
for _b in [
    _det(
        "coco_val2017",
        "Vision-R1",
        "instances_val2017.json",
        read_coco,
        {
            "paper": Prompt(
                "Locate every item from the category list in the image and output the "
                "coordinates in JSON format. The category set includes {categories}.",
                detection.vision_r1_parse,
                f"{VR1}.sh:3-4 (Qwen2.5-VL, COCO), parser {VR1_PARSE}",
            )
        },
        detection.summarizer("coco"),
        "COCO AP (pycocotools; AP50, AP75 beside)",
        judge=judge_det("resized", ("constant", 0.99)),
        decoding=VR1_DECODING,
        rescale=True,
        numbers={"base": Number(17.7, T1V), "sft": Number(23.6, T1V), "rl": Number(26.6, T1V)},
        paper_model="Qwen2.5-VL-7B-Instruct",
        source=f"{VR1}.py:440-458 (queries), :1076-1092 (score 0.99), :1263 (COCOeval)",
        notes="AP50 / AP75: base 27.3 / 18.0, SFT 36.1 / 24.3, RL 40.0 / 27.8",
        options=("box_score",),
    ),
    _det(
        "odinw13",
        "Vision-R1",
        "",
        read_odinw,
        {
            "paper": Prompt(
                "Locate every {category} in the image and output the coordinates in JSON format.",
                detection.vision_r1_parse,
                f"{VR1}.sh:5-6 (ODINW, the Qwen team's prompt, QwenLM/Qwen3-VL#839), "
                f"parser {VR1_PARSE}",
            )
        },
        detection.summarizer("mean"),
        "mean of the 13 data sets' COCO AP",
        judge=judge_det("resized", ("constant", 0.99)),
        decoding=VR1_DECODING,
        rescale=True,
        numbers={"base": Number(37.0, T1V), "sft": Number(35.0, T1V), "rl": Number(46.0, T1V)},
        paper_model="Qwen2.5-VL-7B-Instruct",
        source=f"{VR1}.py:553-575 (--single --pos queries), :70-83 (the 13 files)",
        options=("box_score",),
    ),
    _det(
        "vrft_coco_fewshot",
        "Visual-RFT",
        "instances_val2017.json",
        _read_vrft_coco(VRFT_FEWSHOT),
        {"paper": VRFT_DET_PROMPT},
        detection.summarizer("per_class", VRFT_FEWSHOT),
        "mean per-class AP over the 8 few-shot categories",
        judge=judge_det("norm1000", ("stated", 1.0)),
        decoding=Decoding(
            1024,
            False,
            *QWEN_PIXELS,
            1,
            f"{VRFT_DET}:283 (max_new_tokens=1024, sampling)",
            OURS + "; greedy where the official evaluator samples",
        ),
        rescale=None,
        numbers={
            "base": Number(19.6, "Visual-RFT Table 3"),
            "sft": Number(25.2, "Visual-RFT Table 3, 4-shot"),
            "rl": Number(40.6, "Visual-RFT Table 3, 4-shot"),
        },
        paper_model="Qwen2-VL-2B-Instruct",
        source=f"{VRFT_DET}:227-241 (exist_map x list), Liuziyu77/Visual-RFT 9486633 "
        "coco_evaluation/coco_evaluation.py:119-131 and evaluation.ipynb cell 4 (the mean)",
        options=("box_score", "exist_map"),
    ),
    _det(
        "vrft_coco_ov",
        "Visual-RFT",
        "instances_val2017.json",
        _read_vrft_coco(VRFT_OV),
        {"paper": VRFT_DET_PROMPT},
        detection.summarizer("per_class", VRFT_OV),
        "mean per-class AP over the 15 novel categories",
        judge=judge_det("norm1000", ("stated", 1.0)),
        decoding=Decoding(
            1024,
            False,
            *QWEN_PIXELS,
            1,
            f"{VRFT_DET}:283 (max_new_tokens=1024, sampling)",
            OURS + "; greedy where the official evaluator samples",
        ),
        rescale=None,
        numbers={
            "base": Number(9.8, "Visual-RFT Table 7, mAP_n"),
            "sft": Number(13.6, "Visual-RFT Table 7, mAP_n"),
            "rl": Number(31.3, "Visual-RFT Table 7, mAP_n"),
        },
        paper_model="Qwen2-VL-2B-Instruct",
        source=f"{VRFT_DET}:238-241 (the 15 classes), coco_evaluation.py:119-131",
        options=("box_score", "exist_map"),
    ),
    _det(
        "ovdeval",
        "VLM-R1",
        "",
        read_ovdeval,
        {"paper": OVD_PROMPT},
        detection.summarizer("nms"),
        "NMS-AP (OVDEval eval.py; mean over the sub-tasks given)",
        judge=judge_det("resized", ("constant", 1.0)),
        decoding=Decoding(
            1024,
            True,
            *QWEN_PIXELS,
            1,
            "none released (VLM-R1#250): ours, greedy",
            OURS,
        ),
        rescale=True,
        numbers={
            "base": Number(25.46, "VLM-R1 blog, OVDEval nms-ap"),
            "sft": Number(26.50, "VLM-R1 blog, OVDEval nms-ap"),
            "rl": Number(31.01, "VLM-R1 blog; paper Table 4"),
        },
        paper_model="Qwen2.5-VL-3B-Instruct",
        source="om-ai-lab/OVDEval 2ba0aa9 eval.py:30-64 (NMS), :66-74 (COCOeval); VLM-R1's "
        "evaluator was never released (VLM-R1#250, #233)",
        notes="the blog's avg. is not the mean of its 8 columns (21.9 / 31.7): ours is the mean "
        "of the sub-tasks' NMS-APs",
        options=("box_score",),
    ),
]:
    BENCHMARKS[_b.name] = _b
