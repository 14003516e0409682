"""Issue 17: FSDP2 (--fsdp) on 2 gloo processes on the CPU: the same update as one process, a
rollout that gathers the weights once, checkpoints that save_pretrained and eval.py read and that
resume exactly, Ctrl-C under torchrun, torchao's 8-bit AdamW. This file is also the torchrun worker
of two of them (see the bottom)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import plan  # noqa: E402
import vlm  # noqa: E402

SMALL = [
    "--prompts-per-step",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "48",
    "--train-size",
    "16",
    "--sample-every",
    "0",
    "--lr",
    "1e-3",
    "--eval-every",
    "0",
]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same float rounding in every run


def run(launcher, *flags, env=ENV, script=os.path.join(ROOT, "grpo_vlm.py")):
    res = subprocess.run(
        launcher + [script, *flags], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def metrics(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows
    ]  # wall time is the only free field


def same_weights(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def complete_checkpoint(path):
    return all(
        os.path.exists(os.path.join(path, f))
        for f in ("model.safetensors", "trainer_state.pt", "optimizer/.metadata", "tokenizer.json")
    )


def test_fsdp_step_equals_one_process_and_its_checkpoints_load_and_resume(tmp_path):
    """Two steps of mu=2 passes (logp_old from the sharded policy) with the KL to a reference: one
    process, then --fsdp on two, bit for bit the same weights; then a resume of the --fsdp run from
    its step-1 checkpoint, with the reference sharded this time, equal to it. Token-mean aggregation
    and batch-std advantages make the update depend on the global normalisation. Bit-exact because
    the gradients are reduce-scattered in fp32 (2 g / 2 is exact) and nothing is clipped: FSDP2's
    gradient norm adds up the shards' squares, so it differs from one process's in the last bit
    (1e-6 below), and a clipped step moves the weights apart by about 6e-6 (measured with
    --max-grad-norm 1, where this run's norm reaches 17)."""
    flags = SMALL + [
        "--steps",
        "2",
        "--micro-batch-size",
        "4",
        "--loss-agg",
        "token",
        "--scale-rewards",
        "batch",
        "--mu",
        "2",
        "--max-grad-norm",
        "1e9",
    ]
    run([sys.executable], *flags, "--save-every", "0", "--output-dir", str(tmp_path / "one"))
    out = run(TWO, *flags, "--fsdp", "--save-every", "1", "--output-dir", str(tmp_path / "two"))
    assert "processes=2" in out
    one, two = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    base = weights(g.TINY_MODEL)
    assert max((one[k] - base[k]).abs().max() for k in one) > 1e-4  # the steps did move the weights
    assert same_weights(one, two)
    assert sorted(two) == sorted(base)  # the tied lm_head is not written a second time
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("reward", "loss", "kl", "grad_norm"):
        assert [r[key] for r in m1] == pytest.approx([r[key] for r in m2], rel=1e-6, abs=1e-7), key
    assert m1[1]["kl"] > 0.01  # the reference did count

    # a resume from the step-1 checkpoint (weights from save_pretrained, optimizer shards), the
    # reference sharded
    assert complete_checkpoint(tmp_path / "two" / "checkpoint-000001")
    out = run(
        TWO,
        "sharded-reference",
        *flags,
        "--fsdp",
        "--save-every",
        "0",
        "--output-dir",
        str(tmp_path / "resumed"),
        "--resume",
        str(tmp_path / "two" / "checkpoint-000001"),
        script=os.path.abspath(__file__),
    )
    assert "the reference is sharded" in out
    assert same_weights(two, weights(tmp_path / "resumed" / "final"))
    assert metrics(tmp_path / "resumed")[-1] == m2[-1]

    # the saved folder loads as a plain HF model, and eval.py reads it
    loaded, reference = (
        vlm.load(str(tmp_path / run_dir / "final"))[0].state_dict() for run_dir in ("two", "one")
    )
    assert sorted(loaded) == sorted(reference) and all(
        torch.equal(loaded[k], reference[k]) for k in loaded
    )
    out = run(
        [sys.executable],
        "--model",
        str(tmp_path / "two" / "final"),
        "--n",
        "4",
        "--json",
        str(tmp_path / "eval.json"),
        script=os.path.join(ROOT, "eval.py"),
    )
    assert json.load(open(tmp_path / "eval.json"))["n"] == 4 and "| Acc@0.5 |" in out


def test_rollout_gathers_the_weights_once_and_samples_the_same_tokens(tmp_path):
    """Each process samples its prompts from the sharded policy inside infra.gathered: the tokens
    equal the unsharded model's, and the all-gathers are one per FSDP unit (3 decoder layers, 2
    vision blocks, the root) for 8 or for 32 decoded tokens alike. Left to FSDP2 (the rollout as a
    registered forward method, each layer freed after it runs) the same tokens cost every decoder
    layer's gather at every token."""
    run(TWO, "rollout", str(tmp_path), script=os.path.abspath(__file__))
    for rank in (0, 1):
        r = json.load(open(tmp_path / f"rollout-{rank}.json"))
        assert r["units"] == 6
        for n in ("8", "32"):
            assert r[n]["equal"] and r[n]["tokens"] == int(n), r
            assert r[n]["all_gathers"] == r["units"], r  # once per rollout, not once per token
            assert r[n]["equal_left_to_fsdp"] and r[n]["all_gathers_left_to_fsdp"] >= 3 * int(n), r
        assert r["sharded_after"]  # the gathered weights are freed after the rollout


def test_ctrl_c_under_torchrun_saves_a_checkpoint_and_adamw8bit_resumes_exactly(tmp_path):
    """SIGINT to torchrun's process group (a terminal's Ctrl-C; torchrun passes it on to its
    workers): both processes finish the step and write one complete checkpoint; resumed, torchao's
    8-bit AdamW (set up with its lr in place) continues exactly as an uninterrupted run.
    torch.compile is off: torchao compiles its step for every weight shape, 2 minutes on 2 CPU
    cores; eager runs the same arithmetic in every run compared here. torchao is optional (not in
    requirements.txt; .ci/run installs it): without it, plain AdamW."""
    optim = "adamw8bit" if importlib.util.find_spec("torchao") else "adamw"
    flags = SMALL + [
        "--save-every",
        "0",
        "--fsdp",
        "--optim",
        optim,
        "--micro-batch-size",
        "2",
    ]  # accumulating
    env = dict(ENV, TORCHDYNAMO_DISABLE="1")
    cmd = TWO + [os.path.join(ROOT, "grpo_vlm.py"), *flags, "--output-dir", str(tmp_path / "b")]
    proc = subprocess.Popen(
        cmd + ["--steps", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:  # wait until training runs, then interrupt it
        lines.append(line)
        if line.startswith("step 1/"):
            os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    out = "".join(lines)
    assert "interrupted at step" in out, out[-3000:]
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert complete_checkpoint(tmp_path / "b" / f"checkpoint-{step:06d}")
    assert not [f for f in os.listdir(tmp_path / "b") if f.startswith(".tmp")]
    run(
        TWO,
        *flags,
        "--steps",
        str(step + 1),
        "--resume",
        str(tmp_path / "b"),
        "--output-dir",
        str(tmp_path / "b"),
        env=env,
    )
    run(TWO, *flags, "--steps", str(step + 1), "--output-dir", str(tmp_path / "a"), env=env)
    assert same_weights(weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize(
    "flags,env,says",
    [
        (["--fsdp"], {}, "launch with torchrun"),
        (["--fsdp", "--lora-r", "8"], {"WORLD_SIZE": "2"}, "--lora-r"),
    ],
)
def test_fsdp_is_refused_without_torchrun_or_with_lora(flags, env, says):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo_vlm.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **env),
    )
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and err.startswith("error: --fsdp") and says in err, res.stderr[
        -2000:
    ]


# ---------------------------------------------------------------------------------------------
# torchrun workers: python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp.py MODE ...
def rollout_worker(out_dir, G=4):
    """The rollout of test_rollout_gathers_the_weights_once_and_samples_the_same_tokens: each
    process's two prompts, first from the whole model, then from the sharded one inside
    infra.gathered, counting FSDP2's all-gathers."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor

    rank, world, device = infra.setup_distributed()
    model, family = vlm.load(g.TINY_MODEL, device)
    rows = data.load_rows(g.Args(train_size=8))[0][2 * rank : 2 * rank + 2]
    prompt = family.encode(rows, device)[0]
    keys = infra.sample_keys(0, 1, range(2 * rank * G, 2 * (rank + 1) * G))
    lengths = (8, 32)  # every completion decodes exactly n tokens (no EOS before n)
    whole = {
        n: g.sample_group(model, family, prompt, G, g.Decoding(n, 1.0, min_new_tokens=n), keys)[0]
        for n in lengths
    }
    policy = infra.fsdp(infra.Policy(model, family, 1.0, 1024), world, device)
    calls, real = [0], torch.distributed.all_gather_single

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    torch.distributed.all_gather_single = counted
    result = {"units": sum(isinstance(m, FSDPModule) for m in policy.modules())}
    for n in lengths:
        calls[0] = 0
        with infra.gathered(policy):
            o = g.sample_group(
                model, family, prompt, G, g.Decoding(n, 1.0, min_new_tokens=n), keys
            )[0]
        result[str(n)] = {
            "equal": torch.equal(o, whole[n]),
            "tokens": o.shape[1],
            "all_gathers": calls[0],
        }
    result["sharded_after"] = all(isinstance(p, DTensor) for p in model.parameters())

    def left_to_fsdp(
        self, n
    ):  # the same rollout as a registered forward method, without infra.gathered
        return g.sample_group(
            self.model, family, prompt, G, g.Decoding(n, 1.0, min_new_tokens=n), keys
        )[0]

    policy.left_to_fsdp = types.MethodType(left_to_fsdp, policy)
    register_fsdp_forward_method(policy, "left_to_fsdp")
    for n in lengths:
        calls[0] = 0
        with torch.no_grad():
            result[str(n)]["equal_left_to_fsdp"] = torch.equal(policy.left_to_fsdp(n), whole[n])
        result[str(n)]["all_gathers_left_to_fsdp"] = calls[0]
    with open(os.path.join(out_dir, f"rollout-{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def sharded_reference_worker(argv):
    """grpo_vlm.py's training with the memory plan saying that a whole reference does not fit."""
    from torch.distributed.fsdp import FSDPModule

    plan.reference_whole = lambda args, path, world: False
    make = g.reference_model

    def reference_model(*a, **k):
        ref = make(*a, **k)
        if isinstance(ref, FSDPModule) and torch.distributed.get_rank() == 0:
            print("the reference is sharded", flush=True)
        return ref

    g.reference_model = reference_model
    g.train(g.parse_args(argv))


if __name__ == "__main__":
    infra.catch_signals()
    if sys.argv[1] == "rollout":
        rollout_worker(sys.argv[2])
    elif sys.argv[1] == "sharded-reference":
        sharded_reference_worker(sys.argv[2:])
