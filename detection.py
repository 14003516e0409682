"""The detection benchmarks of registry.py (part 2): COCO-style ground truth read as published, the
queries each official script builds, the official answer parsers, box confidences, and the
corpus-level metrics (pycocotools COCO AP, Visual-RFT's per-class mean, OVDEval's NMS-AP, and
precision / recall / F1 at IoU 0.5). Pure functions of the files and the answers; no model.

Sources (commits in ../shared/BENCHMARKS.md): Vision-R1 = jefferyZhan/Griffon 9866875
Vision-R1/eval/eval_localization.py; Visual-RFT = Liuziyu77/Visual-RFT 9486633
coco_evaluation/Qwen2_VL_coco_infere.py and coco_evaluation.py; VLM-R1 = om-ai-lab/VLM-R1 90052f4
src/open-r1-multimodal/src/open_r1/grpo_jsonl.py (its OVD reward: the evaluator was never
released); OVDEval = om-ai-lab/OVDEval 2ba0aa9 eval.py. The official code is the specification;
the code here is ours.
"""

import ast
import contextlib
import io
import json
import math
import os
import re
from dataclasses import dataclass, field

import data
import rewards


# ---------------------------------------------------------------------------------------------
# Ground truth: one COCO-style file
# ---------------------------------------------------------------------------------------------
@dataclass
class GtSet:
    """One COCO-style annotation file: `name` (the data set or sub-task), images {id: image dict},
    categories {id: name}, annotations by image id, and the folder its file_names are in."""

    name: str
    path: str
    images: dict
    categories: dict
    by_image: dict
    image_dir: str = ""
    extra: dict = field(default_factory=dict)

    def names_to_ids(self):
        return {n.lower(): i for i, n in self.categories.items()}


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_gt(path, name="", image_dir=""):
    """A COCO-style file (instances_val2017.json, GLIP's ODinW, OVDEval's) checked: `categories`,
    `images` and `annotations` lists; every annotation's image and category exist; bbox [x, y, w, h]
    of finite numbers. Errors are one line naming the file (and the annotation's index)."""
    if not os.path.isfile(path):
        raise data.BadInput(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise data.BadInput(" ".join(f"{path}: cannot be read ({e})".split())[:300]) from None
    if not isinstance(d, dict):
        raise data.BadInput(f"{path}: expected a COCO-style JSON object")
    for key in ("categories", "images", "annotations"):
        if not isinstance(d.get(key), list):
            raise data.BadInput(f"{path}: no {key!r} list (not a COCO-style annotation file)")
    cats, images = {}, {}
    for i, c in enumerate(d["categories"]):
        if not (
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
        ):
            raise data.BadInput(f"{path}: categories[{i}] needs an integer id and a name")
        cats[c["id"]] = c["name"]
    for i, im in enumerate(d["images"]):
        ok = isinstance(im, dict) and isinstance(im.get("id"), int)
        ok = ok and isinstance(im.get("file_name"), str) and _num(im.get("width"))
        if not (ok and _num(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            raise data.BadInput(
                f"{path}: images[{i}] needs an integer id, file_name, width, height"
            )
        images[im["id"]] = im
    by_image = {i: [] for i in images}
    for i, a in enumerate(d["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(a, dict):
            raise data.BadInput(f"{where}: expected an object")
        if a.get("image_id") not in images:
            raise data.BadInput(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        if a.get("category_id") not in cats:
            raise data.BadInput(
                f"{where}: category_id {a.get('category_id')!r} not in 'categories'"
            )
        b = a.get("bbox")
        if not (isinstance(b, list) and len(b) == 4 and all(map(_num, b)) and b[2] >= 0 <= b[3]):
            raise data.BadInput(f"{where}: 'bbox' must be [x, y, w, h], got {str(b)[:60]}")
        by_image[a["image_id"]].append(a)
    return GtSet(name or os.path.basename(path), path, images, cats, by_image, image_dir, d)


# ---------------------------------------------------------------------------------------------
# The queries each official script builds
# ---------------------------------------------------------------------------------------------
def _query(Query, gt, qid, image, cat_ids, names):
    """A Query for `image` asking about categories `cat_ids` (their `names` fill the prompt)."""
    W, H = image["width"], image["height"]
    truth = [
        {"bbox": a["bbox"], "category_id": a["category_id"]}
        for a in gt.by_image[image["id"]]
        if a["category_id"] in cat_ids and not a.get("iscrowd")
    ]
    q = Query(id=qid, where=f"{gt.path}: image {image['id']}", truth=truth, size=(W, H))
    q.image = os.path.join(gt.image_dir, image["file_name"]) if gt.image_dir else image["file_name"]
    q.fields = {"categories": ", ".join(names), "category": names[0] if len(names) == 1 else ""}
    q.gt, q.image_id, q.cat_ids = gt, image["id"], list(cat_ids)
    return q


def coco_queries(Query, gt, prefix=""):
    """Vision-R1's EVALDataset (eval_localization.py:440-458): one query per image (file order),
    naming every category in the file's order joined by ", " (80 for COCO; the padding with COCO
    names of a smaller set is not reproduced: COCO has 80)."""
    cats = list(gt.categories)
    names = [gt.categories[c] for c in cats]
    return [_query(Query, gt, f"{prefix}{i}", im, cats, names) for i, im in gt.images.items()]


def positive_queries(Query, gt, prefix=""):
    """Vision-R1's SINGLE_POS_EVALDataset (eval_localization.py:553-575, --single --pos): one query
    per image and category present in its truth, categories in the file's order."""
    out = []
    for i, im in gt.images.items():
        present = {a["category_id"] for a in gt.by_image[i]}
        for c in (c for c in gt.categories if c in present):
            out.append(_query(Query, gt, f"{prefix}{i}:{c}", im, [c], [gt.categories[c]]))
    return out


def exist_map_queries(Query, gt, exist_map_path, selected):
    """Visual-RFT (Qwen2_VL_coco_infere.py:220-243): for each image in file order, each category of
    exist_map[str(image_id)] that is in `selected`, one query; the map must be for this file's
    split (its keys the file's image ids)."""
    if not os.path.isfile(exist_map_path):
        raise data.BadInput(
            f"{exist_map_path}: no such file (Visual-RFT's exist_map; --exist-map FILE names it)"
        )
    try:
        with open(exist_map_path) as f:
            em = json.load(f)
    except (OSError, ValueError) as e:
        raise data.BadInput(f"{exist_map_path}: cannot be read ({str(e)[:120]})") from None
    if not isinstance(em, dict):
        raise data.BadInput(f"{exist_map_path}: expected an object {{image id: [category, ...]}}")
    ids = {str(i) for i in gt.images}
    extra = next((k for k in em if k not in ids), None)
    missing = next((i for i in ids if i not in em), None)
    if extra is not None or missing is not None:
        what = f"key {extra!r} is not" if extra is not None else f"image {missing} has no key; not"
        raise data.BadInput(
            f"{exist_map_path}: {what} an image of {gt.path} (an exist_map for another split?)"
        )
    name_to_id = {n: i for i, n in gt.categories.items()}
    unknown = [s for s in selected if s not in name_to_id]
    if unknown:
        raise data.BadInput(f"{gt.path}: no category {unknown[0]!r} (Visual-RFT's list is COCO's)")
    out = []
    for i, im in gt.images.items():
        names = em[str(i)]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise data.BadInput(f"{exist_map_path}: key {str(i)!r} must be a list of names")
        for n in (n for n in names if n in selected):
            out.append(_query(Query, gt, f"{i}:{name_to_id[n]}", im, [name_to_id[n]], [n]))
    return out


def ovdeval_queries(Query, gt, prefix=""):
    """OVDEval (Evaluation.md): one query per image over its labels text + neg_text (positives
    first), each a category name of the file."""
    name_to_id = {n: i for i, n in gt.categories.items()}
    out = []
    for i, im in gt.images.items():
        labels = []
        for key in ("text", "neg_text"):
            v = im.get(key)
            if not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
                raise data.BadInput(f"{gt.path}: image {i}: {key!r} must be a list of labels")
            labels += v
        bad = next((s for s in labels if s not in name_to_id), None)
        if bad is not None:
            raise data.BadInput(f"{gt.path}: image {i}: label {bad!r} is not a category name")
        labels = list(dict.fromkeys(labels))
        ids = [name_to_id[s] for s in labels]
        out.append(_query(Query, gt, f"{prefix}{i}", im, ids, labels))
    return out


# ---------------------------------------------------------------------------------------------
# Official parsers: text -> [(box, label or None, confidence or None)] in the answer's order
# ---------------------------------------------------------------------------------------------
def _json_fence_lines(text):
    """eval_localization.py:226-234: after a line that is exactly ```json, up to the next ```."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line == "```json":
            return "\n".join(lines[i + 1 :]).split("```")[0]
    return text


def vision_r1_parse(text):
    """Vision-R1 (eval_localization.py:1066-1092). Lenient: ast.literal_eval of the fenced text
    (or the whole output); a cut-off list is repaired by cutting after the last '"}' and adding
    ']'. Strict: a label must equal a category name (lower-cased); an item without bbox_2d or label
    is dropped; an output that still does not parse gives no boxes (None)."""
    s = _json_fence_lines(text)
    try:
        items = ast.literal_eval(s)
    except Exception:  # the official except: anything
        try:
            items = ast.literal_eval(s[: s.rfind('"}') + 2] + "]")
        except Exception:
            return None
    try:
        out = []
        for it in items:
            if isinstance(it, dict) and "bbox_2d" in it and isinstance(it.get("label"), str):
                out.append((it["bbox_2d"], it["label"], it.get("score", it.get("confidence"))))
        return out
    except TypeError:  # not iterable
        return None


VRFT_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def vrft_parse(text):
    """Visual-RFT (Qwen2_VL_coco_infere.py:293-321, extract_bbox :56-87). Lenient: "[[" / "]]" made
    single, newlines and ", ..." removed; with no <answer>...</answer> the whole output is tried; an
    answer not ending in "]" is cut at the last "}," and closed with "}]"; quotes ' become ".
    Strict: json.loads; an empty list or a list of strings gives no boxes; exact duplicate
    Positions are dropped; the items are read in order and the first without a Position or
    Confidence ends the list (the official exception), the boxes before it kept."""
    s = text.replace("[[", "[").replace("]]", "]").replace("\n", "").replace(", ...", "")
    m = VRFT_ANSWER.search(s)
    s = m.group(1).strip() if m else s.strip()
    if not s.endswith("]"):
        s = s.rsplit("},", 1)[0] + "}]"
    try:
        items = json.loads(s.replace("'", '"'))
    except ValueError:
        return None
    if not isinstance(items, list) or not items or isinstance(items[0], str):
        return None
    out, seen = [], set()
    try:
        for it in items:  # remove_duplicates (:149-161) runs first: a missing Position ends all
            key = tuple(it["Position"])
            if key not in seen:
                seen.add(key)
                out.append(it)
    except (KeyError, TypeError):
        return None
    boxes = []
    for it in out:
        p, c = it.get("Position"), it.get("Confidence")
        if not (isinstance(p, list) and len(p) == 4 and all(map(_num, p)) and _num(c)):
            break
        boxes.append((p, None, c))
    return boxes


ANSWER_ALL = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
JSON_FENCE = re.compile(r"```json(.*?)```", re.DOTALL)


def vlmr1_ovd_parse(text):
    """VLM-R1's OVD reward (grpo_jsonl.py:404-405 the last <answer>, :324-331 the last ```json
    block, json.loads). Strict: no repair of cut-off JSON (no boxes); "None" is no boxes; an item
    that is not {bbox_2d, label} is dropped (:274-284)."""
    answers = ANSWER_ALL.findall(text)
    if not answers:
        return None
    fences = JSON_FENCE.findall(answers[-1].strip())
    if not fences:
        return [] if answers[-1].strip() == "None" else None
    try:
        items = json.loads(fences[-1].strip())
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    out = []
    for it in items:
        if isinstance(it, dict) and "bbox_2d" in it and isinstance(it.get("label"), str):
            out.append((it["bbox_2d"], it["label"], it.get("score", it.get("confidence"))))
    return out


def native_parse(text):
    """Ours (not official): the <answer>'s JSON list (a ```json fence allowed) of dicts with a box
    (bbox_2d / bbox / box / position), a label and a confidence if any; a bad item dropped."""
    answer = rewards.extract_answer(text)
    if answer is None:
        return None
    m = rewards.FENCE_RE.fullmatch(answer)
    try:
        items = json.loads(m.group(1) if m else answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list):
        return None
    out = []
    for it in items:
        d = rewards._detection(it)
        if d is not None:
            low = {str(k).strip().lower(): v for k, v in it.items()}
            out.append(
                (d[0], low.get("label") if isinstance(low.get("label"), str) else None, d[1])
            )
    return out


# ---------------------------------------------------------------------------------------------
# Boxes -> COCO results
# ---------------------------------------------------------------------------------------------
def to_results(q, items, space, input_size, score):
    """[{image_id, category_id, bbox [x, y, w, h] in original pixels, score}] in the answer's
    order. `space`: "resized" (x W / input w, Vision-R1 :1079-1081 and VLM-R1's REC rescale),
    "norm1000" (x W / 1000, Visual-RFT trans_bbox :128-146), "none" (as given), or a family
    coord_space (the native prompt). A label picks the category by lower-cased name among the
    file's categories, as Vision-R1's catname2id (:861, :1083; unknown: dropped); an unlabelled box
    takes the query's only category.
    `score`: ("constant", c) or ("stated", c): the stated confidence, else c."""
    W, H = q.size
    names = q.gt.names_to_ids()
    out = []
    for box, label, conf in items:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_num, box))):
            continue
        if label is not None:
            cat = names.get(label.lower())
        else:
            cat = q.cat_ids[0] if len(q.cat_ids) == 1 else None
        if cat is None:
            continue
        if space == "resized":
            sx, sy = W / input_size[0], H / input_size[1]
        elif space == "norm1000":
            sx, sy = W / 1000, H / 1000
        elif space == "none":
            sx = sy = 1.0
        else:
            gt = {"coord_space": space, "width": W, "height": H}
            if space == "abs_resized":
                gt.update(input_width=input_size[0], input_height=input_size[1])
            sx, sy = rewards.to_original_pixels([1, 1, 1, 1], gt)[:2]
        x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
        kind, c = score
        s = float(conf) if kind == "stated" and _num(conf) else c
        out.append(
            {
                "image_id": q.image_id,
                "category_id": cat,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": s,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def nms_by_truth(results, truths, thr=0.5):
    """OVDEval's NMS (eval.py:30-64), per image: for each true box (any category), the predictions
    (any category) with IoU > thr; the highest-scoring one is kept and the others dropped, unless
    kept for another true box. Departure: among equal scores the first in the answer's order is
    kept (a stable sort); the official np.argsort(...)[::-1] leaves it to the sort."""
    keep, drop = set(), set()
    for t in truths:
        hits = [
            i
            for i, r in enumerate(results)
            if rewards.box_iou(_xyxy(r["bbox"]), _xyxy(t["bbox"])) > thr
        ]
        hits.sort(key=lambda i: -results[i]["score"])  # stable: answer order among ties
        if hits:
            keep.add(hits[0])
            drop.update(hits[1:])
    return [r for i, r in enumerate(results) if i not in drop - keep]


def coco_eval(gt, results, img_ids):
    """pycocotools COCOeval('bbox') on `gt` restricted to img_ids (the results in the given order:
    COCOeval's stable mergesort keeps it among equal scores). Returns (stats, per-class AP as
    coco_evaluation.py:119-131 computes it: the mean of precision[:, :, k, 0, -1] > -1, nan for a
    class with no truth)."""
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    d = gt.extra
    anns = []
    for a in (a for i in img_ids for a in gt.by_image[i]):
        w, h = a["bbox"][2], a["bbox"][3]
        anns.append({**a, "area": a.get("area", w * h), "iscrowd": a.get("iscrowd", 0)})
    for k, a in enumerate(anns):
        a.setdefault("id", k + 1)
    base = {"images": [gt.images[i] for i in img_ids], "categories": d["categories"]}
    wanted = set(img_ids)
    dts = [  # COCO.loadRes (:331-343): area w*h, ids from 1, iscrowd 0
        {**r, "area": r["bbox"][2] * r["bbox"][3], "id": k + 1, "iscrowd": 0}
        for k, r in enumerate(r for r in results if r["image_id"] in wanted)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        cg, cd = COCO(), COCO()
        cg.dataset, cd.dataset = {**base, "annotations": anns}, {**base, "annotations": dts}
        cg.createIndex()
        cd.createIndex()
        e = COCOeval(cg, cd, "bbox")
        e.params.imgIds = sorted(img_ids)
        e.evaluate()
        e.accumulate()
        e.summarize()
    p = e.eval["precision"]
    per_class = {}
    for k, c in enumerate(e.params.catIds):
        v = p[:, :, k, 0, -1]
        v = v[v > -1]
        per_class[gt.categories[c]] = float(np.mean(v)) if v.size else float("nan")
    return [float(x) for x in e.stats], per_class


def greedy_f1(results, truths, cats, thr=0.5):
    """{category: [true positives, #pred, #true]} at IoU >= thr: within each (image, category) the
    pair of highest IoU is matched first, one to one (the greedy matching of VLM-R1's
    detection_score reward; Rex-Omni reports F1 for generative detectors)."""
    out = {c: [0, 0, 0] for c in cats}
    groups = {}
    for k, rows in ((0, results), (1, truths)):
        for r in rows:
            if r["category_id"] in out:
                groups.setdefault((r["image_id"], r["category_id"]), ([], []))[k].append(r)
    for (_, c), (P, T) in groups.items():
        pairs = sorted(
            (
                (rewards.box_iou(_xyxy(p["bbox"]), _xyxy(t["bbox"])), a, b)
                for a, p in enumerate(P)
                for b, t in enumerate(T)
            ),
            key=lambda x: -x[0],
        )
        used_p, used_t = set(), set()
        for iou, a, b in pairs:
            if iou < thr:
                break
            if a not in used_p and b not in used_t:
                used_p.add(a)
                used_t.add(b)
        out[c][0] += len(used_p)
        out[c][1] += len(P)
        out[c][2] += len(T)
    return out


def prf(tp, npred, ntrue):
    p = tp / npred if npred else 0.0
    r = tp / ntrue if ntrue else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def summarizer(kind, selected=()):
    """summarize(records, queries, every) for a detection entry. Per annotation file: the answers'
    results in query order (OVDEval: after nms_by_truth), COCOeval over the file's images (`every`)
    or the scored queries' images (--n), then: coco: AP, AP50, AP75; mean: the unweighted mean of
    the files' APs (ODinW-13); nms: the same over OVDEval's sub-tasks (NMS-AP); per_class: the mean
    of per-class AP over `selected` (Visual-RFT's notebook divides by the list's length). Beside
    it, greedy precision / recall / F1 at IoU 0.5 per category (macro means over the categories
    with a true or a predicted box; `per_class_f1_50` each)."""

    def summarize(records, queries, every=True):
        sets = {}
        for r, q in zip(records, queries, strict=True):
            if not q.bad:
                sets.setdefault(id(q.gt), (q.gt, [], set()))
                sets[id(q.gt)][1].extend(r.get("parsed") or [])
                sets[id(q.gt)][2].add(q.image_id)
        per_set, per_class, counts = {}, {}, {}
        for gt, results, seen in sets.values():
            imgs = sorted(gt.images) if every else sorted(seen)
            if kind == "nms":
                by_image = {}
                for x in results:
                    by_image.setdefault(x["image_id"], []).append(x)
                results = [
                    r for i in imgs for r in nms_by_truth(by_image.get(i, []), gt.by_image[i])
                ]
            stats, pc = coco_eval(gt, results, imgs)
            per_set[gt.name] = {"map": stats[0], "ap50": stats[1], "ap75": stats[2]}
            cats = [c for c, n in gt.categories.items() if not selected or n in selected]
            truths = [
                {"image_id": i, **t}
                for i in imgs
                for t in gt.by_image[i]
                if t["category_id"] in cats and not t.get("iscrowd")
            ]
            for c, v in greedy_f1(
                [x for x in results if x["category_id"] in cats], truths, cats
            ).items():
                counts[f"{gt.name}/{gt.categories[c]}" if len(sets) > 1 else gt.categories[c]] = v
            per_class.update({n: pc[n] for n in selected if n in pc})
        n = len(records)
        s = {
            "n": n,
            "parsed_rate": sum(r["parsed"] is not None for r in records) / n if n else math.nan,
        }
        s["boxes"] = sum(len(r.get("parsed") or []) for r in records)
        keys = ("map", "ap50", "ap75")
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        s.update({k: mean([v[k] for v in per_set.values()]) for k in keys})
        if kind == "per_class":
            s["map_all"] = s[
                "map"
            ]  # COCOeval's own AP over every category (the notebook's first line)
            s["map"] = sum(per_class.get(n, math.nan) for n in selected) / len(selected)
            s["per_class_ap"] = {n: per_class.get(n, math.nan) for n in selected}
        if len(per_set) > 1 or kind in ("mean", "nms"):
            s["per_set"] = per_set
        live = {k: prf(*v) for k, v in counts.items() if v[1] or v[2]}
        for j, k in enumerate(("precision50", "recall50", "f1_50")):
            s[k] = mean([v[j] for v in live.values()])
        s["per_class_f1_50"] = {k: v[2] for k, v in live.items()}
        return s

    return summarize
