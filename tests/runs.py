"""Shared by the tests that compare one process with two: run grpo_vlm.py both ways on the same
flags."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def one_and_two(flags, out_dir):
    """Run `grpo_vlm.py FLAGS` on 2 gloo processes (out_dir/two) and on 1 (out_dir/one), one thread
    each so that both round alike; returns the stdout of each, after checking both succeeded."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for launcher, name in ((TWO, "two"), ([sys.executable], "one")):
        res = subprocess.run(
            launcher
            + [
                os.path.join(ROOT, "grpo_vlm.py"),
                *flags,
                "--output-dir",
                str(os.path.join(out_dir, name)),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        outs[name] = res.stdout
    return outs
