"""eval.py --benchmark, detection (part 2): coco_val2017, odinw13, vrft_coco_fewshot, vrft_coco_ov
and ovdeval (registry.py, detection.py), read from fixtures written here in the published formats
(the literal objects of ../shared/BENCHMARKS.md sections 3, 4.2, 6 and 7; images made here),
decoded by the tiny detection model, and scored from hand-written --predictions against values
worked out by hand."""

import json
import os
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_benchmarks import lines_of, run_eval, summaries_of, write_preds  # noqa: E402

import detection  # noqa: E402
import registry  # noqa: E402

TINY = os.path.join(ROOT, "checkpoints", "tiny-qwen2.5-vl-det")
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # BENCHMARKS.md 7: the ids COCO skips
COCO_IDS = [i for i in range(1, 91) if i not in GAPS]
CATS = [  # 80 categories, ids 1..90 non-contiguous; the first two as the literal excerpt
    {
        "supercategory": "person" if i == 1 else "vehicle" if i == 2 else "thing",
        "id": i,
        "name": n.replace("_", " "),
    }
    for i, n in zip(COCO_IDS, COCO_NAMES)
]
ID = {c["name"]: c["id"] for c in CATS}
# BENCHMARKS.md 7: the literal image and annotation of instances_val2017.json
IMAGE = {
    "license": 4,
    "file_name": "000000397133.jpg",
    "height": 427,
    "width": 640,
    "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
    "date_captured": "2013-11-14 17:02:52",
    "id": 397133,
}
ANN = {
    "segmentation": [[510.66, 423.01, 511.72, 420.03]],
    "area": 702.1057499999998,
    "iscrowd": 0,
    "image_id": 289343,
    "bbox": [473.07, 395.93, 38.65, 28.67],
    "category_id": 18,
    "id": 1768,
}
DOG = ANN["bbox"]
# BENCHMARKS.md 3: OVDEval's literal file
OVD = {
    "categories": [
        {"supercategory": "object", "id": 0, "name": "computer without screen on"},
        {"supercategory": "object", "id": 1, "name": "computer with screen on"},
    ],
    "annotations": [
        {
            "id": 0,
            "bbox": [111, 117, 99, 75],
            "category_id": 0,
            "image_id": 0,
            "iscrowd": 0,
            "area": 7523,
        }
    ],
    "images": [
        {
            "file_name": "64d22c6fe4b011b0db94b993.jpg",
            "id": 0,
            "height": 254,
            "width": 340,
            "text": ["computer without screen on"],
            "neg_text": ["computer with screen on"],
        }
    ],
}


def _image(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def coco_gt(extra_anns=()):
    """The literal image (no boxes) and the literal dog's image (640 x 480) with its box."""
    other = {**IMAGE, "file_name": "000000289343.jpg", "id": 289343, "height": 480}
    return {
        "info": {"description": "COCO 2017 Dataset"},
        "licenses": [],
        "images": [IMAGE, other],
        "annotations": [ANN, *extra_anns],
        "categories": CATS,
    }


def write(path, obj):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def box(b):  # [x, y, w, h] -> the answer's [x1, y1, x2, y2]
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def vr1(*items):
    return "```json\n" + json.dumps([{"bbox_2d": b, "label": n} for b, n in items]) + "\n```"


MISS = [10, 10, 60, 60]


def score(tmp_path, capsys, name, data, lines, *flags):
    preds = write_preds(tmp_path / "p.jsonl", lines)
    out = str(tmp_path / "s.json")
    argv = ["--benchmark", name, "--data", data, "--predictions", preds, "--json", out, *flags]
    code, stdout, err = run_eval(argv, capsys)
    assert code == 0, (code, err)
    (s,) = summaries_of(out)
    return s, {x["id"]: x for x in lines_of(out)}, stdout


def test_coco_order_confidences_boxes_labels_and_f1(tmp_path, capsys):
    """One true box (the literal dog). Answers [a miss, a hit] score AP 0.5 with the constant 0.99
    (the hit ranks second: precision 1/2 at recall 1 at every IoU) and [hit, miss] 1.0; stated
    confidences (miss 0.2, hit 0.9) give 1.0 either way. A label is matched lower-cased to COCO's
    id 18; a box in the resized input (320 x 240 for 640 x 480) is rescaled x 2 into [x, y, w, h].
    An unknown label is dropped; a cut-off answer is repaired after the last '"}'."""
    data = write(tmp_path / "instances_val2017.json", coco_gt())
    name, nr = "coco_val2017", ["--rescale-boxes", "false"]
    for order, want in (((MISS, box(DOG)), 0.5), ((box(DOG), MISS), 1.0)):
        out = vr1(*((b, "dog") for b in order))
        s, got, _ = score(tmp_path, capsys, name, data, [{"id": "289343", "output": out}], *nr)
        assert s["map"] == pytest.approx(want) and s["ap50"] == pytest.approx(want)
        assert [r["score"] for r in got["289343"]["parsed"]] == [0.99, 0.99]
        stated = json.dumps(
            [
                {"bbox_2d": b, "label": "dog", "score": c}
                for b, c in zip(order, (0.2, 0.9) if order[0] == MISS else (0.9, 0.2))
            ]
        )
        s, _, _ = score(
            tmp_path,
            capsys,
            name,
            data,
            [{"id": "289343", "output": stated}],
            *nr,
            "--box-score",
            "stated",
        )
        assert s["map"] == pytest.approx(1.0) and s["box_score"] == "stated"
    half = [v / 2 for v in box(DOG)]
    lines = [
        {"id": "289343", "output": vr1((half, "Dog"), (half, "unicorn")), "input_size": [320, 240]},
        {
            "id": "397133",
            "output": '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, {"bbox_2d": [5, 6',
            "input_size": [640, 427],
        },
    ]
    s, got, stdout = score(tmp_path, capsys, name, data, lines, "--rescale-boxes", "true")
    (r,) = got["289343"]["parsed"]  # the unicorn is dropped
    assert r["category_id"] == 18 and r["bbox"] == pytest.approx(DOG)
    assert got["289343"]["input_size"] == [320, 240] and s["map"] == pytest.approx(1.0)
    (c,) = got["397133"]["parsed"]  # repaired: the first item
    assert c["category_id"] == ID["cat"] and c["bbox"] == pytest.approx([1, 2, 29, 38])
    assert "| coco_val2017 |" in stdout and "17.7 (Vision-R1 Table 1)" in stdout
    # F1 at 0.5 with a wrong label: truth dog A and cat B; the answer A "dog" (hit), B "dog" (the
    # wrong label), C "cat" (a miss): dog P 1/2 R 1 F1 2/3, cat P 0 R 0 F1 0; macro means
    cat = {**ANN, "id": 2, "category_id": ID["cat"], "bbox": [100, 100, 80, 80]}
    data = write(tmp_path / "f1" / "instances_val2017.json", coco_gt([cat]))
    out = vr1((box(DOG), "dog"), (box(cat["bbox"]), "dog"), (MISS, "cat"))
    s, got, _ = score(tmp_path, capsys, name, data, [{"id": "289343", "output": out}], *nr)
    assert (s["precision50"], s["recall50"]) == pytest.approx((0.25, 0.5))
    assert s["f1_50"] == pytest.approx(1 / 3) and got["289343"]["correct"] == 1
    assert s["per_class_f1_50"] == pytest.approx({"dog": 2 / 3, "cat": 0.0})


def vrft_fixture(tmp_path, exist):
    """The dog's image holds one box of each few-shot category and a person; the exist_map (the
    literal two keys' form) names person, bus, cat, dog and bench for it."""
    anns = [
        {**ANN, "id": 10 + k, "category_id": ID[n], "bbox": [20 + 50 * k, 20, 40, 40]}
        for k, n in enumerate(registry.VRFT_FEWSHOT + ["person"])
    ]
    gt = coco_gt()
    gt["annotations"] = anns
    data = write(tmp_path / "vrft" / "instances_val2017.json", gt)
    write(tmp_path / "vrft" / registry.EXIST_MAP, exist)
    return data, {n: a["bbox"] for n, a in zip(registry.VRFT_FEWSHOT + ["person"], anns)}


def vrft(*items):  # Visual-RFT's answer: 0-1000 coordinates, single quotes
    return (
        "<think> . </think> <answer>"
        + str([{"Position": p, "Confidence": c} for p, c in items])
        + "</answer>"
    )


def norm(b, W=640, H=480):
    x1, y1, x2, y2 = box(b)
    return [x1 * 1000 / W, y1 * 1000 / H, x2 * 1000 / W, y2 * 1000 / H]


def test_visual_rft_per_class_mean_exist_map_and_repair(tmp_path, capsys):
    """Queries: exist_map x the 8 categories (bus, cat, dog here; person and bench are not in the
    list). bus and cat hit, dog answered with a miss: per-class AP bus 1, cat 1, the 6 others 0
    (true boxes, no query): the mean over exactly the 8 is 2/8, while COCOeval over every category
    with a box (person too) is 2/9. A cut-off bare list is cut at the last "}," and closed."""
    exist = {"289343": ["person", "bus", "cat", "dog", "bench"], "397133": ["cat"]}
    data, boxes = vrft_fixture(tmp_path, exist)
    # cut off: the official repair works on a bare list only; behind "<answer>" the added
    # <answer> wrapper keeps the first one in the text and json.loads fails (:300-302, :61-84)
    cut = vrft((norm(boxes["cat"]), 0.9)).replace("}]</answer>", "}, {'Position': [1, 2")
    assert detection.vrft_parse(cut) is None
    cut = cut.split("<answer>")[1]
    lines = [
        {"id": f"289343:{ID['bus']}", "output": vrft((norm(boxes["bus"]), 0.8))},
        {"id": f"289343:{ID['cat']}", "output": cut},
        {"id": f"289343:{ID['dog']}", "output": vrft((norm(MISS), 0.7), (norm(MISS), 0.7))},
    ]
    s, got, stdout = score(tmp_path, capsys, "vrft_coco_fewshot", data, lines)
    assert set(got) == {f"289343:{ID[n]}" for n in ("bus", "cat", "dog")} | {f"397133:{ID['cat']}"}
    assert set(s["per_class_ap"]) == set(registry.VRFT_FEWSHOT)
    assert s["map"] == pytest.approx(2 / 8) and s["map_all"] == pytest.approx(2 / 9)
    assert len(got[f"289343:{ID['dog']}"]["parsed"]) == 1  # exact duplicates dropped
    assert got[f"289343:{ID['cat']}"]["parsed"][0]["score"] == 0.9
    assert got[f"289343:{ID['bus']}"]["parsed"][0]["bbox"] == pytest.approx(boxes["bus"])
    assert registry.EXIST_MAP in stdout and "19.6 (Visual-RFT Table 3)" in stdout
    assert detection.vrft_parse("No Objects") is None


def test_ovdeval_nms_ap_duplicates_and_ties(tmp_path, capsys):
    """The literal OVDEval file: one true box. A box shifted 10 px (IoU 0.8165 > 0.5: AP over
    .50:.95 = 7/10), the exact box and a box of the negative label on it, all scored 1.0: NMS keeps
    one per true box, the first in the answer's order among ties: [shifted, exact, negative] 0.7,
    [exact, shifted, negative] 1.0. Stated scores (shifted 0.5, exact 0.9) keep the exact box."""
    # pycocotools counts a match to annotation id 0 as no match (dtm == 0): the literal file's
    # one box can never be found, in OVDEval's eval.py as here; renumbered from 1 it can
    data = write(tmp_path / "ovd0" / "negation.json", OVD)
    t = OVD["annotations"][0]["bbox"]
    exact = [
        {
            "id": "0",
            "output": "<answer>```json\n"
            + json.dumps([{"bbox_2d": box(t), "label": "computer without screen on"}])
            + "\n```</answer>",
        }
    ]
    s, _, _ = score(tmp_path, capsys, "ovdeval", data, exact, "--rescale-boxes", "false")
    assert s["map"] == 0.0 and s["f1_50"] == 1.0
    ovd = {**OVD, "annotations": [{**OVD["annotations"][0], "id": 1}]}
    data = write(tmp_path / "ovd" / "negation.json", ovd)
    shifted = [t[0] + 10, t[1], t[0] + t[2] + 10, t[1] + t[3]]
    pos, neg = "computer without screen on", "computer with screen on"

    def ans(items):
        return "<answer>```json\n" + json.dumps(items) + "\n```</answer>"

    nr = ["--rescale-boxes", "false"]
    for first, want in ((shifted, 0.7), (box(t), 1.0)):
        other = box(t) if first == shifted else shifted
        items = [{"bbox_2d": b, "label": n} for b, n in ((first, pos), (other, pos), (box(t), neg))]
        s, got, _ = score(
            tmp_path, capsys, "ovdeval", data, [{"id": "0", "output": ans(items)}], *nr
        )
        assert s["map"] == pytest.approx(want) and len(got["0"]["parsed"]) == 3
        assert s["per_set"]["negation.json"]["map"] == pytest.approx(want)
    items = [
        {"bbox_2d": shifted, "label": pos, "score": 0.5},
        {"bbox_2d": box(t), "label": pos, "score": 0.9},
    ]
    s, _, _ = score(
        tmp_path,
        capsys,
        "ovdeval",
        data,
        [{"id": "0", "output": ans(items)}],
        *nr,
        "--box-score",
        "stated",
    )
    assert s["map"] == pytest.approx(1.0)
    # VLM-R1's parser is strict: a cut-off list gives nothing; "None" is no boxes
    assert detection.vlmr1_ovd_parse(ans(items)[:-20]) is None
    assert detection.vlmr1_ovd_parse("<answer>None</answer>") == []


def odinw_folder(top):
    """GLIP's 13 data sets, one image each (beside its annotation file), one or two categories."""
    for k, (name, rel) in enumerate(registry.ODINW13.items()):
        path = os.path.join(top, rel)
        cats = [{"id": 1, "name": f"thing{k}"}, {"id": 3, "name": "other"}]
        im = {"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}
        anns = [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 1,
                "bbox": [8, 8, 20, 16],
                "area": 320,
                "iscrowd": 0,
            }
        ]
        write(path, {"images": [im], "annotations": anns, "categories": cats})
        _image(os.path.join(os.path.dirname(path), "a.jpg"), (64, 48))
    return str(top)


def test_odinw_one_query_per_present_category_and_the_mean_of_13(tmp_path, capsys):
    """Per (image, present category) queries, ids NAME/IMAGE:CATEGORY; a hit in 3 of the 13 data
    sets and nothing in the others: the mean AP is 3/13."""
    top = odinw_folder(tmp_path / "odinw")
    queries = registry.read_odinw(top)
    assert [q.id for q in queries] == [f"{n}/5:1" for n in registry.ODINW13]
    assert queries[0].fields["category"] == "thing0" and os.path.isabs(queries[0].image)
    lines = [
        {"id": f"{n}/5:1", "output": vr1(([8, 8, 28, 24], f"thing{k}"))}
        for k, n in enumerate(list(registry.ODINW13)[:3])
    ]
    s, _, stdout = score(tmp_path, capsys, "odinw13", top, lines, "--rescale-boxes", "false")
    assert len(s["per_set"]) == 13 and s["map"] == pytest.approx(3 / 13)
    assert (
        "AP per file: AerialMaritimeDrone 100.00, Aquarium 100.00, CottontailRabbits 100.00, "
        "EgoHands 0.00"
        in stdout
        and "| odinw13 | " in stdout
    )


def test_bad_detection_input_is_one_line(tmp_path, capsys):
    """A COCO file without categories, an annotation of an image not in `images`, an exist_map of
    another split, a flag an entry does not take: one line naming the file, before any model."""
    nomodel = ["--model", str(tmp_path / "no-such-model")]

    def one_line(argv, *needles):
        code, _, _ = run_eval(argv, capsys)
        assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
        assert all(n in code for n in needles), code

    gt = coco_gt()
    del gt["categories"]
    path = write(tmp_path / "a" / "instances_val2017.json", gt)
    one_line(["--benchmark", "coco_val2017", "--data", path] + nomodel, path, "'categories'")
    gt = coco_gt([{**ANN, "id": 9, "image_id": 1}])
    path = write(tmp_path / "b" / "instances_val2017.json", gt)
    one_line(
        ["--benchmark", "coco_val2017", "--data", path] + nomodel,
        "annotations[1]",
        "image_id 1 is not in 'images'",
    )
    data, _ = vrft_fixture(tmp_path, {"397133": [], "289343": [], "123": ["cat"]})
    one_line(
        ["--benchmark", "vrft_coco_ov", "--data", data] + nomodel,
        registry.EXIST_MAP,
        "another split",
    )
    one_line(
        ["--benchmark", "vrft_coco_ov", "--data", data, "--rescale-boxes", "true"] + nomodel,
        "--rescale-boxes does not apply",
    )
    one_line(
        ["--benchmark", "ovdeval", "--data", str(tmp_path), "--exist-map", "x"] + nomodel,
        "--exist-map applies to",
    )


def test_tiny_model_evaluates_each_fixture(tmp_path, capsys):
    """The tiny detection model decodes every detection fixture from its published files (COCO,
    ODinW and Visual-RFT from one --data folder, OVDEval's folder of sub-tasks), and --predictions
    on its lines gives the same summaries."""
    top = tmp_path / "pub"
    write(top / "instances_val2017.json", coco_gt())
    write(top / registry.EXIST_MAP, {"397133": ["cat", "mouse"], "289343": ["dog", "bus"]})
    for im in coco_gt()["images"]:
        _image(str(tmp_path / "val2017" / im["file_name"]), (im["width"] // 8, im["height"] // 8))
    odinw_folder(top)
    write(top / "ovd" / "negation.json", OVD)
    _image(
        str(tmp_path / "ovdimg" / "images" / "negation" / OVD["images"][0]["file_name"]), (68, 51)
    )
    runs = [
        (
            ["coco_val2017", "odinw13", "vrft_coco_fewshot", "vrft_coco_ov"],
            str(top),
            str(tmp_path / "val2017"),
        ),
        (["ovdeval"], str(top / "ovd"), str(tmp_path / "ovdimg")),
    ]
    for names, data, root in runs:
        out = str(tmp_path / "m.json")
        flags = ["--benchmark", *names, "--data", data, "--json", out, "--max-new-tokens", "4"]
        code, stdout, err = run_eval(
            flags + ["--image-root", root, "--model", TINY, "--batch-size", "8"], capsys
        )
        assert code == 0, err
        first = summaries_of(out)
        assert [s["benchmark"] for s in first] == names and all(s["n"] for s in first)
        assert all(line["output"] is not None for line in lines_of(out))
        again = str(tmp_path / "again.json")
        code, _, err = run_eval(
            [
                "--benchmark",
                *names,
                "--data",
                data,
                "--json",
                again,
                "--image-root",
                root,
                "--predictions",
                out[:-5] + ".jsonl",
            ],
            capsys,
        )
        assert code == 0, err
        for a, b in zip(first, summaries_of(again), strict=True):
            assert {k: a[k] for k in ("n", "map", "f1_50", "parsed_rate")} == pytest.approx(
                {k: b[k] for k in ("n", "map", "f1_50", "parsed_rate")}, nan_ok=True
            )
