"""Thinking with images in miniature (issue 32): GRPO on the zoom task (--task zoom: a small
patterned square in a large image, its pattern unreadable at the model's input resolution) with
the zoom tool (--max-tool-calls 1) and without it (--max-tool-calls 0), from the same cold-started
tiny base, over seeds. Each run evaluates greedily on 512 held-out images at its start and every
--eval-every steps, the tool runs with the tool allowed, the others without. Prints the README's
tables: accuracy at the start and the end, and the rate of useful calls (a crop that holds the
whole square) over training.

    python benchmarks/zoom_study.py --steps 200 --seeds 0 1 2            # run, then the tables
    python benchmarks/zoom_study.py --steps 200 --seeds 0 1 2 --table    # the tables only

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
    """A finished run's numbers: held-out accuracy at step 0 and at the end, and the training
    rollouts' useful-call and call rates in the first and last `window` steps."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(x) for x in open(path)]
    train = [r for r in rows if "loss" in r]
    evals = {r["step"]: r for r in rows if "test_accuracy" in r}
    if len(train) < steps or steps not in evals:
        return None
    mean = lambda rs, k: statistics.fmean(r.get(k, 0.0) for r in rs)  # noqa: E731
    first, last = train[:window], train[-window:]
    return dict(
        start=evals[0]["test_accuracy"],
        end=evals[steps]["test_accuracy"],
        calls_end=evals[steps].get("test_tool_rate", 0.0),
        useful_end=evals[steps].get("test_useful_rate", 0.0),
        useful_first=mean(first, "tool_useful_rate"),
        useful_last=mean(last, "tool_useful_rate"),
        calls_first=mean(first, "tool_call_rate"),
        calls_last=mean(last, "tool_call_rate"),
        seconds=mean(train, "seconds"),
        curve={s: e["test_accuracy"] for s, e in sorted(evals.items())},
        useful_curve={s: e.get("test_useful_rate", 0.0) for s, e in sorted(evals.items())},
    )


def cell(values):
    m = statistics.fmean(values)
    return f"{m:.3f} [{min(values):.3f}, {max(values):.3f}]" if len(values) > 1 else f"{m:.3f}"


def tables(results, window):
    """Markdown: per condition, each number's seed mean and [min, max]; then the curves."""
    keys = ("start", "end", "calls_end", "useful_end", "calls_first", "calls_last")
    keys += ("useful_first", "useful_last", "seconds")
    head = (
        "| condition | seeds | test accuracy, step 0 | test accuracy, end | held-out call rate, "
        f"end | held-out useful-call rate, end | rollout call rate, first {window} steps | "
        f"last {window} | rollout useful-call rate, first {window} | last {window} | s/step |"
    )
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for name, runs in results.items():
        if runs:
            cells = " | ".join(cell([r[k] for r in runs]) for k in keys)
            lines.append(f"| {name} | {len(runs)} | {cells} |")
    lines += ["", "| condition | metric | " + " | ".join(f"step {s}" for s in curve_steps(results))]
    lines.append("|---|---|" + "---|" * len(curve_steps(results)))
    for name, runs in results.items():
        for metric in ("curve", "useful_curve"):
            if runs:
                steps = curve_steps(results)
                vals = [cell([r[metric][s] for r in runs]) for s in steps]
                label = "test accuracy" if metric == "curve" else "useful-call rate"
                lines.append(f"| {name} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def curve_steps(results):
    runs = [r for rs in results.values() for r in rs]
    return sorted(set.intersection(*(set(r["curve"]) for r in runs))) if runs else []


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    p.add_argument("--window", type=int, default=25, help="steps averaged at the start and end")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "zoom-study"))
    p.add_argument("--table", action="store_true", help="only print the tables of finished runs")
    a = p.parse_args()
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
