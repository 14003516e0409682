"""The step cost of multi-turn rollouts with the zoom tool against single-turn ones (README:
"Thinking with images"): process CPU time of each step's rollout and update, one thread, the zoom
task's defaults from its tiny base, the two interleaved over rounds in one process; the median
over steps 2.. of each run. Both start from the same base, which calls the tool: single-turn, a
call simply ends the completion.

    OMP_NUM_THREADS=1 python benchmarks/tool_cost.py [--rounds 3] [--steps 6]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from objectives_cost import measure, table  # noqa: E402

CONDITIONS = {
    "single-turn (--max-tool-calls 0)": ["--max-tool-calls", "0"],
    "with the tool (--max-tool-calls 1)": ["--max-tool-calls", "1"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    base = ["--task", "zoom", "--steps", str(a.steps), "--eval-every", "0"]
    base += ["--save-every", "0", "--sample-every", "0"]
    print(table(measure(base, CONDITIONS, a.rounds), "rollout"))


if __name__ == "__main__":
    main()
