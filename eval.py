"""Evaluate checkpoints with batched greedy decoding and one prompt for every model.

    python eval.py --task rec|cls|count|det --model PATH [PATH ...] [--data DATA --image-root DIR
    [--skip-bad-rows]] [--split test ood] [--n 512] --json OUT [--visualize N]

--data takes every format grpo_vlm.py's --train-data takes (data.load_data: problem/solution, VLM-R1
conversations and chat messages JSONL; parquet, Arrow, a save_to_disk folder, a hub id; several
joined by ':'), with the same key flags.

The decoding is evaluation.evaluate with grpo_vlm.greedy (the trainer's held-out eval); the metrics
by task are rewards.score/summarize:
  rec:   acc50 (IoU >= 0.5), miou, center_error, area_ratio, right_object, format_rate
  cls:   accuracy (normalized exact match), format_rate
  count: accuracy (exact numeric match), mae, parsed_rate, format_rate
  det:   map (COCO-style, IoU 0.50:0.95, 101-point), ap50, ap75, pred_per_gt (#pred / #gt),
         parsed_rate, format_rate
Writes JSON summaries and per-sample predictions as JSONL beside them (OUT with .jsonl), and prints
a markdown table of every model x split. --visualize N (rec, det) also draws the first N images of
each split with the true boxes and every model's boxes in its own colour, the phrase and the IoU
(viz.py), as OUT-SPLIT.png beside OUT. A bad row or image in --data stops it before any model loads,
with one line "error: FILE:LINE: what is wrong"; with --skip-bad-rows such rows are counted, listed
on stderr and recorded as `bad_rows` in the summaries.

The papers' published benchmarks (registry.py; README "Reproducing the papers"):

    python eval.py --benchmark NAME [NAME ...] --data FILE_OR_FOLDER --image-root DIR
        --model M [M ...] [--prompt paper|baseline|native] [--subset official|full]
        [--rescale-boxes true|false] [--box-score official|constant|stated]
        [--exist-map FILE] [--n N] [--json OUT]
    python eval.py --benchmark NAME --data FILE --predictions PREDS.jsonl [--model M]

read each published file as it is, prompt, decode and score as the paper's evaluator did, and print
a table beside the papers' numbers. Under torchrun the queries are split in whole batches.
"""

import argparse
import json
import os
import sys
import time

import torch

import data
import evaluation
import grpo_vlm as g
import infra
import registry
import tools
import viz
import vlm

TABLE = {
    "rec": [
        ("Acc@0.5", "acc50"),
        ("mIoU", "miou"),
        ("centre err", "center_error"),
        ("area ratio", "area_ratio"),
        ("right object", "right_object"),
        ("format", "format_rate"),
    ],
    "cls": [("accuracy", "accuracy"), ("format", "format_rate")],
    "zoom": [("accuracy", "accuracy"), ("tool", "tool_rate"), ("format", "format_rate")],
    "count": [
        ("accuracy", "accuracy"),
        ("MAE", "mae"),
        ("parsed", "parsed_rate"),
        ("format", "format_rate"),
    ],
    "det": [
        ("mAP", "map"),
        ("AP50", "ap50"),
        ("AP75", "ap75"),
        ("#pred/#gt", "pred_per_gt"),
        ("parsed", "parsed_rate"),
        ("format", "format_rate"),
    ],
}


def markdown_table(summaries, task="rec"):
    cols = TABLE[task]
    lines = [
        "| model | split | " + " | ".join(h for h, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for s in summaries:
        lines.append(
            f"| {s['model']} | {s['split']} | " + " | ".join(f"{s[k]:.3f}" for _, k in cols) + " |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=[],
        help="checkpoint paths or hub ids (default: the task's tiny base)",
    )
    p.add_argument("--task", default="rec", choices=data.TASKS, help="task to evaluate")
    p.add_argument(
        "--data",
        default="",
        help="rows in any --train-data format; empty: the synthetic world's --split",
    )
    p.add_argument(
        "--image-root",
        default="",
        help="folder the rows' image paths are relative to (':' one per source)",
    )
    for what, default in data.DEFAULT_KEYS.items():
        p.add_argument(
            f"--{what}-key", default="", help=f"key of the {what} (empty: {' or '.join(default)})"
        )
    p.add_argument(
        "--split",
        nargs="+",
        default=["test"],
        choices=["test", "ood", "train"],
        help="synthetic splits: test (in-domain), ood (colour-shape pairs never seen in training)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of samples (first n rows; default 512); --benchmark: cap after the subset "
        "(default: all)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="prompts per greedy generate call (0: 64; --benchmark: the official script's)",
    )
    p.add_argument(
        "--max-tool-calls",
        type=int,
        default=0,
        help="conversations with up to N zoom-tool calls (tools.py; 0: single-turn); the "
        "generated tokens of all turns count toward --max-new-tokens",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        help="completion length limit (0: 64, det 160; --benchmark: the official one)",
    )
    b = p.add_argument_group("published benchmarks (registry.py)")
    b.add_argument(
        "--benchmark",
        nargs="+",
        default=[],
        metavar="NAME",
        help=f"evaluate these published benchmarks: {', '.join(registry.BENCHMARKS)}",
    )
    b.add_argument(
        "--prompt",
        default="paper",
        choices=["paper", "baseline", "native"],
        help="the paper's RL prompt, its baseline prompt, or the family's own (not official)",
    )
    b.add_argument(
        "--subset",
        default="official",
        choices=["official", "full"],
        help="official: the paper's subset rule (VLM-R1 REC: seed-42 shuffle, first 2000); full: "
        "every row",
    )
    b.add_argument(
        "--rescale-boxes",
        default=None,
        type=infra.boolean,
        metavar="BOOL",
        help="map boxes from the resized input to original pixels (default: the entry's official "
        "behaviour; VLM-R1: true, false for the April 2025 paper)",
    )
    b.add_argument(
        "--box-score",
        default="official",
        choices=["official", "constant", "stated"],
        help="detection box confidences: the official ones (Vision-R1 0.99, VLM-R1 1.0, "
        "Visual-RFT the stated Confidence), the entry's constant, or the stated one",
    )
    b.add_argument(
        "--exist-map",
        default="",
        metavar="FILE",
        help="Visual-RFT's exist_map (default: exist_map_coco_Qwen2_vl_2B_baseline.json beside "
        "--data)",
    )
    b.add_argument(
        "--predictions",
        default="",
        metavar="PREDS.jsonl",
        help="score outputs made elsewhere (lines with id, output[, input_size, model, benchmark])",
    )
    p.add_argument(
        "--json",
        default="eval.json",
        help="summaries output; predictions go to the same name .jsonl",
    )
    p.add_argument(
        "--skip-bad-rows",
        nargs="?",
        const=True,
        default=False,
        type=infra.boolean,
        metavar="BOOL",
        help="skip and count --data rows whose JSON, text, box or image is unusable, instead of "
        "stopping",
    )
    p.add_argument(
        "--visualize",
        type=int,
        default=0,
        metavar="N",
        help="rec, det: draw the first N images of each split with every model's boxes "
        "(OUT-SPLIT.png)",
    )
    a = p.parse_args()
    if a.max_tool_calls and a.benchmark:
        p.error(
            "--max-tool-calls: the benchmarks are scored single-turn, as the papers scored them"
        )
    if a.benchmark:
        return benchmarks(a)
    a.n, a.batch_size = a.n or 512, a.batch_size or 64
    if a.visualize and a.task not in viz.TASKS and not a.max_tool_calls:
        p.error(f"--visualize draws boxes: --task {' or '.join(viz.TASKS)}, or --max-tool-calls")
    a.model = a.model or [g.tiny_model(a.task)]
    try:
        run(a)
    except (
        data.BadInput
    ) as e:  # a bad row (checked before any model loads) or an image that fails to decode later
        sys.exit(f"error: {e}")


def run(a):
    splits = ["file"] if a.data else a.split
    bad = []
    if a.data:  # every row up to the first n good ones is checked before any model loads
        file_rows, bad = data.load_data(
            a.data, a.image_root, a.task, a.skip_bad_rows, a.n, data.keys_of(a)
        )
        if bad:
            more = [f"... and {len(bad) - 10} more"] if len(bad) > 10 else []
            print(
                f"skipped {len(bad)} bad rows:",
                *bad[:10],
                *more,
                sep="\n  ",
                file=sys.stderr,
                flush=True,
            )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summaries, all_preds = [], []
    rows_of = {
        split: file_rows if a.data else data.synthetic_split(split, a.n, a.task) for split in splits
    }
    for path in a.model:
        model, family = vlm.load(path, device)
        model.eval()
        tools.check_family(model.config.model_type, a.max_tool_calls)
        for split in splits:
            rows = rows_of[split]
            summary, preds = evaluation.evaluate(
                g.greedy,
                model,
                family,
                rows,
                family.coord_space,
                a.task,
                a.batch_size,
                a.max_new_tokens,
                a.max_tool_calls,
            )
            calls = {"max_tool_calls": a.max_tool_calls} if a.max_tool_calls else {}
            summary = {"model": path, "split": split, **summary, **calls, "bad_rows": len(bad)}
            summaries.append(summary)
            all_preds += [{"model": path, "split": split, **q} for q in preds]
            print(json.dumps(summaries[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summaries[0] if len(summaries) == 1 else summaries, f, indent=2)
    with open(os.path.splitext(a.json)[0] + ".jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in all_preds)
    print(markdown_table(summaries, a.task))
    for split in splits if a.visualize and a.max_tool_calls else []:  # the crops the model chose
        for k, m in enumerate(a.model):
            preds = [q for q in all_preds if q["model"] == m and q["split"] == split]
            out = f"{os.path.splitext(a.json)[0]}-{split}-{k}-zoom.png"
            print(f"saved {viz.tool_pictures(out, rows_of[split], preds, a.visualize)}", flush=True)
    for split in splits if a.visualize and a.task in viz.TASKS else []:
        labels = [viz.model_label(m) for m in a.model]
        labels = (
            labels if len(set(labels)) == len(labels) else a.model
        )  # never two models under one name
        preds = {
            label: [q for q in all_preds if q["model"] == m and q["split"] == split]
            for label, m in zip(labels, a.model)
        }
        path = viz.save_grid(
            f"{os.path.splitext(a.json)[0]}-{split}.png", a.task, rows_of[split], preds, a.visualize
        )
        print(f"saved {path}", flush=True)


# ---------------------------------------------------------------------------------------------
# --benchmark: the papers' published benchmarks (registry.py), scored as the papers scored them
# ---------------------------------------------------------------------------------------------
def greedy_texts(model, family, rows, max_new_tokens):
    """THE decoding call of --benchmark (the one place to re-point): greedy completions of a batch
    of rows (each with `image_path` and `_chat`), and their sizes (input w, input h, W, H)."""
    prompt, sizes = family.encode(rows, model.device.type)
    o = g.greedy(model, family, prompt, max_new_tokens)
    return vlm.completion_texts(family.tokenizer, o, vlm.completion_mask(o, family.eos_id)), sizes


def benchmarks(a):
    """eval.py --benchmark: check every flag, file, row and image (one line, before any model
    loads), then decode with each --model or read --predictions, score, and write the summaries,
    one line per query and the table."""
    try:
        plan = benchmark_plan(a)
    except (data.BadInput, ValueError) as e:
        sys.exit(f"error: {e}")
    rank, world, device = infra.setup_distributed()
    if a.predictions:
        results = from_predictions(a, plan)
    else:
        results = []
        for path in a.model:
            results += decode_model(a, plan, path, rank, world, device)
    if rank == 0:
        write_results(a, results)
    if world > 1:
        torch.distributed.destroy_process_group()


def _rescale(a, bench):
    """Whether this benchmark's official boxes are rescaled (--rescale-boxes, else the entry's)."""
    return bench.rescale if a.rescale_boxes is None else a.rescale_boxes


def benchmark_plan(a):
    """[(entry, prompt, queries scored, bad rows, every row's id)] for the named benchmarks, every
    check done: ValueError or data.BadInput with one line."""
    unknown = [n for n in a.benchmark if n not in registry.BENCHMARKS]
    if unknown:
        raise ValueError(
            f"unknown benchmark {unknown[0]!r}; known: {', '.join(registry.BENCHMARKS)}"
        )
    if not a.data:
        raise ValueError("--benchmark needs --data: the published file, or a folder holding it")
    if len(a.benchmark) > 1 and not os.path.isdir(a.data):
        raise ValueError(
            f"{len(a.benchmark)} benchmarks need --data to be a folder holding their files; "
            f"{a.data} is not a folder"
        )
    if not a.predictions and not a.model:
        raise ValueError("--benchmark needs --model (one or more) or --predictions PREDS.jsonl")
    if a.visualize:
        raise ValueError("--visualize draws --data rows or the synthetic splits, not --benchmark")
    for flag, default in (("box_score", "official"), ("exist_map", "")):
        if getattr(a, flag) != default and not any(
            flag in registry.BENCHMARKS[n].options for n in a.benchmark
        ):
            raise ValueError(f"--{flag.replace('_', '-')} applies to detection entries only")
    plan = []
    for name in dict.fromkeys(a.benchmark):
        bench = registry.BENCHMARKS[name]
        prompt = registry.prompt_of(bench, a.prompt)
        if a.rescale_boxes is not None and (bench.rescale is None or not prompt.official):
            why = "has no boxes" if bench.rescale is None else "follows the family's coordinates"
            raise ValueError(
                f"--rescale-boxes does not apply to {name} "
                f"({'it' if bench.rescale is None else 'its native prompt'} {why})"
            )
        path = os.path.join(a.data, bench.file) if os.path.isdir(a.data) else a.data
        queries = bench.read(path, a.image_root, **_options(a, bench, "exist_map"))
        if not a.skip_bad_rows:
            first = next((q for q in queries if q.bad), None)
            if first:
                raise data.BadInput(first.bad)
        chosen = registry.select(bench, queries, a.subset, a.n or 0)
        if not a.predictions or a.image_root:  # the images are needed to decode, or were given
            registry.check_images(chosen, a.image_root, a.skip_bad_rows)
        bad = [q.bad for q in queries if q.bad]
        if a.subset == "full":  # a bad row found among the images is dropped too
            chosen = [q for q in chosen if not q.bad]
        if not any(not q.bad for q in chosen):
            raise data.BadInput(
                f"{path}: no usable rows" + (f" (the first bad: {bad[0]})" * bool(bad))
            )
        if bad and os.environ.get("RANK", "0") == "0":  # one process says it
            more = [f"... and {len(bad) - 10} more"] if len(bad) > 10 else []
            print(f"{name}: {len(bad)} bad rows:", *bad[:10], *more, sep="\n  ", file=sys.stderr)
        plan.append((bench, prompt, chosen, bad, {q.id for q in queries}))
    return plan


def _options(a, bench, *names):
    """The eval.py flags among `names` that this entry's reader or judge takes."""
    return {k: getattr(a, k) for k in names if k in bench.options}


def _record(bench, prompt, q, model, output, size, rescale, coord_space, opts=None):
    """One scored query: the JSONL line (id, model, benchmark, output, parsed, truth, correct, and
    input_size [w, h] where boxes are rescaled)."""
    line = {"id": q.id, "model": model, "benchmark": bench.name, "output": output}
    if q.bad:
        line.update(parsed=None, correct=0, bad=q.bad)
    elif output is None:  # no prediction: wrong, and kept in the denominator
        line.update(parsed=None, correct=0)
    else:
        line.update(bench.judge(prompt, q, output, size, rescale, coord_space, **(opts or {})))
    line["truth"] = q.truth
    resized = rescale if prompt.official else coord_space == "abs_resized"
    if bench.task in ("rec", "det") and resized and size:
        line["input_size"] = list(size)
    return line


def _summary(a, bench, prompt, model, records, bad, extra=None, queries=()):
    official_tokens = bench.decoding.max_new_tokens
    departures = [bench.decoding.ours] if bench.decoding.ours else []
    if a.max_new_tokens and a.max_new_tokens != official_tokens:
        departures.append(f"max_new_tokens {a.max_new_tokens} (official {official_tokens})")
    if a.n:
        departures.append(f"--n {a.n}: the first {a.n} queries of the subset only")
    if a.subset != "official":
        departures.append(f"--subset {a.subset}")
    return {
        "benchmark": bench.name,
        "model": model,
        "prompt": a.prompt,
        "official": prompt.official,
        "metric": bench.metric,
        "subset": a.subset,
        # None: no boxes, or the native prompt (boxes in the family's coordinate space)
        "rescale_boxes": _rescale(a, bench)
        if bench.rescale is not None and prompt.official
        else None,
        **(
            bench.summarize(records, queries, not a.n) if bench.corpus else bench.summarize(records)
        ),
        **_det_settings(a, bench),
        "bad_rows": len(bad),
        "bad_in_subset": sum("bad" in r for r in records),
        **(extra or {}),
        "departures": departures,
        "paper": {k: vars(v) for k, v in bench.numbers.items()},
        "paper_model": bench.paper_model,
    }


def _det_settings(a, bench):
    """What a detection summary says about how it was made: the box confidences and the map."""
    out = {"box_score": a.box_score} if "box_score" in bench.options else {}
    if "exist_map" in bench.options:
        out["exist_map"] = os.path.basename(a.exist_map or registry.EXIST_MAP)
    return out


def decode_model(a, plan, path, rank, world, device):
    """Decode every planned benchmark with one checkpoint; the queries split over the processes in
    whole batches, in order, and gathered. Returns [(summary, records)] (on every rank)."""
    model, family = vlm.load(path, device)
    model.eval()
    out = []
    for bench, prompt, queries, bad, _ in plan:
        d, extra = bench.decoding, {}
        if hasattr(family.image_processor, "merge_size"):  # the official pixel limits
            family.image_processor = type(family.image_processor).from_pretrained(
                path, min_pixels=d.min_pixels, max_pixels=d.max_pixels
            )
        else:  # Gemma 3 resizes every image to its own square
            extra["pixel_limits"] = "not applied: this family's processor has its own fixed size"
        good = [q for q in queries if not q.bad]
        size = a.batch_size or d.batch_size
        batches = [good[i : i + size] for i in range(0, len(good), size)]
        per = -(-len(batches) // world)
        mine, done, start = batches[rank * per : (rank + 1) * per], 0, time.time()
        texts = {}
        for k, batch in enumerate(mine, 1):
            rows = [
                {
                    "image_path": q.fields["image_path"],
                    "problem": "",
                    "_chat": registry.chat(bench, prompt, q),
                }
                for q in batch
            ]
            outs, sizes = greedy_texts(model, family, rows, a.max_new_tokens or d.max_new_tokens)
            texts.update({q.id: (t, s[:2]) for q, t, s in zip(batch, outs, sizes)})
            done += len(batch)
            if rank == 0 and (k % 5 == 0 or k == len(mine)):
                total, rate = sum(map(len, mine)), done / max(time.time() - start, 1e-9)
                print(
                    f"{bench.name} {path}: {done}/{total} rows"
                    + (f" (process 0 of {world})" if world > 1 else "")
                    + f", {rate:.2f} rows/s, {(total - done) / rate:.0f} s left",
                    flush=True,
                )
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, texts)
            texts = {k: v for part in parts for k, v in part.items()}
        rescale = _rescale(a, bench)
        records = [
            _record(
                bench,
                prompt,
                q,
                path,
                *texts.get(q.id, (None, None)),
                rescale,
                family.coord_space,
                _options(a, bench, "box_score"),
            )
            for q in queries
        ]
        out.append((_summary(a, bench, prompt, path, records, bad, extra, queries), records))
    return out


def read_predictions(path, plan):
    """{(benchmark, model): {id: (output, input_size or None)}} of a predictions JSONL; a line that
    is not an object with a string id and output, a benchmark not named, an unknown or duplicate
    id stops with one line "FILE:LINE: ..."."""
    ids = {bench.name: known for bench, known in plan}
    out = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise data.BadInput(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = json.loads(raw)
            except ValueError as e:
                raise data.BadInput(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(line, dict):
                raise data.BadInput(f"{where}: expected a JSON object")
            qid, output = line.get("id"), line.get("output")
            if not isinstance(qid, str):
                raise data.BadInput(f"{where}: 'id' must be a JSON string, got {qid!r}"[:200])
            if output is not None and not isinstance(output, str):
                raise data.BadInput(f"{where}: 'output' must be a string, got {output!r}"[:200])
            name = line.get("benchmark")
            if name is None and len(ids) == 1:
                name = next(iter(ids))
            if name not in ids:
                raise data.BadInput(
                    f"{where}: benchmark {name!r} is not one of --benchmark {' '.join(ids)}"
                    if name is not None
                    else f"{where}: no 'benchmark' field; it is needed with several benchmarks"
                )
            if qid not in ids[name]:
                raise data.BadInput(f"{where}: unknown id {qid!r}: {name} has no such row")
            size = line.get("input_size")
            if size is not None and not (
                isinstance(size, list)
                and len(size) == 2
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size
                )
            ):
                raise data.BadInput(f"{where}: 'input_size' must be [width, height], got {size!r}")
            model = str(line.get("model") or path)
            got = out.setdefault((name, model), {})
            if qid in got:
                raise data.BadInput(f"{where}: duplicate id {qid!r} of {name}, model {model}")
            got[qid] = (output, size)
    return out


def image_processor_only(path):
    """(coord_space, image processor) of a checkpoint, from its config and preprocessor_config.json
    alone (no weight, no tokenizer): what rescaling --predictions needs."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(vlm.lora_base(path))
        family = vlm.ADAPTERS.get(config.model_type)
        if family is None:
            sys.exit(f"error: {path}: model type {config.model_type!r} is not supported")
        return family.coord_space, vlm.image_processor(path, family).from_pretrained(path)
    except (OSError, ValueError) as e:  # no such folder or hub id, no preprocessor_config.json
        sys.exit(" ".join(f"error: --model {path}: cannot read its config ({e})".split())[:300])


def from_predictions(a, plan):
    """Score --predictions: one summary per benchmark and model; a query with no line counts wrong.
    Rescaling needs each line's input_size, or --model, whose image processor alone is loaded."""
    try:
        preds = read_predictions(a.predictions, [(p[0], p[4]) for p in plan])
    except data.BadInput as e:
        sys.exit(f"error: {e}")
    coord_space, processor = image_processor_only(a.model[0]) if a.model else (None, None)
    out = []
    for bench, prompt, queries, bad, _ in plan:
        rescale = _rescale(a, bench) if prompt.official else None
        if bench.task in ("rec", "det") and not prompt.official and coord_space is None:
            sys.exit(f"error: --prompt native on {bench.name} needs --model (its coordinates)")
        # the boxes need the resized input's size: rescaled official boxes, or native Qwen2.5-VL
        sized = bench.task in ("rec", "det") and (rescale or coord_space == "abs_resized")
        models = [m for (name, m) in preds if name == bench.name] or [a.predictions]
        for model in models:
            got, records = preds.get((bench.name, model), {}), []
            for q in queries:
                output, size = got.get(q.id, (None, None))
                if sized and not q.bad and output is not None:
                    if q.size is None:
                        sys.exit(
                            f"error: {q.where}: no width/height to rescale to; give --image-root"
                        )
                    if size is None and not hasattr(processor, "merge_size"):
                        sys.exit(
                            f"error: {a.predictions}: id {q.id} of {bench.name} has no "
                            "input_size; rescaling needs it on every line, or --model (a Qwen "
                            "checkpoint, whose image processor gives it)"
                        )
                    if size is None:
                        d = bench.decoding
                        size = registry.input_size(processor, *q.size, d.min_pixels, d.max_pixels)
                opts = _options(a, bench, "box_score")
                records.append(
                    _record(bench, prompt, q, model, output, size, rescale, coord_space, opts)
                )
            missing = sum(got.get(q.id, (None,))[0] is None for q in queries if not q.bad)
            extra = {"no_prediction": missing}
            summary = _summary(a, bench, prompt, model, records, bad, extra, queries)
            out.append((summary, records))
    return out


def _path(a, bench):
    return os.path.join(a.data, bench.file) if os.path.isdir(a.data) else a.data


def _cell(n):
    return "–" if n is None else str(n)


def benchmark_table(summaries):
    """Markdown: one row per benchmark and model, beside the paper's base / SFT / RL (table)."""
    lines = [
        "| benchmark | model | prompt | rows | metric | ours | paper base | paper SFT | paper RL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        bench = registry.BENCHMARKS[s["benchmark"]]
        ours = f"{100 * s[bench.headline]:.2f}"
        if "exact" in s:
            ours += f" (exact {100 * s['exact']:.2f})"
        if "f1_50" in s:
            ours += f" (F1@0.5 {100 * s['f1_50']:.2f}; scores {s['box_score']})"
        if "exist_map" in s:
            ours += f" ({s['exist_map']})"
        prompt = s["prompt"] + ("" if s["official"] else " (not official)")
        paper = [_cell(bench.numbers.get(k)) for k in ("base", "sft", "rl")]
        lines.append(
            f"| {s['benchmark']} | {s['model']} | {prompt} | {s['n']} | {s['metric']} | {ours} | "
            + " | ".join(paper)
            + " |"
        )
    for s in (s for s in summaries if "per_set" in s):  # ODinW's 13, OVDEval's sub-tasks
        sets = ", ".join(f"{k} {100 * v['map']:.2f}" for k, v in s["per_set"].items())
        lines.append(f"\n{s['benchmark']} ({s['model']}), AP per file: {sets}")
    models = sorted({registry.BENCHMARKS[s["benchmark"]].paper_model for s in summaries})
    lines.append(f"\nThe papers' numbers are for {', '.join(models)} (percent).")
    if any("2nd-hand" in line for line in lines):
        lines[-1] += " 2nd-hand: from a digest of the paper, not checked against its PDF."
    return "\n".join(lines)


def write_results(a, results):
    summaries = [s for s, _ in results]
    for s in summaries:
        print(json.dumps({k: v for k, v in s.items() if k != "paper"}), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summaries[0] if len(summaries) == 1 else summaries, f, indent=2)
    with open(os.path.splitext(a.json)[0] + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for _, records in results for r in records)
    print(benchmark_table(summaries))


if __name__ == "__main__":
    main()
