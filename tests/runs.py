"""Shared by the tests: run grpo_vlm.py on one process and two with the same flags, and build a
family's tiny test checkpoint."""

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


def tiny_checkpoint(arch, out):
    """Write the tiny random test checkpoint of family `arch` to `out` (make_tiny_model.py): the REC
    tokenizer on a Qwen2-VL model, each other family's own (build_family). Returns out."""
    import make_tiny_model as mtm

    if arch == "qwen2_vl":
        tok = mtm.build_tokenizer()
        mtm.save(mtm.build_model(tok, "qwen2_vl"), tok, mtm.build_image_processor(), out)
    else:
        mtm.build_family(arch, out)
    return out
