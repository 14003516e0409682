"""The objectives in miniature (issue 30): the REC default at --mu 2 with plain GRPO and each
vision-specific objective over seeds, each other option over one seed; the final model evaluated
on 512 held-out images per split (test, ood). Prints the README's table.

    python benchmarks/objectives_study.py --steps 1000 --seeds 0 1 2            # run, then table
    python benchmarks/objectives_study.py --steps 1000 --seeds 0 1 2 --table    # table only

Each run is `OMP_NUM_THREADS=1 python grpo_vlm.py --task rec --mu 2 --seed S --steps N
--eval-every N --eval-n 512 FLAGS --output-dir runs/study/NAME-sS` (an existing finished run is
kept). The spread is the seeds' min..max; a difference exceeds the noise here when the two ranges
do not overlap.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDED = {  # over every seed
    "grpo": [],
    "noisyrollout": ["--noisy-rollout-share", "0.5"],
    "papo": ["--papo-gamma", "0.01"],
    "vppo": ["--vppo-share", "0.4"],
}
ONCE = {  # over the first seed
    "gspo": ["--policy-loss", "gspo"],
    "cispo": ["--policy-loss", "cispo"],
    "sapo": ["--policy-loss", "sapo"],
    "gmpo": ["--policy-loss", "gmpo"],
    "entropy-top-0.2": ["--entropy-top-share", "0.2"],
    "gdpo": ["--reward-norm", "gdpo"],
    "tis-2": ["--tis-cap", "2"],
}


def command(name, flags, seed, steps, out):
    return [
        sys.executable,
        os.path.join(ROOT, "grpo_vlm.py"),
        *("--task rec --mu 2 --save-every 0 --sample-every 0 --eval-n 512".split()),
        *("--seed", str(seed), "--steps", str(steps), "--eval-every", str(steps)),
        *flags,
        "--output-dir",
        os.path.join(out, f"{name}-s{seed}"),
    ]


def summary(run_dir, steps):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in rows if "loss" in r]
    final = [r for r in rows if r.get("step") == steps and "test_acc50" in r]
    if len(train) < steps or not final:
        return None
    mean = lambda k: statistics.fmean(r[k] for r in train)  # noqa: E731
    return dict(
        test=final[-1]["test_acc50"],
        ood=final[-1]["ood_acc50"],
        kl=mean("kl"),
        entropy=mean("entropy"),
        length=mean("completion_len"),
        seconds=mean("seconds"),
    )


def table(results):
    """Markdown: per objective, each metric's seed mean and [min, max]."""
    lines = [
        "| objective | seeds | test Acc@0.5 | ood Acc@0.5 | KL | entropy | length | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if not runs:
            continue
        cell = []
        for k in ("test", "ood", "kl", "entropy", "length", "seconds"):
            v = [r[k] for r in runs]
            m = statistics.fmean(v)
            cell.append(f"{m:.3f} [{min(v):.3f}, {max(v):.3f}]" if len(v) > 1 else f"{m:.3f}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "study"))
    p.add_argument("--only", nargs="*", default=None, help="names to run (default: all)")
    p.add_argument("--table", action="store_true", help="only print the table of finished runs")
    a = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plan = [(n, f, s) for s in a.seeds for n, f in SEEDED.items()]
    plan += [(n, f, a.seeds[0]) for n, f in ONCE.items()]
    results = {n: [] for n in (*SEEDED, *ONCE)}
    for name, flags, seed in plan:
        if a.only is not None and name not in a.only:
            continue
        run_dir = os.path.join(a.out, f"{name}-s{seed}")
        done = os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and summary(run_dir, a.steps)
        if not done and not a.table:
            cmd = command(name, flags, seed, a.steps, a.out)
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
            done = summary(run_dir, a.steps)
        if done:
            results[name].append(done)
    print(table(results))


if __name__ == "__main__":
    main()
