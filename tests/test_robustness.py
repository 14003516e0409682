"""Issue 6: sampling that does not depend on who samples, two processes, exact resume, signals, NaN,
frozen vision."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import vlm  # noqa: E402

import runs  # noqa: E402

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
]


def params(run_dir, sub="final"):
    return load_file(os.path.join(run_dir, sub, "model.safetensors"))


def metrics(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [
        {k: v for k, v in r.items() if k != "seconds"} for r in rows
    ]  # wall time is the only free field


def test_keyed_sampler_draws_from_softmax_at_temperature():
    p = torch.tensor(
        [0.5, 0.3, 0.0, 0.15, 0.05]
    )  # a zero-probability token (suppressed) is never drawn
    n = 40_000
    for T in (1.0, 2.0):
        scores = p.log().expand(n, 5).clone()
        draws = g.draw_token(scores / T, infra.sample_keys(0, 1, range(n)), 2)
        freq = torch.bincount(draws, minlength=5).float() / n
        expect = torch.softmax(p.log() / T, -1)
        assert (freq - expect).abs().max() < 0.01, (T, freq, expect)  # 4 sigma at n=40k is ~0.01
        assert freq[2] == 0
    # a new position or a new step draws anew
    keys, s = infra.sample_keys(0, 1, range(2000)), torch.zeros(2000, 9)
    assert (g.draw_token(s, keys, 2) != g.draw_token(s, keys, 3)).float().mean() > 0.8
    assert (
        g.draw_token(s, keys, 2) != g.draw_token(s, infra.sample_keys(0, 2, range(2000)), 2)
    ).float().mean() > 0.8


def test_a_completion_depends_on_its_key_not_on_the_batch():
    """What makes 1 and 2 processes (and a resumed run) draw the same completions."""
    model, family = vlm.load(g.TINY_MODEL)
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    both = g.sample_group(
        model,
        family,
        family.encode(rows)[0],
        3,
        g.Decoding(16, 1.0),
        keys=infra.sample_keys(0, 5, range(6)),
    )[0]
    second = g.sample_group(
        model,
        family,
        family.encode(rows[1:])[0],
        3,
        g.Decoding(16, 1.0),
        keys=infra.sample_keys(0, 5, range(3, 6)),
    )[0]
    assert torch.equal(both[3:], second)
    assert len({tuple(c.tolist()) for c in both[:3]}) > 1  # and the G samples of a prompt differ


def test_two_processes_make_the_same_update_as_one(tmp_path):
    """torchrun with 2 gloo processes, one prompt each, equals one process with both prompts.
    Token-mean aggregation and batch-std advantages make the test depend on the global
    normalisation."""
    flags = SMALL + [
        "--steps",
        "2",
        "--micro-batch-size",
        "4",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--loss-agg",
        "token",
        "--scale-rewards",
        "batch",
    ]
    out = runs.one_and_two(flags, tmp_path)  # one thread each: the same float rounding in both runs
    assert "processes=2" in out["two"] and "processes=1" in out["one"]
    one, two_ = params(tmp_path / "one"), params(tmp_path / "two")
    base = load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
    assert max((one[k] - base[k]).abs().max() for k in one) > 1e-4  # the step did move the weights
    assert all(torch.allclose(one[k], two_[k], rtol=0, atol=1e-6) for k in one)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["reward"] for r in m1] == pytest.approx([r["reward"] for r in m2], abs=1e-6)
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], abs=1e-6)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    flags = SMALL + ["--eval-every", "2", "--eval-n", "4", "--save-every", "2"]
    g.train(g.parse_args(flags + ["--steps", "4", "--output-dir", str(tmp_path / "a")]))
    g.train(g.parse_args(flags + ["--steps", "2", "--output-dir", str(tmp_path / "b")]))
    with open(
        tmp_path / "b" / "metrics.jsonl", "a"
    ) as f:  # a crashed run's rows after its last checkpoint
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")
    g.train(
        g.parse_args(
            flags
            + ["--steps", "4", "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")]
        )
    )
    a, b = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == [
        "checkpoint-000002",
        "checkpoint-000004",
        "curves.png",
        "final",
        "held_out.png",
        "metrics.jsonl",
    ]  # no temporary folder left behind
    with pytest.raises(SystemExit, match="different --seed"):
        g.train(
            g.parse_args(
                flags
                + [
                    "--steps",
                    "6",
                    "--seed",
                    "1",
                    "--output-dir",
                    str(tmp_path / "b"),
                    "--resume",
                    str(tmp_path / "b"),
                ]
            )
        )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "grpo_vlm.py"),
        *SMALL,
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--output-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd + ["--steps", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines = []
    for line in proc.stdout:  # wait until training runs, then interrupt it mid-run
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(sig)
    out = "".join(lines)
    assert proc.wait(timeout=120) == 128 + sig, out[-2000:]
    assert "Traceback" not in out and "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert step >= 2 and os.path.exists(tmp_path / f"checkpoint-{step:06d}" / "trainer_state.pt")
    res = subprocess.run(
        cmd + ["--steps", str(step + 1), "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0 and f"step {step + 1}/{step + 1}" in res.stdout, res.stderr[-2000:]


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    real, calls = g.grpo_loss, []

    def poisoned(*a, **k):  # NaN loss on the 2nd call (= step 2: one micro-batch per step)
        loss, st = real(*a, **k)
        calls.append(1)
        return (loss * float("nan"), st) if len(calls) in nan_calls else (loss, st)

    monkeypatch.setattr(g, "grpo_loss", poisoned)
    flags = SMALL + ["--eval-every", "0", "--save-every", "0"]
    nan_calls = {2}
    g.train(g.parse_args(flags + ["--steps", "3", "--output-dir", str(tmp_path / "a")]))
    m = metrics(tmp_path / "a")
    assert [r.get("skipped_updates", 0) for r in m] == [0, 1, 0]  # logged, and the run went on
    calls.clear()
    nan_calls = set(range(100))
    with pytest.raises(SystemExit, match="2 steps in a row had a non-finite"):
        g.train(
            g.parse_args(
                flags
                + ["--steps", "5", "--max-bad-steps", "2", "--output-dir", str(tmp_path / "b")]
            )
        )
    saved, base = (
        params(tmp_path / "b", "checkpoint-000002"),
        load_file(os.path.join(g.TINY_MODEL, "model.safetensors")),
    )
    assert all(torch.equal(saved[k], base[k]) for k in base)  # no NaN step ever touched the weights


def test_freeze_vision_keeps_the_vision_tower(tmp_path):
    g.train(
        g.parse_args(
            SMALL
            + [
                "--steps",
                "2",
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--freeze-vision",
                "true",
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    after, base = params(tmp_path), load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
    vision = [k for k in base if k.startswith("visual.")]
    assert vision and all(torch.equal(after[k], base[k]) for k in vision)
    assert any(not torch.equal(after[k], base[k]) for k in base if k not in vision)


def test_lr_schedule():
    a = g.Args(lr=1.0, steps=10, warmup_steps=2, lr_schedule="linear")
    assert [round(infra.lr_at(a, s), 3) for s in (1, 2, 3, 10)] == [0.5, 1.0, 1.0, 0.125]
    assert infra.lr_at(g.Args(lr=1.0, steps=10), 7) == 1.0


def test_shared_prefill_rollout_matches_the_plain_one():
    """The rollout encodes each prompt once and repeats its KV cache G times. Its tokens must be
    those of HF generate on G plain copies of every input (same keyed draws), and its log-probs
    those of the training forward on G plain copies (each with its own image)."""
    model, family = vlm.load(g.TINY_MODEL)
    tok = family.tokenizer
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    rows[1] = dict(rows[1], problem=rows[1]["problem"] + " please please")  # left padding in row 0
    prompt, _ = family.encode(rows)
    G, L, eos, pad = 4, 40, tok.eos_token_id, tok.pad_token_id
    keys = infra.sample_keys(0, 3, range(2 * G))
    ids, logps, _ = g.sample_group(model, family, prompt, G, g.Decoding(L, 1.0), keys)
    mask = vlm.completion_mask(ids, eos)
    assert mask.sum(1).min() > 10 and len({tuple(r.tolist()) for r in ids}) > 2

    n = prompt["image_grid_thw"].prod(-1).tolist()
    pixels = torch.cat(
        [p for p in prompt["pixel_values"].split(n) for _ in range(G)]
    )  # G plain copies
    rep = {
        k: prompt[k].repeat_interleave(G, 0)
        for k in ("input_ids", "attention_mask", "image_grid_thw")
    }

    # the same draws, as a logits processor of HF generate (which then takes the argmax)
    class Keyed:
        def __call__(self, input_ids, scores):
            token = g.draw_token(scores, keys, input_ids.shape[1] - rep["input_ids"].shape[1])
            return torch.full_like(scores, -float("inf")).scatter(1, token[:, None], 0.0)

    with torch.no_grad():
        out = model.generate(
            **rep,
            pixel_values=pixels,
            mm_token_type_ids=vlm.mm_types(rep["input_ids"], model.config.image_token_id),
            max_new_tokens=L,
            do_sample=False,
            logits_processor=[Keyed()],
            eos_token_id=eos,
            pad_token_id=pad,
            suppress_tokens=family.suppress,
        )
        plain = vlm.completion_logps(
            model, family, {**rep, "pixel_values": pixels}, torch.arange(2 * G), ids, mask, 1.0, 64
        )
    hf = out[:, rep["input_ids"].shape[1] :]
    assert torch.equal(
        ids[:, : hf.shape[1]] * mask[:, : hf.shape[1]].long(), hf * mask[:, : hf.shape[1]].long()
    )
    assert torch.allclose(logps * mask, plain * mask, atol=1e-4), (
        (logps * mask - plain * mask).abs().max()
    )


def test_fp32_master_weights_keep_small_updates_under_bf16_autocast(tmp_path, monkeypatch):
    """Why the weights stay fp32 on a GPU: an AdamW step at lr 1e-6 is lost on bf16 weights. And the
    training path under bf16 autocast (the GPU setting, here on the CPU) keeps fp32 weights that
    move."""
    for dtype, moves in ((torch.bfloat16, False), (torch.float32, True)):
        w = torch.full((1000,), 0.01, dtype=dtype, requires_grad=True)
        w.grad = torch.randn(1000).to(dtype)
        torch.optim.AdamW([w], lr=1e-6, weight_decay=0.0).step()
        assert torch.equal(w.detach(), torch.full((1000,), 0.01, dtype=dtype)) != moves
    monkeypatch.setattr(vlm, "precision", lambda model: torch.autocast("cpu", dtype=torch.bfloat16))
    final = g.train(
        g.parse_args(
            SMALL
            + [
                "--steps",
                "1",
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--lr",
                "1e-6",
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    after, base = params(tmp_path), load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values()) and final
    assert sum(not torch.equal(after[k], base[k]) for k in base) > len(base) // 2
    assert (
        0 < metrics(tmp_path)[0]["logp_gap"] < 0.1
    )  # bf16 forwards: rollout and training differ a little
