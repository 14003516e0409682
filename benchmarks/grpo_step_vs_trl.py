"""One GRPO step of grpo_vlm.py against TRL's GRPOTrainer, on identical work, in alternating fresh
processes.

    pip install -r benchmarks/requirements.txt            # TRL: a benchmark-only install
    python benchmarks/grpo_step_vs_trl.py                 # CPU, the shipped tiny Qwen2.5-VL
    python benchmarks/grpo_step_vs_trl.py --model 3b      # GPU: Qwen2.5-VL-3B architecture,
                                                          # random weights

Identical work: the same model and prompts (images included), the same B prompts x G completions per
step, exactly L new tokens per completion (EOS is blocked before L on both sides, so neither stops
early), the same beta (a reference model on both), mu = 1, gradient checkpointing, micro-batch,
optimizer (AdamW, lr, no weight decay, grad clipping), precision and thread count. Each run is a
fresh process that times `--warmup + --steps` optimizer steps; runs of ours and TRL alternate
`--rounds` times, and the table shows the median over all timed steps, so a noisy machine hits both
alike.

Memory: on the CPU, peak resident memory of the process (and that minus the memory after imports,
before the model loads); on a GPU, torch.cuda.max_memory_allocated. On a GPU the table also shows
the physical floor of a step: the decode steps at measured memory bandwidth (weight bytes per decode
step / bandwidth) plus training at the measured bf16 matmul rate (~6 x params x trained tokens, plus
2 x params x tokens for the reference forward), and the fraction of it each implementation reaches.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The models: the shipped tiny one, or Qwen2.5-VL-3B's architecture with random weights
# ---------------------------------------------------------------------------------------------
def build_3b(out, scale=1):
    """Qwen2.5-VL-3B-Instruct's config (hand-written: no hub here), random bf16 weights, a
    word-level tokenizer with the real vocabulary size 151,936 and Qwen's special tokens, and an
    image processor for 448x448 images. scale > 1 divides widths and depths, for a CPU smoke test of
    this path."""
    import torch
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    import make_tiny_model as mtm

    small = (
        mtm.build_tokenizer().backend_tokenizer
    )  # Qwen's special tokens and the synthetic world's words
    vocab = small.get_vocab(with_added_tokens=False)
    vocab.update({f"w{i}": i for i in range(len(vocab), 151_936)})  # the real vocabulary size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = small.pre_tokenizer, small.decoder
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in mtm.SPECIAL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in mtm.TAGS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=mtm.CHAT_TEMPLATE,
        padding_side="left",
    )
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    # scale divides widths, depths and head counts alike, so head dims (text 128, vision 80) and
    # MRoPE stay
    text = dict(
        vocab_size=151_936,
        hidden_size=2048 // scale,
        intermediate_size=11008 // scale,
        num_hidden_layers=max(1, 36 // scale),
        num_attention_heads=16 // scale,
        num_key_value_heads=max(1, 2 // scale),
        max_position_embeddings=128000,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=max(1, 32 // scale),
        hidden_size=1280 // scale,
        intermediate_size=3420 // scale,
        num_heads=16 // scale,
        out_hidden_size=text["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    ip = mtm.build_image_processor()
    ip.size = {"shortest_edge": 448 * 448, "longest_edge": 448 * 448}
    mtm.save(model, tok, ip, out)
    return out


def prompts(n, size):
    """n synthetic REC rows with images of size x size (the shapes world, resized)."""
    import data

    root = os.path.join(ROOT, "data", "synthetic")
    rows, _ = data.load_jsonl(data.make_synthetic(root, "train", max(n, 64), 0), root)
    rows = rows[:n]
    if size != data.IMAGE_SIZE:
        out = os.path.join(tempfile.gettempdir(), f"bench-images-{size}")
        os.makedirs(out, exist_ok=True)
        for r in rows:
            path = os.path.join(out, os.path.basename(r["image_path"]))
            if not os.path.exists(path):
                data.load_image(r["image_path"]).resize((size, size)).save(path)
            scale = size / r["width"]
            r.update(
                image_path=path,
                width=size,
                height=size,
                solution=[v * scale for v in r["solution"]],
            )
    return rows


# ---------------------------------------------------------------------------------------------
# One timed run of each implementation (in its own process)
# ---------------------------------------------------------------------------------------------
def run_ours(a, model_path):
    import torch

    import data
    import grpo_vlm as g

    out = tempfile.mkdtemp()
    args = g.Args(
        model=model_path,
        steps=a.warmup + a.steps,
        prompts_per_step=a.B,
        num_generations=a.G,
        max_completion_length=a.L,
        min_completion_length=a.L,
        beta=a.beta,
        lr=a.lr,
        mu=1,
        micro_batch_size=a.micro_batch,
        gradient_checkpointing=True,
        eval_every=0,
        save_every=0,
        sample_every=0,
        output_dir=out,
    )
    rows = prompts(a.prompts, a.image_size)
    data.load_rows = lambda args: (rows, [])  # the benchmark's prompts, for both implementations
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    g.train(args)
    steps = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [s["seconds"] for s in steps], [s["completion_len"] for s in steps]


def run_trl(a, model_path):
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLProcessor, TrainerCallback
    from transformers.processing_utils import ProcessorMixin
    from trl import GRPOConfig, GRPOTrainer

    import data
    import rewards
    import vlm

    # Qwen2_5_VLProcessor insists on a video processor class, which needs torchvision (broken with
    # the CPU torch here). The processor itself only touches it for videos, so skip the class check.
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, family = vlm.load(model_path, device)
    tok, ip = family.tokenizer, family.image_processor
    processor = Qwen2_5_VLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template
    )
    rows = prompts(a.prompts, a.image_size)
    ds = Dataset.from_list(
        [
            {
                "prompt": data.build_messages(r["problem"]),
                "image": data.load_image(r["image_path"]),
                "solution": r["solution"],
                "width": r["width"],
                "height": r["height"],
            }
            for r in rows
        ]
    )

    def iou_and_format(
        prompts, completions, solution, width, height, **kw
    ):  # the same rewards as ours
        out = []
        for c, s, w, h in zip(completions, solution, width, height):
            text = c[0]["content"] if isinstance(c, list) else c
            gt = {"solution": s, "width": w, "height": h, "coord_space": "abs_original"}
            out.append(rewards.iou_reward(text, gt) + rewards.format_reward(text))
        return out

    class Timer(TrainerCallback):
        times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    conf = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=a.warmup + a.steps,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        # B prompts x G completions per optimizer step, in micro-batches of `micro_batch`
        # completions
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.B * a.G // a.micro_batch,
        num_generations=a.G,
        max_completion_length=a.L,
        generation_kwargs={"min_new_tokens": a.L},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=a.beta,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        gradient_checkpointing=True,
        learning_rate=a.lr,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[iou_and_format],
        args=conf,
        train_dataset=ds,
        processing_class=processor,
        callbacks=[Timer()],
    )
    trainer.train()
    lengths = [
        h["completions/mean_length"]
        for h in trainer.state.log_history
        if "completions/mean_length" in h
    ]
    return Timer.times, lengths


def child(a):
    import torch

    torch.set_num_threads(a.threads)
    base_rss = rss_mb()
    model_path = a.model_path
    times, lengths = (run_ours if a.child == "ours" else run_trl)(a, model_path)
    mem = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()
    print(
        "RESULT "
        + json.dumps(
            {
                "times": times[a.warmup :],
                "lengths": lengths,
                "peak_mb": mem,
                "base_mb": 0.0 if torch.cuda.is_available() else base_rss,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# The physical floor on a GPU
# ---------------------------------------------------------------------------------------------
def gpu_floor(a, model_path, prompt_len):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in m.parameters())
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB copy: read + write
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    bandwidth = 2 * 20 * x.numel() / (time.perf_counter() - t)
    n = 8192
    p, q = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    p @ q
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        p @ q
    torch.cuda.synchronize()
    flops = 20 * 2 * n**3 / (time.perf_counter() - t)
    tokens = a.B * a.G * (prompt_len + a.L)
    decode = a.L * 2 * params / bandwidth  # bf16 weights read once per decode step
    train = (6 + 2) * params * tokens / flops  # policy forward + backward, reference forward
    return {
        "params": params,
        "bandwidth_GBs": bandwidth / 1e9,
        "bf16_TFLOPs": flops / 1e12,
        "decode_s": decode,
        "train_s": train,
        "floor_s": decode + train,
    }


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "3b"],
        help="the shipped tiny model, or the 3B architecture",
    )
    p.add_argument(
        "--scale",
        type=int,
        default=1,
        help="3b only: divide widths and depths (a CPU smoke test of that path)",
    )
    p.add_argument("--B", type=int, default=None, help="prompts per step (tiny: 4, 3b: 8)")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument(
        "--L", type=int, default=None, help="new tokens per completion, forced (tiny: 48, 3b: 256)"
    )
    p.add_argument("--micro-batch", type=int, default=16, help="completions per forward/backward")
    p.add_argument(
        "--beta", type=float, default=0.04, help="KL weight (a reference model on both sides)"
    )
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run, after --warmup")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2, help="alternations of ours and TRL")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=128, help=argparse.SUPPRESS)
    a = p.parse_args()
    big = a.model == "3b"
    a.B = a.B or (8 if big else 4)
    a.L = a.L or (256 if big else 48)
    a.image_size = 448 if big else 128
    if a.child:
        return child(a)
    import grpo_vlm as g

    model_path = g.TINY_MODEL
    if big:  # built once (memory_plan.py reuses it)
        model_path = os.path.join(tempfile.gettempdir(), f"qwen2.5-vl-3b-random-{a.scale}")
        if not os.path.exists(os.path.join(model_path, "config.json")):
            build_3b(model_path, a.scale)
    cmd = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--model-path",
        model_path,
        "--B",
        str(a.B),
        "--L",
        str(a.L),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    results = {"ours": [], "trl": []}
    for r in range(a.rounds):
        for name in ("ours", "trl"):
            t = time.time()
            out = subprocess.run(
                cmd + ["--child", name], capture_output=True, text=True, env=env, cwd=ROOT
            )
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{name} run failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(line[0][7:]))
            print(
                f"round {r + 1} {name}: {time.time() - t:.0f}s, steps "
                f"{[round(x, 3) for x in results[name][-1]['times']]}",
                flush=True,
            )
    rows = {}
    for name, runs in results.items():
        times = [x for run in runs for x in run["times"]]
        lengths = [x for run in runs for x in run["lengths"]]
        rows[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "peak_mb": max(run["peak_mb"] for run in runs),
            "run_mb": max(run["peak_mb"] - run["base_mb"] for run in runs),
            "mean_len": statistics.mean(lengths) if lengths else float("nan"),
            "n": len(times),
        }
    o, t = rows["ours"], rows["trl"]
    import torch

    mem = "peak GPU memory (MiB)" if torch.cuda.is_available() else "peak RSS (MiB)"
    print(
        f"\n{a.model} model, B={a.B} G={a.G} L={a.L} micro-batch {a.micro_batch}, beta {a.beta}, "
        "gradient checkpointing, "
        f"{a.threads} threads, {a.rounds} rounds x {a.steps} timed steps\n"
    )
    print(
        f"| | median s/step (min-max) | {mem} | run memory (MiB) | tokens per completion "
        "|\n|---|---|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
            f"{r['peak_mb']:.0f} | "
            f"{r['run_mb']:.0f} | {r['mean_len']:.1f} |"
        )
    print(
        f"| ours / TRL | **{o['median_s'] / t['median_s']:.2f}x** | "
        f"**{o['peak_mb'] / t['peak_mb']:.2f}x** | "
        f"{o['run_mb'] / t['run_mb']:.2f}x | |"
    )
    floor = None
    if big and torch.cuda.is_available():
        floor = gpu_floor(a, model_path, prompt_len=300)
        print(
            f"\nphysical floor: {floor['floor_s']:.3f} s/step (decode {floor['decode_s']:.3f} s at "
            f"{floor['bandwidth_GBs']:.0f} GB/s, training {floor['train_s']:.3f} s at "
            f"{floor['bf16_TFLOPs']:.0f} "
            f"TFLOP/s, {floor['params'] / 1e9:.2f}B params); ours reaches "
            f"{floor['floor_s'] / o['median_s']:.0%}, "
            f"TRL {floor['floor_s'] / t['median_s']:.0%}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "args": {k: v for k, v in vars(a).items() if k not in ("child", "model_path")},
                    "results": rows,
                    "raw": results,
                    "floor": floor,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
