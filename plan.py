"""The memory plan (--plan): the expected peak memory per GPU of a run, part by part, before it
starts.

    python grpo_vlm.py --preset vlm-r1 --model PATH --plan [--processes 2] [--fsdp] [--lora-r 64]
    [--optim adamw8bit]

It reads the model's config.json and preprocessor_config.json only: no tokenizer, no weights, no
network. The parameters are counted on the model built on the meta device. The rollout and the
training step peak separately:
  resident    fp32 weights, the reference (bf16 on a GPU), optimizer state, the gradients while
              they are kept
  rollout     the KV cache of the completions decoding at once, the prefill, the sampling logits
  training    one micro-batch's activations (checkpointed layer inputs, one layer recomputed, the
              attention mask, the vision tower) and the log-prob chunk's [chunk, vocab] logits
It cannot see the CUDA context (about 0.5 GiB), the allocator's fragmentation, kernel workspaces
(cuBLAS, attention) or NCCL's buffers. benchmarks/memory_plan.py compares every part with a
measurement (README: "Memory").
"""

import functools
import math
import types

import torch

import vlm

GiB = 2**30
# the chat template and a question around the image (the README's REC prompts: 40 to 70 tokens)
TEXT_TOKENS = 64


@functools.lru_cache(maxsize=8)
def architecture(path):
    """What the plan needs of a model, from its config alone: parameter counts (the model built on
    the meta device), the text model's shapes, the cache bytes of one token, and the image tokens of
    a width x height image."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    family = vlm.ADAPTERS.get(config.model_type)
    if family is None:
        raise SystemExit(
            f"error: {path}: model type {config.model_type!r} is not supported; supported: "
            f"{', '.join(vlm.ADAPTERS)}"
        )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text, vision = config.get_text_config(), family.vision(None, model)
    layers = model.model.language_model.layers
    on_meta = types.SimpleNamespace(vision=lambda m: family.vision(None, m))

    def lora_per_rank(
        targets, freeze_vision
    ):  # LoRA's parameters per unit of rank on the layers add_lora wraps
        modules = dict(model.named_modules())
        return sum(
            modules[n].in_features + modules[n].out_features
            for n in vlm.lora_modules(model, on_meta, targets, freeze_vision)
        )

    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    attention = sum(
        k != "linear_attention" for k in kinds
    )  # full and sliding layers: we keep every position
    ip = vlm.image_processor(path, family).from_pretrained(path)
    shim = types.SimpleNamespace(image_processor=ip, config=config)
    vc = config.vision_config
    return dict(
        name=config.model_type,
        params=sum(p.numel() for p in model.parameters()),
        vision=sum(p.numel() for p in vision.parameters()),
        lora_per_rank=lora_per_rank,
        layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=len(layers),
        root=sum(p.numel() for p in model.parameters())
        - sum(  # outside FSDP2's units (infra.fsdp): the root's
            p.numel()
            for m in model.modules()
            if type(m).__name__ in set(model._no_split_modules or ())
            for p in m.parameters()
        ),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        kv_token=attention * 2 * text.num_key_value_heads * head_dim,
        linear_state=(len(kinds) - attention) * linear_state(text),
        one_row=family is vlm.Qwen35,
        vision_layers=getattr(vc, "depth", None) or getattr(vc, "num_hidden_layers", 0),
        vision_hidden=getattr(vc, "hidden_size", 0),
        vision_intermediate=getattr(vc, "intermediate_size", 0),
        patches=lambda w, h: (
            ip.get_number_of_image_patches(h, w)
            if hasattr(ip, "merge_size")
            else (ip.size["height"] // vc.patch_size) ** 2
        ),
        image_tokens=lambda w, h: family.image_tokens(shim, w, h),
    )


def linear_state(text):
    """Elements of one row's recurrent and convolution state in one Gated DeltaNet layer
    (Qwen3.5)."""
    k, v = getattr(text, "linear_key_head_dim", 0), getattr(text, "linear_value_head_dim", 0)
    hk, hv = getattr(text, "linear_num_key_heads", 0), getattr(text, "linear_num_value_heads", 0)
    return hv * k * v + (2 * hk * k + hv * v) * getattr(text, "linear_conv_kernel_dim", 0)


def parts(
    args, path, world, device="cuda", arch=None, whole_reference=None, text_tokens=TEXT_TOKENS
):
    """{"rollout": {part: bytes}, "training": {part: bytes}, "shape": {...}} per process for `args`
    on `world` processes. device "cuda": bf16 autocast over fp32 weights, a bf16 reference and KV
    cache (vlm.precision); "cpu": fp32 throughout, as the CPU runs that benchmarks/memory_plan.py
    measures."""
    a = arch or architecture(path)
    gpu, N = device == "cuda", a["params"]
    half = 2 if gpu else 4  # bytes of an activation element, and of the reference's and the cache's
    shard = world if args.fsdp else 1
    lora = (
        args.lora_r * a["lora_per_rank"](args.lora_targets, args.freeze_vision)
        if args.lora_r
        else 0
    )
    trained = lora or N - (a["vision"] if args.freeze_vision else 0)
    W, H, *_ = (int(x) for x in args.image_size.lower().split("x"))
    P = a["image_tokens"](W, H) + text_tokens
    if args.max_prompt_length > 0:
        P = min(P, args.max_prompt_length)
    B, G, L, mb = (
        args.prompts_per_step // world,
        args.num_generations,
        args.max_completion_length,
        args.micro_batch_size,
    )
    rows = min(args.rollout_batch_size or B * G, B * G)
    D, V = a["hidden"], a["vocab"]

    if lora:  # the frozen base needs no fp32 master copy: bf16 on a GPU; the adapters train in fp32
        resident = {
            "bf16 weights (frozen)" if gpu else "fp32 weights (frozen)": half * N,
            "fp32 LoRA adapters": 4 * lora,
        }
    else:
        resident = {"fp32 weights": 4 * N / shard}
    if args.beta > 0 and not lora:  # LoRA's reference is the same model with its adapters off
        whole = not args.fsdp or (
            reference_whole(args, path, world, a) if whole_reference is None else whole_reference
        )
        resident["reference (bf16)" if gpu else "reference (fp32)"] = (
            half * N / (1 if whole else world)
        )
    moments = (
        (2 + 8 / 256) * trained if args.optim == "adamw8bit" else 8 * trained
    )  # 8-bit: a scale per 256
    resident["AdamW moments (8-bit)" if args.optim == "adamw8bit" else "AdamW moments (fp32)"] = (
        moments / shard
    )
    grads = {"fp32 gradients": 4 * trained / shard}

    # rollout: `rows` completions decode at once from one prefill of their rows / G prompts
    rollout = dict(resident)
    if world > 1 and not args.fsdp:  # DDP's gradients are views of its buckets: zeroed, never freed
        rollout.update(grads)
    if (
        args.fsdp
    ):  # the weights are gathered once for the whole rollout, in the policy's compute dtype
        rollout["gathered weights"] = half * N
    prompts = math.ceil(rows / G)
    rollout["KV cache"] = half * rows * (a["kv_token"] * (P + L)) + 4 * rows * a["linear_state"]
    rollout["prefill"] = prompts * P * (half * a["kv_token"] + 4 * (4 * D + 3 * a["intermediate"]))
    rollout["sampling logits"] = (
        rows * V * (4 * 4 + 8 * 2)
    )  # fp32 logits, /T, log-softmax, p log p; fp64 cdf

    # training: one micro-batch, packed (each prompt once, its completions after it; Qwen3.5: one
    # per row)
    training = {**resident, **grads}
    n_prompts = mb if a["one_row"] else math.ceil(mb / G)
    tokens = mb * (P + L) if a["one_row"] else n_prompts * P + mb * L
    per_layer = (
        tokens * (9 * D + 4 * a["intermediate"]) * half
    )  # norms, q, k, v, attention, o, MLP: one layer's
    if (
        args.gradient_checkpointing
    ):  # the residual stream at each layer's input (fp32), and one layer recomputed
        training["activations"] = a["layers"] * tokens * D * 4 + per_layer
    else:
        training["activations"] = a["layers"] * per_layer
    S = tokens / n_prompts
    training["attention mask"] = (
        n_prompts * S * S * 5
    )  # the block mask (bool) and SDPA's additive float copy
    patches = n_prompts * a["patches"](W, H)
    training["vision tower"] = (
        patches * a["vision_hidden"] * 4 * (a["vision_layers"] + 2)
        + 2 * patches * a["vision_intermediate"] * half
    )
    chunk = min(args.logp_chunk, mb * L)
    # measured: 3 fp32 [chunk, vocab] arrays at the peak of its backward (log-softmax, its gradient,
    # the logits'), and on a GPU the bf16 logits before .float()
    training["log-prob chunk"] = chunk * V * (14 if gpu else 12)
    if (
        args.fsdp
    ):  # the root's weights (kept from forward to backward), one layer and the next one prefetched
        training["gathered layers"] = half * (a["root"] + 2 * a["layer"])
    # PAPO and VPPO: pi_old's log-probs on the masked image, held through the update (VPPO: also
    # pi_old's own); their no-gradient forwards run before it, below the training peak
    kept = bool(getattr(args, "papo_gamma", 0)) + 2 * bool(getattr(args, "vppo_share", 0))
    if kept:
        training["PAPO/VPPO masked log-probs"] = 4 * B * G * L * min(kept, 2)
    shape = dict(P=P, L=L, rows=rows, tokens=tokens, params=N, trained=trained)
    return {"rollout": rollout, "training": training, "shape": shape}


def reference_whole(args, path, world, arch=None):
    """Under --fsdp: whether the peak with a whole (unsharded) bf16 reference on each GPU fits in
    --gpu-memory."""
    p = parts(args, path, world, "cuda", arch or architecture(path), whole_reference=True)
    return peak(p) / GiB <= args.gpu_memory


def peak(p):
    """The larger of the two phases' totals, in bytes."""
    return max(sum(p["rollout"].values()), sum(p["training"].values()))


def count(n):
    """3.75B, 161.5M, 58.4K: a parameter count as people write it."""
    return next(
        f"{n / d:.3g}{unit}"
        for d, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
        if n >= d or d == 1
    )


def show(args, path):
    """Print the plan and its verdict; the last line reads `peak per GPU: N GiB (fits in M GiB)` or
    `(does not fit in M GiB)`. Returns 0."""
    import os

    world = args.processes or int(os.environ.get("WORLD_SIZE", 1))
    a = architecture(path)
    p = parts(args, path, world, "cuda", a)
    s = p["shape"]
    engine = "FSDP2" if args.fsdp else "DDP" if world > 1 else "one process"
    print(
        f"memory plan: {path} ({a['name']}, {count(a['params'])} parameters, {count(s['trained'])} "
        "trained"
        f"{f', LoRA r={args.lora_r}' if args.lora_r else ''}), {world} GPU(s), {engine}, bf16 "
        "autocast "
        f"over fp32 weights, {args.optim}"
    )
    print(
        f"  per GPU: B={args.prompts_per_step // world} prompts x G={args.num_generations}, prompt "
        f"{s['P']} tokens "
        f"({args.image_size} image + {TEXT_TOKENS} text), completions {s['L']} tokens, {s['rows']} "
        "decoding at once "
        f"(--rollout-batch-size), micro-batch {args.micro_batch_size} ({s['tokens']} packed tokens)"
    )
    names = list(dict.fromkeys([*p["rollout"], *p["training"]]))
    print(f"  {'part':28s} {'rollout':>9s} {'training':>9s}   GiB")
    for k in names:
        cells = [
            f"{p[ph][k] / GiB:9.2f}" if k in p[ph] else f"{'-':>9s}"
            for ph in ("rollout", "training")
        ]
        print(f"  {k:28s} {cells[0]} {cells[1]}")
    totals = [sum(p[ph].values()) / GiB for ph in ("rollout", "training")]
    print(f"  {'total':28s} {totals[0]:9.2f} {totals[1]:9.2f}")
    print(
        "  not counted: the CUDA context (about 0.5 GiB), fragmentation, kernel workspaces, NCCL "
        "buffers"
    )
    verdict = "fits in" if max(totals) <= args.gpu_memory else "does not fit in"
    print(f"peak per GPU: {max(totals):.1f} GiB ({verdict} {args.gpu_memory:g} GiB)")
    return 0
