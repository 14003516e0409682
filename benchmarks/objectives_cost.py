"""The step cost of the vision-specific objectives against plain GRPO (README: "Objectives"):
process CPU time of each step's rollout and update, one thread, default REC at --mu 2, the four
objectives interleaved over rounds in one process; the median over steps 2.. of each run.

    OMP_NUM_THREADS=1 python benchmarks/objectives_cost.py [--rounds 3] [--steps 5]

CPU time, not wall-clock seconds: on a shared machine the wall clock measures the neighbours.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_vlm as g  # noqa: E402

OBJECTIVES = {
    "GRPO": [],
    "PAPO --papo-gamma 0.01": ["--papo-gamma", "0.01"],
    "VPPO --vppo-share 0.4": ["--vppo-share", "0.4"],
    "NoisyRollout --noisy-rollout-share 0.5": ["--noisy-rollout-share", "0.5"],
}


def measure(base, conditions, rounds):
    """{name: [CPU seconds of each step's rollout + update]} of `base` + each condition's flags,
    the conditions interleaved over `rounds` runs (the first step of each run left out: warm-up)."""
    rollout, update, clock = g.rollout, g.policy_update, {}

    def timed_rollout(*args):
        t = time.process_time()
        batch = rollout(*args)
        clock["rollout"] = time.process_time() - t
        return batch

    def timed_update(*args):
        t = time.process_time()
        stats = update(*args)
        clock["steps"].append(clock["rollout"] + time.process_time() - t)
        return stats

    g.rollout, g.policy_update = timed_rollout, timed_update
    seconds = {k: [] for k in conditions}
    try:
        with tempfile.TemporaryDirectory() as out:
            for r in range(rounds):
                for name, flags in conditions.items():
                    clock["steps"] = []
                    run_dir = os.path.join(out, f"{len(seconds[name])}-{r}")
                    g.train(g.parse_args(base + flags + ["--output-dir", run_dir]))
                    seconds[name] += clock["steps"][1:]
    finally:
        g.rollout, g.policy_update = rollout, update
    return seconds


def table(seconds, what="objective"):
    """Markdown: the median CPU seconds per step of each condition, and its ratio to the first."""
    first = statistics.median(next(iter(seconds.values())))
    lines = [f"| {what} | CPU s per step | vs {next(iter(seconds))} |", "|---|---|---|"]
    for name, v in seconds.items():
        m = statistics.median(v)
        lines.append(f"| {name} | {m:.3f} | {m / first:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    base = ["--task", "rec", "--mu", "2", "--steps", str(a.steps), "--eval-every", "0"]
    base += ["--save-every", "0", "--sample-every", "0"]
    print(table(measure(base, OBJECTIVES, a.rounds)))


if __name__ == "__main__":
    main()
