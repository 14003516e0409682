"""The memory plan (plan.py, --plan) against measured memory, part by part, and the error of each.

    python benchmarks/memory_plan.py [--json benchmarks/results/memory_plan_cpu.json]

Two models (the shipped tiny Qwen2.5-VL, and Qwen2.5-VL-3B's architecture scaled down by 8 as in
grpo_step_vs_trl.py), two shapes each. Each shape runs in a fresh process: load, the reference, then
two GRPO steps (rollout, then policy_update) through grpo_vlm's own functions, EOS blocked so every
completion has its full length.

On the CPU, memory is resident memory (RSS) above the RSS after imports. A part resident for the run
(weights, reference, AdamW moments) is the RSS it adds; a phase (the rollout, the training step of
step 2) is the peak RSS during it (VmHWM, reset through /proc/self/clear_refs) above the RSS before
it. glibc is told to give every block over 64 KiB back at once (MALLOC_MMAP_THRESHOLD_), so a freed
buffer is not counted again. The plan is computed for the CPU (fp32 throughout: the reference and
the KV cache too) with the prompt length the run really had. On a GPU (--device cuda) memory is
torch.cuda.memory_allocated and max_memory_allocated instead, and the plan is the GPU's.
"""

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MiB = 2**20
SHAPES = {  # name: (model, image size, B, G, L, micro-batch, rollout batch)
    "tiny-a": ("tiny", 128, 4, 8, 48, 16, 0),
    "tiny-b": ("tiny", 256, 8, 8, 96, 32, 32),
    "3b/8-a": ("3b/8", 448, 2, 8, 32, 16, 0),
    "3b/8-b": ("3b/8", 448, 4, 8, 64, 8, 16),
    # on a GPU (gpu_check.sh): the full 3B architecture, a small step and one GPU's share of
    # --preset vlm-r1 on two
    "3b-a": ("3b", 448, 4, 8, 128, 8, 0),
    "3b-b": ("3b", 448, 8, 8, 256, 8, 32),
}
CPU_SHAPES = "tiny-a,tiny-b,3b/8-a,3b/8-b"
PHASES = ("rollout", "training")


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS


def model_path(name):
    import grpo_vlm as g

    if name == "tiny":
        return g.TINY_MODEL
    scale = 8 if name == "3b/8" else 1
    out = os.path.join(
        tempfile.gettempdir(), f"qwen2.5-vl-3b-random-{scale}"
    )  # as grpo_step_vs_trl.py builds it
    if not os.path.exists(os.path.join(out, "config.json")):
        from grpo_step_vs_trl import build_3b

        build_3b(out, scale=scale)
    return out


def run_args(shape, device):
    import grpo_vlm as g

    model, size, B, G, L, mb, R = SHAPES[shape]
    return g.Args(
        model=model_path(model),
        prompts_per_step=B,
        num_generations=G,
        max_completion_length=L,
        min_completion_length=L,
        micro_batch_size=mb,
        rollout_batch_size=R,
        beta=0.04,
        lr=1e-5,
        eval_every=0,
        save_every=0,
        sample_every=0,
        image_size=f"{size}x{size}",
        max_prompt_length=0,
        output_dir=tempfile.mkdtemp(),
    )


def measure(shape, device):
    """{part or phase: bytes measured} and the prompt's text tokens, in this (fresh) process."""
    import torch
    from grpo_step_vs_trl import prompts

    import grpo_vlm as g
    import infra
    import vlm

    args = run_args(shape, device)
    rows = prompts(args.prompts_per_step, SHAPES[shape][1])
    gpu = device == "cuda"
    now = (lambda: torch.cuda.memory_allocated()) if gpu else rss
    top = (lambda: torch.cuda.max_memory_allocated()) if gpu else hwm
    reset = torch.cuda.reset_peak_memory_stats if gpu else reset_hwm
    vlm.load(
        args.model, device
    )  # the imports a first load makes (the model's code, tokenizers) count as imports
    gc.collect()
    m, base = {}, now()
    model, family = vlm.load(args.model, device)
    m["fp32 weights"] = now() - base
    before = now()
    ref = g.reference_model(args, model, family, None, args.model, device)
    m["reference (bf16)" if gpu else "reference (fp32)"] = now() - before
    vlm.enable_checkpointing(model)
    model.train()
    procs = infra.Processes(0, 1, device)
    policy, opt = infra.engine(args, model, family, None, procs)
    run = g.Run(model, family, policy, ref, opt, procs, g.reward_weights(args), family.coord_space)
    rng, stage = random.Random(0), g.Stage(args.max_completion_length, {"iou_threshold": 0.0})
    for step in (1, 2):
        reset()
        before = now()
        batch = g.rollout(run, rows, rng, step, stage, args)
        rollout = (top() - before, before - base)
        A = g.group_advantages(batch.r.to(device), args.num_generations)
        tw = g.token_weights(batch.mask, args.loss_agg)
        reset()
        before = now()
        g.policy_update(run, batch, A, tw, args)
        training = (top() - before, before - base)
        if step == 1:
            m["AdamW moments (fp32)"] = (
                now() - before
            )  # created by the first optimizer step; the gradients freed
    m["rollout transient"], m["rollout total"] = rollout[0], sum(rollout)
    m["training transient"], m["training total"] = training[0], sum(training)
    text = batch.prompt["input_ids"].shape[1] - int(batch.prompt["image_grid_thw"][0].prod()) // 4
    return {"measured": m, "text_tokens": text, "completion_len": float(batch.mask.sum(1).mean())}


def planned(shape, device, text_tokens):
    """The same parts as measure() reports, from plan.parts for this run."""
    import plan

    args = run_args(shape, device)
    p = plan.parts(args, args.model, 1, device, text_tokens=text_tokens)
    resident = ("fp32 weights", "reference (bf16)", "reference (fp32)", "AdamW moments (fp32)")
    out = {k: v for k, v in p["rollout"].items() if k in resident}
    for ph in PHASES:
        out[f"{ph} transient"] = sum(v for k, v in p[ph].items() if k not in resident)
        out[f"{ph} total"] = sum(p[ph].values())
    return out, p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=CPU_SHAPES, help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--verbose", action="store_true", help="also print the plan's parts")
    ap.add_argument("--child", default="")
    ap.add_argument(
        "--reuse", default="", help="the measurements of an earlier --json (only the plan is new)"
    )
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(measure(a.child, a.device)))
        return
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(a.threads))
    reuse = json.load(open(a.reuse)) if a.reuse else {}
    for shape in a.shapes.split(","):
        if shape in reuse:  # only the plan is computed again
            res = types.SimpleNamespace(
                returncode=0, stdout="RESULT " + json.dumps(reuse[shape]), stderr=""
            )
        else:
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    shape,
                    "--device",
                    a.device,
                    "--threads",
                    str(a.threads),
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"error: shape {shape} failed:\n{res.stderr[-3000:]}")
        got = json.loads(line[0][7:])
        plan_parts, p = planned(shape, a.device, got["text_tokens"])
        results[shape] = {
            "measured": got["measured"],
            "planned": plan_parts,
            "plan": p,
            "text_tokens": got["text_tokens"],
            "completion_len": got["completion_len"],
        }
        model, size, B, G, L, mb, R = SHAPES[shape]
        print(
            f"\n{shape}: {model}, {size}x{size} images, B={B} G={G} L={L} (mean completion "
            f"{got['completion_len']:.0f}), micro-batch {mb}, rollout batch {R or B * G}, prompt "
            f"{p['shape']['P']} tokens ({a.device})"
        )
        print("| part | planned (MiB) | measured (MiB) | error (MiB) | error |")
        print("|---|---|---|---|---|")
        for k, want in plan_parts.items():
            meas = got["measured"][k]
            err = want - meas
            rel = f"{100 * err / meas:+.0f}%" if meas > 0 else "-"
            print(f"| {k} | {want / MiB:.1f} | {meas / MiB:.1f} | {err / MiB:+.1f} | {rel} |")
        if a.verbose:
            for ph in PHASES:
                print(f"  plan, {ph}: " + ", ".join(f"{k} {v / MiB:.1f}" for k, v in p[ph].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
