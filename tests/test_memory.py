"""Issue 15: the memory fixes (autocast's cast cache, the bf16 KV cache, DDP's bucket views, a
bounded rollout) and the memory plan (--plan)."""

import contextlib
import io
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import plan  # noqa: E402
import vlm  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(ROOT), "shared", "configs")
QWEN_3B, QWEN_7B = os.path.join(CONFIGS, "qwen2.5-vl-3b"), os.path.join(CONFIGS, "qwen2.5-vl-7b")
needs_configs = pytest.mark.skipif(
    not os.path.isdir(QWEN_3B), reason="../shared/configs is not beside the repo"
)


def run_plan(*flags):
    """The lines `python grpo_vlm.py --plan FLAGS` prints (in this process: the architectures are
    cached)."""
    out = io.StringIO()
    args = g.parse_args(["--plan", *flags])
    with contextlib.redirect_stdout(out):
        assert plan.show(args, args.model) == 0
    return out.getvalue().strip().splitlines()


def gib(lines, part, phase):
    row = next(x for x in lines if x.strip().startswith(part))
    cell = row[len(row.rstrip()) - 19 :].split()[("rollout", "training").index(phase)]
    return 0.0 if cell == "-" else float(cell)


def test_autocast_keeps_no_cast_cache():
    """A cached bf16 copy of every fp32 weight would live until the autocast region ends (2 bytes a
    parameter)."""
    on_gpu = types.SimpleNamespace(
        parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda"))])
    )
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # no CUDA here: autocast warns that it is disabled, and keeps its settings
        ctx = vlm.precision(on_gpu)
    assert (
        isinstance(ctx, torch.autocast)
        and ctx.fast_dtype == torch.bfloat16
        and ctx._cache_enabled is False
    )


def test_bf16_kv_cache_under_autocast(monkeypatch):
    """Under autocast the rollout keeps its KV cache in bf16 (RoPE leaves fp32 keys), and the
    log-probs it samples with still agree with the training forward's within the bf16 limit of the
    logp_gap guard."""
    model, family = vlm.load(g.TINY_MODEL)
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    prompt, _ = family.encode(rows)
    _, state = family.prefill(model, prompt, 4, 8)
    assert {layer.keys.dtype for layer in state["cache"].layers} == {
        torch.float32
    }  # fp32 without autocast
    monkeypatch.setattr(vlm, "precision", lambda model: torch.autocast("cpu", dtype=torch.bfloat16))
    _, state = family.prefill(model, prompt, 4, 8)
    assert {r.dtype for layer in state["cache"].layers for r in layer.room} == {torch.bfloat16}
    o, logp, _ = g.sample_group(
        model, family, prompt, 4, g.Decoding(24, 1.0), infra.sample_keys(0, 1, range(8))
    )
    mask = vlm.completion_mask(o, family.eos_id)
    with torch.no_grad():
        train = vlm.completion_logps(model, family, prompt, torch.arange(8) // 4, o, mask, 1.0, 64)
    gap = ((logp - train).abs() * mask).sum() / mask.sum()
    assert gap < vlm.logp_gap_limit(model) == 0.02, gap


def test_a_bounded_rollout_draws_the_same_tokens():
    """--rollout-batch-size decodes the B*G completions in chunks: the same keyed draws, so the same
    tokens."""
    model, family = vlm.load(g.TINY_MODEL)
    rows = data.load_rows(g.Args(train_size=6))[0][:3]
    prompt, _ = family.encode(rows)
    keys = infra.sample_keys(0, 7, range(12))
    whole = g.sample_group(model, family, prompt, 4, g.Decoding(32, 1.0), keys)
    for rows_at_once in (4, 8):
        chunked = g.sample_group(
            model, family, prompt, 4, g.Decoding(32, 1.0, chunk=rows_at_once), keys
        )
        assert torch.equal(whole[0], chunked[0])
        assert torch.allclose(whole[1], chunked[1], atol=1e-5)
    assert len({tuple(c.tolist()) for c in whole[0]}) > 3
    with pytest.raises(SystemExit, match="multiple of G"):
        g.parse_args(["--rollout-batch-size", "6", "--num-generations", "4"])


DDP_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {root!r})
import data, grpo_vlm as g, infra, vlm
procs = infra.Processes(*infra.setup_distributed())
rank = procs.rank
args = g.parse_args(["--prompts-per-step", "2", "--num-generations", "4",
                     "--max-completion-length", "16", "--micro-batch-size", "2",
                     "--train-size", "8", "--beta", "0"])
model, family = vlm.load(g.TINY_MODEL)
policy, opt = infra.engine(args, model, family, None, procs)
rows = data.load_rows(args)[0]
run = g.Run(model, family, policy, None, opt, procs, g.reward_weights(args), family.coord_space)
rng = infra.prompt_sampler(0)
ptrs = []
for step in (1, 2, 3):
    batch = g.rollout(run, rows, rng, step, g.Stage(16, {{"iou_threshold": 0.0}}), args)
    A = torch.linspace(-1, 1, len(batch.o))
    tw = g.token_weights(batch.mask, "grpo")  # policy_update scales by the process count
    g.policy_update(run, batch, A, tw, args)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(x is not None for x in grads)
    ptrs.append([x.data_ptr() for x in grads])
    storages = {{x.untyped_storage().data_ptr() for x in grads}}
    if rank == 0:  # one writer: two processes' lines can interleave on a shared stdout
        print(f"STEP {{step}} params {{len(grads)}} storages {{len(storages)}}", flush=True)
# DDP rebuilds its buckets once, after the first step
assert ptrs[1] == ptrs[2], "the gradients moved"
torch.distributed.destroy_process_group()
"""


def test_ddp_gradients_are_views_of_its_buckets(tmp_path):
    """With gradient_as_bucket_view and gradients zeroed (not set to None), DDP keeps one copy of
    the gradients: from the second step on (DDP rebuilds its buckets after the first), each gradient
    is a view into one of a few bucket buffers, the same ones at every step."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [line.split() for line in res.stdout.splitlines() if line.startswith("STEP")]
    assert len(steps) == 3
    for s in steps[1:]:
        params, storages = int(s[3]), int(s[5])
        assert params > 50 and storages <= 4, (
            s
        )  # a separate gradient per parameter would be `params` storages


@needs_configs
def test_plan_reads_only_the_configs_and_gives_a_verdict():
    """The shared config folders hold config.json and preprocessor_config.json only: no tokenizer,
    no weights."""
    assert sorted(os.listdir(QWEN_3B)) == ["config.json", "preprocessor_config.json"]
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "grpo_vlm.py"),
            "--plan",
            "--preset",
            "vlm-r1",
            "--model",
            QWEN_3B,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )  # the command itself
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1].startswith(
        "peak per GPU: "
    ), res.stderr[-2000:]
    one = run_plan("--preset", "vlm-r1", "--model", QWEN_3B)
    two = run_plan("--preset", "vlm-r1", "--model", QWEN_3B, "--processes", "2")
    assert one[-1].startswith("peak per GPU: ") and one[-1].endswith("(fits in 79.6 GiB)"), one[-1]
    assert two[-1].endswith("(fits in 79.6 GiB)"), two[-1]
    assert "3.75B parameters" in one[0]
    # the parts the issue counts: 4N weights, 2N bf16 reference, 8N moments, 4N gradients (N =
    # 3.7546e9)
    N = 3_754_622_976 / 2**30
    for part, per_param in (
        ("fp32 weights", 4),
        ("reference (bf16)", 2),
        ("AdamW moments (fp32)", 8),
        ("fp32 gradients", 4),
    ):
        assert gib(one, part, "training") == pytest.approx(per_param * N, abs=0.01)
    assert gib(one, "fp32 gradients", "rollout") == 0  # one process frees them for the rollout
    assert gib(two, "fp32 gradients", "rollout") == pytest.approx(
        4 * N, abs=0.01
    )  # DDP's buckets stay
    # two processes each decode half the rows: half the KV cache
    assert gib(two, "KV cache", "rollout") == pytest.approx(
        gib(one, "KV cache", "rollout") / 2, abs=0.01
    )
    tight = run_plan("--preset", "vlm-r1", "--model", QWEN_3B, "--gpu-memory", "40")
    assert tight[-1].endswith("(does not fit in 40 GiB)")


@needs_configs
def test_plan_knows_lora_8bit_fsdp_and_the_rollout_batch():
    base = ["--preset", "vlm-r1", "--model", QWEN_7B, "--processes", "2"]
    full, fsdp = run_plan(*base), run_plan(*base, "--fsdp")
    fsdp8, lora = (
        run_plan(*base, "--fsdp", "--optim", "adamw8bit"),
        run_plan(*base, "--lora-r", "64"),
    )
    assert (
        gib(fsdp, "fp32 gradients", "rollout") == 0
    )  # FSDP2's sharded gradients are freed for the rollout
    bounded = run_plan(*base, "--rollout-batch-size", "16")
    assert full[-1].endswith(
        "(does not fit in 79.6 GiB)"
    )  # 7B with DDP: a whole copy of everything per GPU
    assert gib(fsdp, "fp32 weights", "training") == pytest.approx(
        gib(full, "fp32 weights", "training") / 2, abs=0.01
    )
    assert (
        gib(fsdp8, "AdamW moments (8-bit)", "training")
        < gib(fsdp, "AdamW moments (fp32)", "training") / 3.9
    )
    assert fsdp8[-1].endswith("(fits in 79.6 GiB)")
    assert not any(
        x.strip().startswith("reference") for x in lora
    )  # the base model with its adapters off
    assert (
        0 < gib(lora, "AdamW moments (fp32)", "training") < 2
    )  # 161M adapter parameters at rank 64
    assert gib(lora, "bf16 weights (frozen)", "training") == pytest.approx(
        gib(full, "fp32 weights", "training") / 2, abs=0.01
    )
    assert gib(bounded, "KV cache", "rollout") == pytest.approx(
        gib(full, "KV cache", "rollout") / 4, abs=0.01
    )


def test_plan_counts_the_kv_cache_the_rollout_allocates():
    """One part measured exactly: the plan's KV cache (CPU: fp32) is the bytes of the rollout's
    cache buffers."""
    model, family = vlm.load(g.TINY_MODEL)
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    prompt, _ = family.encode(rows)
    G, L = 4, 20
    _, state = family.prefill(model, prompt, G, L)
    allocated = sum(
        r.numel() * r.element_size() for layer in state["cache"].layers for r in layer.room
    )
    P = prompt["input_ids"].shape[1]
    args = g.Args(
        prompts_per_step=2,
        num_generations=G,
        max_completion_length=L,
        max_prompt_length=P,
        image_size="1000x1000",
    )  # a large image: the prompt is capped at P tokens
    planned = plan.parts(args, g.TINY_MODEL, 1, "cpu")["rollout"]["KV cache"]
    assert planned == allocated


def test_lora_keeps_its_frozen_base_in_bf16_under_autocast(tmp_path, monkeypatch):
    """--plan counts LoRA's frozen base at 2 bytes a parameter on a GPU: under bf16 autocast (here
    on the CPU) the base weights are bf16 and the adapters fp32, and a LoRA step runs with the
    logp_gap check passing."""
    monkeypatch.setattr(vlm, "precision", lambda model: torch.autocast("cpu", dtype=torch.bfloat16))
    args = g.parse_args(
        [
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--max-completion-length",
            "16",
            "--train-size",
            "8",
            "--steps",
            "1",
            "--eval-every",
            "0",
            "--save-every",
            "0",
            "--sample-every",
            "0",
            "--lora-r",
            "4",
            "--output-dir",
            str(tmp_path),
        ]
    )
    model, family = vlm.load(g.TINY_MODEL)
    vlm.add_lora(model, family, args, g.TINY_MODEL)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    g.train(args)  # the whole run, from the adapter's start to its saved folder
    reloaded = vlm.load(str(tmp_path / "final"))[0]
    assert {(p.requires_grad, p.dtype) for p in reloaded.parameters()} == dtypes
