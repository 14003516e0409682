"""Issue 16: LoRA (--lora-r) with the reference taken from the same model, its adapters off; and
8-bit AdamW (--optim adamw8bit). Only the adapters train, the reference is the base model exactly,
the checkpoints hold the adapter, --merge-lora writes a plain fp32 model, eval.py reads both, resume
is exact, every family trains."""

import json
import os
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
import make_tiny_model as mtm  # noqa: E402
import rewards  # noqa: E402
import vlm  # noqa: E402

import runs  # noqa: E402

# short completions; a reward that differs between completions (a tiny model's task reward is often
# all equal at this length, and then the advantages are 0 and nothing moves)
SMALL = [
    "--prompts-per-step",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "16",
    "--train-size",
    "8",
    "--sample-every",
    "0",
    "--eval-every",
    "0",
    "--reward-weights",
    "chars=1,iou=0,format=0",
]


@pytest.fixture(autouse=True)
def chars_reward(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "chars", lambda t, gt: (sum(map(ord, t)) % 97) / 97)


def metrics(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def base_of(key):
    """The base weight's name of a state-dict key of a model with adapters in place."""
    return key.replace(".base_layer.", ".")


def check_only_adapters_moved(final, base_path, vision_prefix):
    """The adapter folder `final` on its base: every base weight as it was, every B moved from its
    zero start."""
    model, family = vlm.load(final)
    base = vlm.load(base_path)[0].state_dict()
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    assert lora and all(
        not k.startswith(vision_prefix) for k in lora
    )  # none in the vision tower by default
    assert {base_of(k) for k in after if "lora_" not in k} == set(base)
    assert all(torch.equal(after[k], base[base_of(k)]) for k in after if "lora_" not in k)
    assert all(after[k].abs().max() > 0 for k in lora if "lora_B" in k)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        k for k in lora
    }  # resumable: A, B train
    return model, family


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.REWARDS, "chars", lambda t, gt: (sum(map(ord, t)) % 97) / 97)
        g.train(
            g.parse_args(
                SMALL
                + [
                    "--lora-r",
                    "8",
                    "--lr",
                    "1e-2",
                    "--steps",
                    "2",
                    "--save-every",
                    "0",
                    "--merge-lora",
                    "--output-dir",
                    str(out),
                ]
            )
        )
    return out


def test_lora_trains_the_adapters_only(lora_run):
    final = lora_run / "final"
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.json",
    } <= set(os.listdir(final)) and "model.safetensors" not in os.listdir(final)
    assert vlm.lora_base(str(final)) == g.TINY_MODEL
    config = json.load(open(final / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        8,
        16,
        0.0,
    )  # alpha 0 means 2 r
    model, family = check_only_adapters_moved(str(final), g.TINY_MODEL, "model.visual.")
    # r (in + out) per wrapped layer: the 3 layers' q, k, v, o, gate, up, down projections of the
    # tiny model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 58368
    m = metrics(lora_run)
    assert m[0]["kl"] == 0.0  # B = 0 at the start: the policy is its reference exactly
    assert m[1]["kl"] > 0 and all(r["logp_gap"] < 1e-5 for r in m)


def test_the_reference_is_the_base_model_exactly():
    model, family = vlm.load(g.TINY_MODEL)
    base = infra.Policy(vlm.load(g.TINY_MODEL)[0], family, 1.0, 64)
    args = g.parse_args(["--lora-r", "8"])
    vlm.add_lora(model, family, args, g.TINY_MODEL)
    with torch.no_grad():  # a trained adapter: B away from 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    prompt = family.encode(rows)[0]
    o = g.sample_group(
        model, family, prompt, 2, g.Decoding(12, 1.0), infra.sample_keys(0, 1, range(4))
    )[0]
    packed = family.pack(
        model,
        prompt,
        torch.arange(2).repeat_interleave(2),
        o,
        vlm.completion_mask(o, family.eos_id),
    )
    ref = g.reference_model(args, model, family, None, g.TINY_MODEL, "cpu")
    policy = infra.Policy(model, family, 1.0, 64)
    with torch.no_grad():
        assert torch.equal(ref(packed), base(packed))  # bit for bit: no copy, and no drift
        assert (
            policy(packed) - ref(packed)
        ).abs().max() > 1e-3  # and the adapters are back on after it
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_merge_and_eval_read_what_a_lora_run_saved(lora_run):
    from transformers import AutoModelForImageTextToText

    final, merged = lora_run / "final", lora_run / "final-merged"
    assert "adapter_config.json" not in os.listdir(merged)
    plain = AutoModelForImageTextToText.from_pretrained(
        str(merged), dtype=torch.float32
    )  # no peft needed
    assert not getattr(plain, "_hf_peft_config_loaded", False)
    assert not any("lora" in k for k in plain.state_dict())
    adapted, family = vlm.load(str(final))
    base = vlm.load(g.TINY_MODEL)[0]
    rows = data.load_rows(g.Args(train_size=4))[0][:2]
    prompt = family.encode(rows)[0]
    o = g.sample_group(
        adapted, family, prompt, 2, g.Decoding(12, 1.0), infra.sample_keys(0, 1, range(4))
    )[0]
    copies, mask = torch.arange(2).repeat_interleave(2), vlm.completion_mask(o, family.eos_id)
    with torch.no_grad():
        want = vlm.completion_logps(adapted, family, prompt, copies, o, mask, 1.0, 64)
        got = vlm.completion_logps(plain, family, prompt, copies, o, mask, 1.0, 64)
        untrained = vlm.completion_logps(base, family, prompt, copies, o, mask, 1.0, 64)
    assert ((got - want).abs() * mask).max() < 1e-5  # W + alpha / r B A in fp32
    assert ((untrained - want).abs() * mask).max() > 1e-4  # the adapter did change the model
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "eval.py"),
            "--model",
            str(final),
            str(merged),
            "--n",
            "4",
            "--json",
            str(lora_run / "e.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = json.load(open(lora_run / "e.json"))
    assert a["n"] == 4 and {k: v for k, v in a.items() if k != "model"} == {
        k: v for k, v in b.items() if k != "model"
    }


@pytest.mark.parametrize(
    "engine",
    [["--lora-r", "8", "--lr", "1e-2"], ["--optim", "adamw8bit", "--lr", "1e-3"]],
    ids=["lora", "adamw8bit"],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, engine):
    flags = SMALL + engine + ["--save-every", "1"]
    g.train(g.parse_args(flags + ["--steps", "2", "--output-dir", str(tmp_path / "a")]))
    g.train(g.parse_args(flags + ["--steps", "1", "--output-dir", str(tmp_path / "b")]))
    g.train(
        g.parse_args(
            flags
            + ["--steps", "2", "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")]
        )
    )
    weights = "adapter_model.safetensors" if "--lora-r" in engine else "model.safetensors"
    a, b = (load_file(tmp_path / run / "final" / weights) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    state = torch.load(
        tmp_path / "b" / "checkpoint-000001" / "trainer_state.pt", weights_only=True
    )["optimizer"]
    # bitsandbytes nests its quantized state (state1, state2, absmax, ...) one dict deeper
    moments = [
        v
        for s in state["state"].values()
        for x in s.values()
        for v in (x.values() if isinstance(x, dict) else [x])
        if torch.is_tensor(x) or isinstance(x, dict)
    ]
    moments = [v for v in moments if v.numel() > 1]
    if (
        "--optim" in engine
    ):  # 8-bit moments (bitsandbytes keeps tensors under 4096 elements in fp32)
        assert any(v.dtype == torch.uint8 for v in moments)
        base = load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
        assert any(not torch.equal(a[k], base[k]) for k in base)
    else:  # the adapters' A and B only
        assert len(state["state"]) == 42 and all(v.dtype == torch.float32 for v in moments)
    with pytest.raises(SystemExit, match="different --lora-r"):
        g.train(
            g.parse_args(
                SMALL
                + [
                    "--lora-r",
                    "4",
                    "--steps",
                    "3",
                    "--output-dir",
                    str(tmp_path / "b"),
                    "--resume",
                    str(tmp_path / "b"),
                ]
            )
        )


def test_two_processes_make_the_same_lora_update_as_one(tmp_path):
    """torchrun with 2 gloo processes equals one process (DDP over the adapters only; the
    reference's toggle of A and B's requires_grad inside the step leaves DDP's gradient sync
    intact). The task reward, as in test_robustness."""
    flags = [
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "48",
        "--train-size",
        "8",
        "--sample-every",
        "0",
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
        "--lora-r",
        "8",
        "--lr",
        "1e-2",
    ]
    runs.one_and_two(flags, tmp_path)
    one, two_ = (
        load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("one", "two")
    )
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 1e-3  # the adapters did move
    assert all(torch.allclose(one[k], two_[k], rtol=0, atol=1e-6) for k in one)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("reward", "loss", "kl"):
        assert [r[key] for r in m1] == pytest.approx([r[key] for r in m2], abs=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"])
def test_every_family_trains_lora(arch, tmp_path):
    """Two LoRA steps per family with the KL on: the logp_gap guard passes (train stops otherwise),
    the first KL is 0 (the reference, adapters off, is the starting model), and only the adapters
    moved."""
    path = str(tmp_path / arch)
    if arch == "qwen2_vl":
        tok = mtm.build_tokenizer()
        mtm.save(mtm.build_model(tok, "qwen2_vl"), tok, mtm.build_image_processor(), path)
    else:
        mtm.build_family(arch, path)
    final = g.train(
        g.parse_args(
            SMALL
            + [
                "--model",
                path,
                "--lora-r",
                "4",
                "--lr",
                "1e-2",
                "--steps",
                "2",
                "--save-every",
                "0",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
    )
    m = metrics(tmp_path / "run")
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0 and all(r["logp_gap"] < 1e-5 for r in m), m
    model, family = check_only_adapters_moved(
        final, path, "model.vision_tower." if arch == "gemma3" else "model.visual."
    )
    if arch == "qwen3_5":  # the Gated DeltaNet layers' projections too
        assert any("linear_attn.in_proj_qkv.lora_A" in n for n, _ in model.named_parameters())


def test_the_vision_tower_gets_adapters_only_when_asked(tmp_path):
    model, family = vlm.load(g.TINY_MODEL)
    vision = {n for n, m in model.named_modules() if m in set(family.vision(model).modules())}
    default = vlm.lora_modules(model, family, "")
    assert (
        len(default) == 3 * 7 and not set(default) & vision
    )  # 3 layers x q, k, v, o, gate, up, down
    both = r".*\.(qkv|q_proj)"
    assert set(vlm.lora_modules(model, family, both)) & vision
    assert not set(vlm.lora_modules(model, family, both, freeze_vision=True)) & vision
    with pytest.raises(SystemExit, match="matches no linear layer"):
        vlm.lora_modules(model, family, "nothing")
    with pytest.raises(SystemExit, match="outside the frozen vision tower"):
        vlm.lora_modules(model, family, r"model\.visual\..*", freeze_vision=True)
    # asked for: the vision tower's adapters train too, its weights still do not
    final = g.train(
        g.parse_args(
            SMALL
            + [
                "--lora-r",
                "4",
                "--lora-targets",
                both,
                "--lr",
                "1e-2",
                "--steps",
                "1",
                "--save-every",
                "0",
                "--beta",
                "0",
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    adapter = load_file(os.path.join(final, "adapter_model.safetensors"))
    vision_b = [k for k in adapter if ".visual." in k and "lora_B" in k]
    assert vision_b and all(adapter[k].abs().max() > 0 for k in vision_b)


def test_lora_after_a_cold_start_refers_to_the_cold_started_model(tmp_path):
    """--sft-steps with --lora-r: the cold start is a full fine-tune, saved; LoRA goes on the
    cold-started model, which is also the reference (first KL 0) and the base the adapter
    records."""
    final = g.train(
        g.parse_args(
            SMALL
            + [
                "--sft-steps",
                "2",
                "--lora-r",
                "4",
                "--steps",
                "1",
                "--save-every",
                "0",
                "--output-dir",
                str(tmp_path),
            ]
        )
    )
    assert vlm.lora_base(final) == str(tmp_path / "cold-start")
    assert metrics(tmp_path)[-1]["kl"] == 0.0
    check_only_adapters_moved(final, str(tmp_path / "cold-start"), "model.visual.")


@pytest.mark.parametrize(
    "flags,says",
    [
        (["--lora-alpha", "16"], "--lora-alpha is a LoRA flag: give --lora-r"),
        (["--lora-targets", "q_proj"], "--lora-targets is a LoRA flag"),
        (["--merge-lora"], "--merge-lora is a LoRA flag"),
        (["--lora-r", "8", "--fsdp"], "--fsdp with --lora-r is not built"),
        (["--lora-r", "8", "--lora-targets", "(q"], "is not a regular expression"),
        (["--lora-r", "-2"], "the rank must be positive"),
        (["--optim", "adamw4bit"], "invalid choice: 'adamw4bit'"),
    ],
)
def test_lora_flags_are_refused_with_one_line(flags, says):
    with pytest.raises(SystemExit) as e:
        g.parse_args(flags)
    assert (
        str(e.value.code).startswith("error: ")
        and says in str(e.value.code)
        and "\n" not in str(e.value.code)
    )


def test_a_refusal_prints_one_line():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "grpo_vlm.py"), "--merge-lora"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        res.returncode == 1
        and res.stderr.strip()
        == "error: --merge-lora is a LoRA flag: give --lora-r too (the adapters' rank)"
    )


def test_sft_refuses_the_grpo_engine_flags():
    """sft.py (and the cold start) fine-tune in full with AdamW: the LoRA and optimizer flags are
    not silently ignored."""
    import sft

    for flags in (["--lora-r", "4"], ["--optim", "adamw8bit"]):
        with pytest.raises(SystemExit, match="sft.py is a full fine-tune"):
            sft.main(flags)
