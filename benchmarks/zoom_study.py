"""Thinking with images in miniature (issue 32): GRPO on the zoom task (--task zoom: a small
patterned square in a large image, its pattern unreadable at the model's input resolution) with
the zoom tool (--max-tool-calls 1) and without it (--max-tool-calls 0), from the same cold-started
tiny base, over seeds. Each run evaluates greedily on 512 held-out images at its start and every
--eval-every steps, the tool runs with the tool allowed, the others without. Prints the README's
tables: held-out accuracy over training, and the rollouts' rates of calls and of useful calls (a
crop that holds the whole square) over training.

    python benchmarks/zoom_study.py --steps 300 --seeds 0 1 2            # run, then the tables
    python benchmarks/zoom_study.py --steps 300 --seeds 0 1 2 --table    # the tables only
    python benchmarks/zoom_study.py --breakdown runs/zoom-eval/tool.jsonl  # where crops fell

Each run is `OMP_NUM_THREADS=1 python grpo_vlm.py --task zoom --seed S --steps N --eval-every E
--eval-n 512 --max-tool-calls C --output-dir runs/zoom-study/NAME-sS`, --jobs of them at once (an
existing finished run is kept). The spread is the seeds' min..max.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = {"tool": ["--max-tool-calls", "1"], "no-tool": ["--max-tool-calls", "0"]}


def command(name, seed, a):
    return [
        sys.executable,
        os.path.join(ROOT, "grpo_vlm.py"),
        *("--task zoom --save-every 0 --sample-every 0 --eval-n 512".split()),
        *("--seed", str(seed), "--steps", str(a.steps), "--eval-every", str(a.eval_every)),
        *CONDITIONS[name],
        "--output-dir",
        os.path.join(a.out, f"{name}-s{seed}"),
    ]


def summary(run_dir, steps, window):
    """A finished run's numbers: held-out accuracy at each eval, and the training rollouts' call
    and useful-call rates (a crop that holds the whole square) averaged over each `window` steps."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(x) for x in open(path)]
    train = [r for r in rows if "loss" in r]
    evals = {r["step"]: r["test_accuracy"] for r in rows if "test_accuracy" in r}
    if len(train) < steps or steps not in evals:
        return None
    windows = [train[i : i + window] for i in range(0, steps, window)]
    rate = lambda k: [statistics.fmean(r.get(k, 0.0) for r in w) for w in windows]  # noqa: E731
    return dict(
        accuracy=evals,
        calls=rate("tool_call_rate"),
        useful=rate("tool_useful_rate"),
        reward_with=statistics.fmean(r.get("reward_with_call", 0.0) for r in train[-window:]),
        seconds=statistics.fmean(r["seconds"] for r in train),
    )


def cell(values):
    m = statistics.fmean(values)
    return f"{m:.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{m:.3f}"


def tables(results, window):
    """Markdown: held-out accuracy at each eval step, then the rollouts' call and useful-call rates
    per window of steps; each cell the seeds' mean [min, max]."""
    runs = [r for rs in results.values() for r in rs]
    if not runs:
        return "no finished runs"
    steps = sorted(set.intersection(*(set(r["accuracy"]) for r in runs)))
    lines = ["| condition | seeds | " + " | ".join(f"step {s}" for s in steps) + " |"]
    lines.append("|---|---|" + "---|" * len(steps))
    for name, rs in results.items():
        if rs:
            cells = " | ".join(cell([r["accuracy"][s] for r in rs]) for s in steps)
            lines.append(f"| {name} | {len(rs)} | {cells} |")
    n = len(runs[0]["calls"])
    spans = [f"steps {i * window + 1}-{(i + 1) * window}" for i in range(n)]
    lines += ["", "| condition | rollouts | " + " | ".join(spans) + " |"]
    lines.append("|---|---|" + "---|" * n)
    for name, rs in results.items():
        for key, label in (("calls", "call rate"), ("useful", "useful-call rate")):
            if rs and any(any(r[key]) for r in rs):
                cells = " | ".join(cell([r[key][i] for r in rs]) for i in range(n))
                lines.append(f"| {name} | {label} | {cells} |")
    return "\n".join(lines)


def breakdown(path):
    """Markdown: from eval.py's per-query JSONL (--task zoom --max-tool-calls 1 on the test split),
    each model's accuracy by where its crop fell: holding the whole square, overlapping it, missing
    it."""
    preds = [json.loads(x) for x in open(path)]
    models = list(dict.fromkeys(q["model"] for q in preds))
    rows = data.synthetic_split("test", len(preds) // len(models), "zoom")
    lines = ["| model | crop holds the square | overlaps it | misses it | no crop |"]
    lines.append("|---|---|---|---|---|")
    for m in models:
        kinds = {"holds": [], "overlaps": [], "misses": [], "none": []}
        for q, row in zip([q for q in preds if q["model"] == m], rows):
            kinds[where(q, row["objects"][0]["box"])].append(q["correct"])
        cells = [f"{statistics.fmean(v):.3f} (n={len(v)})" if v else "-" for v in kinds.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def where(q, target):
    """Where the first crop of a prediction fell against the target box."""
    if not q["crops"]:
        return "none"
    if q["useful"]:
        return "holds"
    b = q["crops"][0]
    overlap = min(b[2], target[2]) > max(b[0], target[0]) and min(b[3], target[3]) > max(
        b[1], target[1]
    )
    return "overlaps" if overlap else "misses"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    p.add_argument("--window", type=int, default=50, help="steps per averaged window")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "zoom-study"))
    p.add_argument("--table", action="store_true", help="only print the tables of finished runs")
    p.add_argument("--breakdown", default="", help="eval.py's JSONL: accuracy by where crops fell")
    a = p.parse_args()
    if a.breakdown:
        return print(breakdown(a.breakdown))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plan = [(n, s) for s in a.seeds for n in CONDITIONS]
    todo = [(n, s) for n, s in plan if not summary(f"{a.out}/{n}-s{s}", a.steps, a.window)]
    running = []
    while todo and not a.table or running:
        while todo and len(running) < a.jobs and not a.table:
            name, seed = todo.pop(0)
            cmd = command(name, seed, a)
            print(" ".join(cmd[1:]), flush=True)
            running.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL))
        running[0].wait()
        if running.pop(0).returncode:
            sys.exit("error: a run failed (rerun it alone to see why)")
    results = {n: [] for n in CONDITIONS}
    for name, seed in plan:
        done = summary(f"{a.out}/{name}-s{seed}", a.steps, a.window)
        if done:
            results[name].append(done)
    print(tables(results, a.window))


if __name__ == "__main__":
    main()
