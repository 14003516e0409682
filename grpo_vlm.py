"""GRPO for vision-language models, in one file, in the order the algorithm runs.

    python grpo_vlm.py --task rec                      # tiny offline model + synthetic world
    python grpo_vlm.py --task rec --model PATH --train-data rows.jsonl --image-root DIR
    torchrun --nproc_per_node 2 grpo_vlm.py ...        # DDP; --resume DIR continues a run

Equations (../shared/REFERENCE.md):
  (0) o_i ~ pi_old(. | q), i = 1..G, at temperature T           -> sample_group (keyed, shared prefill)
  (1) r_i = sum_k w_k R_k(o_i, gt)                              -> compute_rewards
  (2) A_i = (r_i - mean(r_group)) / (std(r_group) + eps)        -> group_advantages
  (3) rho_t = exp(logp_theta - logp_old)                        -> grpo_loss
  (4) L_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A) -> grpo_loss
  (5) KL_t = exp(ref - logp) - (ref - logp) - 1  (k3)           -> grpo_loss
  (6) aggregation: per-sequence / token-mean / Dr. GRPO         -> token_weights
"""

import ast
import contextlib
import copy
import glob
import inspect
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicLayer

import data
import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "checkpoints", "tiny-qwen2.5-vl-rec")


def tiny_model(task):
    """The shipped tiny base of a task (make_tiny_model.py --task TASK rebuilds it)."""
    return os.path.join(HERE, "checkpoints", f"tiny-qwen2.5-vl-{task}")


@dataclass
class Args:
    task: str = "rec"
    """rec (referring expression -> box), cls (image -> label), count (image -> number), det (image -> boxes)"""
    preset: str = ""
    """vlm-r1: VLM-R1's recipe for real models (set first; explicit flags override); empty: tiny-model defaults"""
    model: str = ""
    """HF hub id or local path of a Qwen2-VL / Qwen2.5-VL model; empty: the task's shipped tiny model"""
    train_data: str = ""
    """VLM-R1 JSONL rows; empty: the synthetic shapes world"""
    image_root: str = ""
    """folder that the `image` paths of --train-data are relative to"""
    output_dir: str = ""
    """where metrics.jsonl, checkpoints and the final model go (empty: runs/TASK)"""
    steps: int = 1000
    """optimizer steps (each on one rollout batch when mu=1)"""
    seed: int = 0
    """seed of prompt order, sampling and init"""
    prompts_per_step: int = 4
    """B: prompts per step; a step samples B * G completions"""
    num_generations: int = 8
    """G: completions sampled per prompt"""
    max_completion_length: int = 48
    """maximum new tokens per completion"""
    min_completion_length: int = 0
    """no EOS before this many new tokens (benchmarks force equal work with it; 0: off)"""
    temperature: float = 1.0
    """T: sampling temperature, also applied to every log-prob"""
    beta: float = 0.04
    """weight of the k3 KL to the frozen reference model (0: no reference model is loaded)"""
    eps_low: float = 0.2
    """lower clip range of the ratio"""
    eps_high: float = 0.2
    """upper clip range of the ratio (0.28 is DAPO's clip-higher)"""
    mu: int = 1
    """optimisation passes per rollout batch"""
    loss_agg: str = "grpo"
    """token aggregation: grpo (per-sequence mean), token (token mean), drgrpo (sum / (N * max_len))"""
    scale_rewards: str = "group"
    """advantage std scaling: group, batch or none (Dr. GRPO)"""
    lr: float = 2e-4
    """AdamW learning rate"""
    lr_schedule: str = "constant"
    """constant, or linear decay to 0 at --steps (both after --warmup-steps)"""
    warmup_steps: int = 0
    """steps of linear learning-rate warm-up from 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    micro_batch_size: int = 16
    """completions per forward/backward; gradients accumulate to the full B * G batch"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory"""
    reward_weights: str = ""
    """comma list name=w overriding the task's reward weights, e.g. iou=1,format=0.5"""
    coord_space: str = "auto"
    """box coordinates the model emits: auto, abs_resized (Qwen2.5-VL), norm1000 (Qwen2-VL), abs_original"""
    logp_chunk: int = 1024
    """tokens per chunk when computing log-probs (the [tokens, vocab] logits never exist at once)"""
    sample_every: int = 100
    """print a few sample completions every N steps"""
    train_size: int = 0
    """training rows: synthetic images to make (0: 2000) or the first N of --train-data (0: all); cls balances classes"""
    eval_every: int = 250
    """greedy eval on the synthetic test and ood splits every N steps and at the end (0 or --train-data: never)"""
    eval_n: int = 128
    """held-out images per split for --eval-every"""
    skip_bad_rows: bool = False
    """skip and count rows whose JSON, text, box or image is unusable, instead of stopping with an error"""
    save_every: int = 250
    """write an atomic checkpoint (model, optimizer, schedule, RNG, data position) every N steps (0: never)"""
    resume: str = ""
    """continue from this checkpoint, or from the latest checkpoint in this output folder"""
    freeze_vision: bool = False
    """freeze the whole vision tower, merger included (VLM-R1's --freeze_vision_modules)"""
    max_bad_steps: int = 3
    """stop, with a checkpoint, after this many steps in a row with a non-finite loss or gradient"""
    sft_steps: int = 0
    """Vision-R1's cold start: supervised steps on chain-of-thought targets before GRPO (0: none)"""
    sft_lr: float = 2e-4
    """learning rate of the cold start"""
    length_schedule: str = ""
    """Vision-R1's PTST: completion-length cap by stage, "step:cap,..." e.g. 0:16,300:32,600:48 (empty: fixed)"""
    iou_threshold_schedule: str = ""
    """progressive rule refinement: IoU counts only at or above a threshold by stage, e.g. 0:0,500:0.5 (rec, det)"""


# VLM-R1's REC recipe for a real Qwen2.5-VL (full fine-tune): the defaults above are tuned for the tiny
# offline model on a CPU instead, where lr 1e-6 would move nothing in ten minutes.
# Task defaults for the tiny offline models (a preset or explicit flags override them): a detection answer lists
# up to three boxes of ~21 tokens each. On count, lr 2e-4 made the greedy accuracy swing by up to 7 points from one
# eval to the next and end below the base; 5e-5 decaying to 0 rises steadily, and also gains more on cls (README).
TASK_DEFAULTS = {"cls": dict(steps=800, lr=5e-5, lr_schedule="linear"),
                 "count": dict(steps=800, lr=5e-5, lr_schedule="linear"),
                 "det": dict(steps=300, max_completion_length=128)}
PRESETS = {"vlm-r1": dict(lr=1e-6, beta=0.04, num_generations=8, temperature=1.0, eps_low=0.2, eps_high=0.2, mu=1,
                          max_completion_length=256, prompts_per_step=16, micro_batch_size=8, loss_agg="grpo",
                          scale_rewards="group", gradient_checkpointing=True)}


def parse_args(argv=None):
    args, argv = Args(), list(sys.argv[1:] if argv is None else argv)
    if "--task" in argv[:-1]:
        for k, v in TASK_DEFAULTS.get(argv[argv.index("--task") + 1], {}).items():
            setattr(args, k, v)
    if "--preset" in argv[:-1]:
        name = argv[argv.index("--preset") + 1]
        if name not in PRESETS:
            sys.exit(f"error: unknown --preset {name!r}; known: {sorted(PRESETS)}")
        for k, v in PRESETS[name].items():
            setattr(args, k, v)
    types = {f.name: f.type for f in fields(Args)}
    if "-h" in argv or "--help" in argv:  # each field's docstring, read from this file's source
        body = ast.parse(inspect.getsource(Args)).body[0].body
        docs = {a.target.id: b.value.value for a, b in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)}
        print("usage: python grpo_vlm.py [--flag value ...]   (booleans take true/false)\n")
        for f in fields(Args):
            print(f"  --{f.name.replace('_', '-'):24s} {f.type.__name__:5s} {getattr(args, f.name)!r:12s} {docs[f.name]}")
        sys.exit(0)
    while argv:
        key = argv.pop(0)
        name = key.lstrip("-").replace("-", "_")
        if not key.startswith("--") or name not in types:
            sys.exit(f"error: unknown argument {key} (see --help)")
        value = argv.pop(0) if argv else sys.exit(f"error: {key} needs a value")
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if types[name] is bool else types[name]
        setattr(args, name, cast(value))
    args.output_dir = args.output_dir or os.path.join("runs", args.task)
    for name, default in (("length_schedule", 0), ("iou_threshold_schedule", 0.0)):
        try:
            stage_value(getattr(args, name), 0, default)
        except ValueError:
            sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)!r}: expected step:value,step:value,...")
    return args


def stage_value(spec, step, default):
    """The value of a stage schedule "step:value,step:value,..." at `step`: that of the last stage begun by then."""
    value = default
    for start, v in sorted((int(a), type(default)(b)) for a, b in (item.split(":") for item in spec.split(",") if item)):
        if step >= start:
            value = v
    return value


# ---------------------------------------------------------------------------------------------
# Model and processor. We never use AutoProcessor: it can silently return only the tokenizer, and
# Qwen2.5-VL's processor needs torchvision for videos. Tokenizer + image-only processor suffice.
# ---------------------------------------------------------------------------------------------
def load_policy(path, device="cpu"):
    from transformers import (AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig,
                              Qwen2VLImageProcessorPil)
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(path)
    # fp32 weights everywhere; on a GPU the forwards run in bf16 autocast (see precision()).
    # SDPA, also where flash-attn is installed: the training forward shares each prompt between its G
    # completions with a block attention mask (pack), which flash-attn's kernels cannot take.
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device)
    # Rollouts must come from exactly the policy the loss scores. A hub generation_config may set a
    # repetition penalty, top-k or top-p, and generate() would apply it to every rollout; a config with
    # only the special tokens leaves just what sample_group asks for.
    gc = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id,
                                               pad_token_id=gc.pad_token_id)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.chat_template is None:  # real Qwen checkpoints keep it beside the processor
        with open(cached_file(path, "chat_template.json")) as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return model, tokenizer, image_processor, config


def precision(model):
    """bf16 autocast over fp32 weights on a GPU, plain fp32 on the CPU. AdamW moves a weight by about lr:
    at lr 1e-6 that is far below the spacing of bf16 numbers (1/256 of the weight), so bf16 weights
    would round most updates away; fp32 master weights keep them (as DeepSpeed's bf16 mode does)."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()


def default_coord_space(config):
    return {"qwen2_vl": "norm1000", "qwen2_5_vl": "abs_resized"}.get(config.model_type, "abs_original")


def vision_token_ids(tokenizer):
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    return [i for i in tokenizer.convert_tokens_to_ids(names) if i is not None and i != tokenizer.unk_token_id]


def encode_prompts(rows, tokenizer, image_processor, device="cpu"):
    """Chat template + image -> left-padded prompt ids with <|image_pad|> expanded to the image's tokens."""
    images = [data.load_image(r["image_path"]) for r in rows]
    vis = image_processor(images=images, return_tensors="pt")
    grid = vis["image_grid_thw"]
    merge = image_processor.merge_size
    texts = []
    for r, g in zip(rows, grid):
        text = tokenizer.apply_chat_template(data.build_messages(r["problem"]), tokenize=False,
                                             add_generation_prompt=True)
        texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * int(g.prod() // merge**2), 1))
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    # (input w, input h, original w, original h): the resized input is Qwen2.5-VL's coordinate space
    patch = image_processor.patch_size
    sizes = [(int(g[2]) * patch, int(g[1]) * patch, im.width, im.height) for g, im in zip(grid, images)]
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "pixel_values": vis["pixel_values"].to(device), "image_grid_thw": grid.to(device)}, sizes


# ---------------------------------------------------------------------------------------------
# Group sampling: G completions per prompt, decoded together from one encoding of each prompt.
# The prompt, image included, runs through the model once (prefill); its KV cache is then repeated
# G times, so neither the image nor the prompt is ever encoded G times.
# A token is drawn by inverse CDF: the first token whose cumulative probability under softmax(logits / T)
# exceeds u, an exact sample. u is a hash of (seed, step, completion index, position), so a completion
# depends only on the model and its index: one process or two, before or after a resume, the same
# completions are drawn. (torch's sampler draws from one random stream shared by the whole batch.)
# ---------------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF


def hash32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32), elementwise on an int64 tensor."""
    x = x & M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    return x ^ (x >> 16)


def sample_keys(seed, step, indices):
    """One key per completion: its global index in the step's batch, hashed with the seed and step."""
    base = hash32(hash32(torch.tensor(seed)) + step)
    return hash32(base + torch.as_tensor(indices))


def draw(logits, keys, position):
    """Sample one token per row of softmax(logits) by inverse CDF, with u in (0, 1) hashed from (key, position)."""
    u = (hash32(hash32(keys + hash32(torch.tensor(position, device=keys.device)))).double() + 0.5) / 2**32
    cdf = logits.double().softmax(-1).cumsum(-1)
    token = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp(max=logits.shape[-1] - 1)


class RoomyLayer(DynamicLayer):
    """One layer's KV cache for decoding G samples per prompt: each prompt's keys and values repeated G times
    (prompt-major), with room for `extra` more positions. update() writes new keys and values in place and returns
    views; DynamicLayer would torch.cat the whole cache at every decode step, copying O(length^2) bytes over a
    completion (on the tiny CPU model, 48 tokens, writing in place saves ~10% of the rollout; more when longer)."""

    def __init__(self, layer, G, extra):
        if layer.is_sliding:  # Qwen2.5-VL configs have use_sliding_window false; this layer keeps every position
            raise NotImplementedError("sliding-window attention is not supported by the rollout's KV cache")
        super().__init__()
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        (B, H, n, D), self.room = layer.keys.shape, []
        for x in (layer.keys, layer.values):
            r = x.new_empty(B * G, H, n + extra, D)
            r.view(B, G, H, n + extra, D)[..., :n, :] = x[:, None]  # one copy, no repeat_interleave
            self.room.append(r)
        self.keys, self.values = (r[..., :n, :] for r in self.room)

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        for r, new in zip(self.room, (key_states, value_states)):
            r[..., n:n + m, :] = new
        self.keys, self.values = (r[..., :n + m, :] for r in self.room)
        return self.keys, self.values


@torch.no_grad()
def sample_group(model, prompt, G, max_new_tokens, temperature, eos_id, pad_id, suppress, keys=None,
                 min_new_tokens=0):
    """(completions [B*G, max_new_tokens], their log-probs / T): G samples per prompt with `keys`, greedy if None.

    Rows are prompt-major (prompt 0's G samples first). Decoding stops when every completion has ended;
    after its EOS a completion is padded with pad_id. No EOS is drawn before `min_new_tokens`."""
    ids, mask, grid = prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"]
    types = mm_types(ids, model.config.image_token_id)
    # MRoPE positions of the prompt (3 axes for image tokens); text after it counts on from the maximum
    position_ids, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                 attention_mask=mask)
    next_pos = (position_ids.amax(dim=(0, 2)) + 1).repeat_interleave(G)
    was_training = model.training
    model.eval()
    with precision(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                    pixel_values=prompt["pixel_values"], image_grid_thw=grid, mm_token_type_ids=types, use_cache=True,
                    logits_to_keep=1)
    cache = out.past_key_values
    cache.layers = [RoomyLayer(layer, G, max_new_tokens) for layer in cache.layers]  # the shared prefill, G times
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)
    P = mask.shape[1]
    mask = torch.nn.functional.pad(mask.repeat_interleave(G, 0), (0, max_new_tokens), value=1)  # [:, :P+t+1] at t
    keys = keys.to(logits.device) if keys is not None else None
    done = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        scaled = logits / temperature
        logp_all = scaled.log_softmax(-1)  # the policy's log-probs, as the training forward computes them
        scaled[:, suppress] = -float("inf")  # a sampled <|image_pad|> would break the next forward
        if t < min_new_tokens:
            scaled[:, eos_id] = -float("inf")
        token = draw(scaled, keys, t) if keys is not None else scaled.argmax(-1)
        logps.append(logp_all.gather(1, token[:, None]).squeeze(1))
        tokens.append(torch.where(done, pad_id, token))
        done |= token == eos_id
        if t == max_new_tokens - 1 or done.all():
            break
        pos = (next_pos + t).view(1, -1, 1).expand(3, -1, -1)
        with precision(model):
            logits = model(input_ids=tokens[-1][:, None], attention_mask=mask[:, :P + t + 1], position_ids=pos,
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
    model.train(was_training)
    pad = max_new_tokens - len(tokens)  # pad to a fixed width
    completion = torch.nn.functional.pad(torch.stack(tokens, 1), (0, pad), value=pad_id)
    return completion, torch.nn.functional.pad(torch.stack(logps, 1), (0, pad))


def mm_types(input_ids, image_token_id):
    """Modality of each token (0 text, 1 image). Without it MRoPE silently falls back to 1-D positions."""
    return (input_ids == image_token_id).int()


def completion_mask(completion_ids, eos_id):
    """Mask from lengths: tokens up to and including the first EOS (pad may equal EOS)."""
    is_eos = completion_ids == eos_id
    L = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], L, dtype=torch.long))
    lengths = (first_eos + 1).clamp(max=L)
    return (torch.arange(L, device=completion_ids.device)[None] < lengths[:, None]).float()


# ---------------------------------------------------------------------------------------------
# (1) Rewards: r_i = sum_k w_k R_k(o_i, gt); each component is also returned for logging.
# ---------------------------------------------------------------------------------------------
def compute_rewards(texts, gts, weights):
    components = {k: torch.tensor([rewards.REWARDS[k](t, gt) for t, gt in zip(texts, gts)]) for k in weights}
    total = sum(w * components[k] for k, w in weights.items())
    return total, components


# ---------------------------------------------------------------------------------------------
# (2) Group-normalized advantages. ddof=1 (unbiased std) and eps=1e-4, as TRL.
# ---------------------------------------------------------------------------------------------
def group_advantages(r, G, scale="group", eps=1e-4):
    rg = r.view(-1, G)
    centered = rg - rg.mean(1, keepdim=True)
    if scale == "group":
        centered = centered / (rg.std(1, keepdim=True, unbiased=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std(unbiased=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale!r}")
    # a group whose rewards are all equal carries no signal: exactly 0, never NaN or rounding noise
    centered = centered * (rg.amax(1, keepdim=True) > rg.amin(1, keepdim=True))
    return centered.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Log-probs of completion tokens only, at temperature T, in chunks of tokens. Each chunk's
# [chunk, vocab] logits are recomputed in backward (checkpoint), so only log-probs are kept.
# ---------------------------------------------------------------------------------------------
def _chunk_logps(h, y, lm_head, T):
    logits = lm_head(h).float() / T
    return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def chunked_logps(hidden, lm_head, targets, T, chunk):
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = [checkpoint(_chunk_logps, hc, yc, lm_head, T, use_reentrant=False) if torch.is_grad_enabled()
           else _chunk_logps(hc, yc, lm_head, T) for hc, yc in zip(h.split(chunk), y.split(chunk))]
    return torch.cat(out).view_as(targets)


def pack(model, prompt_ids, prompt_mask, pixel_values, grid, copies, completion_ids, comp_mask):
    """Shared-prefix packing of completions (completion i continues prompt copies[i]) for one forward.

    Each prompt, image included, is computed once. Its row holds the prompt and then its completions one
    after another; a block mask lets each completion see the prompt and its own earlier tokens only, at the
    positions it would have alone. With G completions per prompt this runs the prompt once instead of G
    times (with an image of 256 tokens, most of the tokens of a plain forward). The layout depends on the
    tokens only, so the policy, reference and old-policy forwards of a micro-batch share one."""
    n_p, P = prompt_ids.shape
    L = completion_ids.shape[1]
    slot = (copies[:, None] == copies[None]).tril(-1).sum(1)  # i is the slot-th completion of its prompt
    S = P + (int(slot.max()) + 1) * L
    col = P + slot[:, None] * L + torch.arange(L, device=copies.device)  # where completion i's tokens go
    ids = torch.zeros(n_p, S, dtype=prompt_ids.dtype, device=prompt_ids.device)
    ids[:, :P] = prompt_ids
    ids[copies[:, None], col] = completion_ids
    valid = torch.zeros(n_p, S, dtype=torch.bool, device=ids.device)
    valid[:, :P] = prompt_mask.bool()
    valid[copies[:, None], col] = comp_mask.bool()
    block = torch.full((n_p, S), -1, device=ids.device)  # -1: the prompt
    block[copies[:, None], col] = slot[:, None]
    causal = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril()
    seen = causal & valid[:, None, :] & ((block[:, None, :] == -1) | (block[:, None, :] == block[:, :, None]))
    seen |= torch.eye(S, dtype=torch.bool, device=ids.device)  # no query may see nothing (NaN in softmax)
    # positions: MRoPE for the prompt; each completion counts on from the prompt's maximum, as when sampled
    types = mm_types(prompt_ids, model.config.image_token_id)
    prompt_pos, _ = model.model.get_rope_index(prompt_ids, mm_token_type_ids=types, image_grid_thw=grid,
                                               attention_mask=prompt_mask)
    pos = torch.zeros(3, n_p, S, dtype=prompt_pos.dtype, device=ids.device)
    pos[:, :, :P] = prompt_pos
    pos[:, copies[:, None], col] = (prompt_pos.amax(dim=(0, 2))[copies, None] + 1 + torch.arange(L, device=ids.device))
    image = torch.zeros_like(valid)
    image[:, :P] = types.bool()
    # token t of completion i is predicted at its position t-1; token 0 at the prompt's last position
    pred = torch.cat([torch.full_like(col[:, :1], P - 1), col[:, :-1]], 1)
    return {"ids": ids, "mask": seen[:, None], "pos": pos, "image": image, "pixel_values": pixel_values,
            "grid": grid, "rows": copies[:, None], "pred": pred, "targets": completion_ids}


def packed_logps(model, p, T, chunk):
    """log pi(o_t | q, o_<t) / T for every completion token of a pack(); each image goes through the vision
    tower once and its features are shared by all completions of its prompt."""
    with precision(model):
        feats = model.model.get_image_features(p["pixel_values"], p["grid"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats  # one tensor per image
        embeds = model.get_input_embeddings()(p["ids"])
        embeds = embeds.masked_scatter(p["image"][..., None], torch.cat(list(feats)).to(embeds.dtype))
        hidden = model.model(inputs_embeds=embeds, attention_mask=p["mask"], position_ids=p["pos"]).last_hidden_state
        return chunked_logps(hidden[p["rows"], p["pred"]], model.lm_head, p["targets"], T, chunk)


def completion_logps(model, prompt_ids, prompt_mask, pixel_values, grid, copies, completion_ids, comp_mask, T, chunk):
    """log pi(o_t | q, o_<t) / T for every completion token; completion i continues prompt copies[i]."""
    return packed_logps(model, pack(model, prompt_ids, prompt_mask, pixel_values, grid, copies, completion_ids,
                                    comp_mask), T, chunk)


# ---------------------------------------------------------------------------------------------
# (6) Aggregation as per-token weights over the *full* batch, so that k micro-batches of
# sum(loss_t * w_t) add up to exactly the full-batch loss (gradient accumulation is exact).
# ---------------------------------------------------------------------------------------------
def token_weights(mask, mode):
    N, L = mask.shape
    if mode == "grpo":  # mean over each completion's tokens, then mean over completions
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / N
    if mode == "token":  # sum over all tokens / tokens in the batch
        return mask / mask.sum().clamp(min=1)
    if mode == "drgrpo":  # sum over all tokens / (num completions * max_completion_length)
        return mask / (N * L)
    raise ValueError(f"loss_agg must be grpo, token or drgrpo, not {mode!r}")


# ---------------------------------------------------------------------------------------------
# (3)-(5) Clipped surrogate with k3 KL, per token.
# ---------------------------------------------------------------------------------------------
def grpo_loss(logps, old_logps, ref_logps, advantages, weights, eps_low, eps_high, beta):
    ratio = torch.exp(logps - old_logps)  # (3); exactly 1 when old_logps = logps.detach()
    A = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)  # (4)
    kl = torch.zeros_like(logps)
    if beta > 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # (5) k3 estimator, >= 0
        per_token = per_token + beta * kl
    loss = (per_token * weights).sum()
    mask = (weights > 0).float()
    clip_frac = ((((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))).float() * mask).sum()
    return loss, {"kl_sum": (kl.detach() * mask).sum(), "clip_sum": clip_frac}  # tensors: no host sync here


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def load_rows(args):
    """(rows, bad): the training rows, and one line per row skipped by --skip-bad-rows."""
    if not args.train_data:
        root = os.path.join(HERE, "data", "synthetic")
        path = data.make_synthetic(root, "train", args.train_size or 2000, args.seed, args.task)
        return data.load_jsonl(path, root, args.task, args.skip_bad_rows)
    limit = args.train_size if args.train_size and args.task != "cls" else None
    rows, bad = data.load_jsonl(args.train_data, args.image_root, args.task, args.skip_bad_rows, limit)
    return (data.class_balanced(rows, args.train_size) if args.train_size and args.task == "cls" else rows), bad


def ground_truths(rows, sizes, coord_space, iou_threshold=0.0):
    return [{"solution": r["solution"], "width": W, "height": H, "input_width": w, "input_height": h,
             "coord_space": coord_space, "iou_threshold": iou_threshold} for r, (w, h, W, H) in zip(rows, sizes)]


# ---------------------------------------------------------------------------------------------
# Vision-R1's cold start: supervised steps on chain-of-thought targets before RL. A row's target is its
# `response` (<think>..</think><answer>..</answer>) when it has one, else the synthetic world's target
# (data.sft_target). sft.py runs the same steps alone: the SFT baseline, and the tiny bases' warm start.
# ---------------------------------------------------------------------------------------------
def sft_loss(model, rows, tokenizer, image_processor, coord_space, task, chunk, device="cpu"):
    """Mean negative log-likelihood of the target tokens of `rows`, EOS included."""
    prompt, sizes = encode_prompts(rows, tokenizer, image_processor, device)
    gts = ground_truths(rows, sizes, coord_space)
    texts = [(r.get("response") or data.sft_target(task, r, gt)) + tokenizer.eos_token for r, gt in zip(rows, gts)]
    ids = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                    add_special_tokens=False)["input_ids"].to(device)
    mask = completion_mask(ids, tokenizer.eos_token_id)
    logps = completion_logps(model, prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"],
                             prompt["image_grid_thw"], torch.arange(len(rows), device=device), ids, mask, 1.0, chunk)
    return -(logps * mask).sum() / mask.sum()


def sft_steps(model, rows, tokenizer, image_processor, coord_space, args, steps, lr, device="cpu"):
    """Yield (step, loss) over `steps` supervised steps of --prompts-per-step rows, drawn as GRPO draws its
    prompts (random.Random(seed)), so an SFT run with GRPO's seed and B sees GRPO's images in GRPO's order."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = sft_loss(model, rng.sample(rows, args.prompts_per_step), tokenizer, image_processor, coord_space,
                        args.task, args.logp_chunk, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step, loss.item()


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): PyTorch's DDP averages gradients; everything else is ours to get right.
# Each process samples whole groups, so advantages (2) never see a split group; rewards and masks
# are gathered so that advantages and the aggregation weights (6) are those of the global batch.
# ---------------------------------------------------------------------------------------------
def setup_distributed():
    """(rank, world size, device); a single process when not launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    import datetime

    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    # a rank that dies or hangs makes the others fail after this long instead of waiting forever
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def gather(x, world):
    """Concatenate a tensor over processes in rank order (each process holds equal-sized pieces)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_sum(x, world):
    if world > 1:
        torch.distributed.all_reduce(x)
    return x


class Policy(torch.nn.Module):
    """The training forward (completion log-probs) as one module, so DDP can wrap exactly what backward runs."""

    def __init__(self, model, T, chunk):
        super().__init__()
        self.model, self.T, self.chunk = model, T, chunk

    def forward(self, packed):
        return packed_logps(self.model, packed, self.T, self.chunk)


# ---------------------------------------------------------------------------------------------
# Checkpoints: model (save_pretrained), optimizer, step, prompt sampler state and RNG states, written
# to a temporary folder and renamed, so a crash mid-write never leaves a half checkpoint behind.
# The learning rate is a function of the step (lr_at), so the step is the schedule's whole state.
# ---------------------------------------------------------------------------------------------
RUN_DEFINING = ("model", "task", "train_data", "seed", "prompts_per_step", "num_generations", "train_size",
                "freeze_vision", "sft_steps")


def save_state(args, step, model, tokenizer, image_processor, opt, rng, extra):
    final = os.path.join(args.output_dir, f"checkpoint-{step:06d}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tokenizer, image_processor, tmp, quiet=True)
    torch.save({"step": step, "args": vars(args), "optimizer": opt.state_dict(), "prompt_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), **extra}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(glob.glob(os.path.join(args.output_dir, "checkpoint-*")))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    print(f"saved checkpoint {final}", flush=True)
    return final


def find_checkpoint(path):
    """`path` itself if it is a checkpoint, else the latest checkpoint-* inside it."""
    if os.path.exists(os.path.join(path, "trainer_state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.pt")))
    if not found:
        sys.exit(f"error: --resume {path}: no checkpoint there (expected trainer_state.pt or checkpoint-*/)")
    return os.path.dirname(found[-1])


def lr_at(args, step):
    """Linear warm-up over --warmup-steps, then constant or linear decay to 0 at --steps."""
    warm = min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_schedule == "linear":
        return args.lr * warm * min(1.0, max(0.0, (args.steps - step + 1) / max(1, args.steps - args.warmup_steps)))
    return args.lr * warm


def train(args):
    import eval as evaluation  # held-out metrics and the plot; imported here because eval.py imports us
    rank, world, device = setup_distributed()
    main = rank == 0
    if args.prompts_per_step % world:
        sys.exit(f"error: --prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    if args.task not in rewards.TASK_REWARDS:
        sys.exit(f"error: --task {args.task!r} is not supported; choose from {sorted(rewards.TASK_REWARDS)}")
    weights = dict(rewards.TASK_REWARDS[args.task])
    for item in filter(None, args.reward_weights.split(",")):
        k, w = item.split("=")
        if k not in rewards.REWARDS:
            sys.exit(f"error: unknown reward {k!r}; known: {sorted(rewards.REWARDS)}")
        weights[k] = float(w)
    try:  # every row and image is checked before any model is loaded
        rows, bad_rows = load_rows(args)
    except data.BadInput as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)  # the prompt sampler: its state is the data position
    start, state = 0, None
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
        changed = [k for k in RUN_DEFINING if state["args"].get(k, getattr(Args, k)) != getattr(args, k)]
        if changed:
            sys.exit(f"error: --resume {ckpt} was made with different " +
                     ", ".join(f"--{k.replace('_', '-')} ({state['args'][k]!r} there, {getattr(args, k)!r} here)"
                               for k in changed))
        start = state["step"]
        rng.setstate(state["prompt_rng"])
        torch.set_rng_state(state["torch_rng"])
    base = args.model or tiny_model(args.task)
    model, tokenizer, image_processor, config = load_policy(ckpt if state else base, device)
    coord_space = default_coord_space(config) if args.coord_space == "auto" else args.coord_space
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    os.makedirs(args.output_dir, exist_ok=True)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    cold = os.path.join(args.output_dir, "cold-start")  # the cold-started model: GRPO's start and KL reference
    if args.sft_steps and not state:  # Vision-R1's cold start: SFT on chain-of-thought targets, then RL
        with open(metrics_path, "w") if main else contextlib.nullcontext() as log:
            for s, loss in sft_steps(model, rows, tokenizer, image_processor, coord_space, args, args.sft_steps,
                                     args.sft_lr, device):
                if main:
                    log.write(json.dumps({"step": 0, "sft_step": s, "sft_loss": loss}) + "\n")
                    if s % 50 == 0 or s in (1, args.sft_steps):
                        print(f"cold start step {s}/{args.sft_steps} loss={loss:.4f}", flush=True)
        if main:
            save_checkpoint(model, tokenizer, image_processor, cold)
    ref_model = None
    if args.beta > 0:  # the frozen reference is the starting model (after any cold start), also after a resume
        ref_model = (load_policy(cold if args.sft_steps else base, device)[0] if state
                     else copy.deepcopy(model)).eval().requires_grad_(False)
        if device.startswith("cuda"):
            ref_model.to(torch.bfloat16)  # never trained: bf16 weights suffice, at half the memory
    if args.gradient_checkpointing:  # renamed after transformers 5.17; the old name warns on newer versions
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = Policy(model, args.temperature, args.logp_chunk)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        policy = DDP(policy, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None,
                     broadcast_buffers=False)  # every process loaded the same weights; buffers are constants
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    if state:
        opt.load_state_dict(state["optimizer"])
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    suppress = vision_token_ids(tokenizer)
    B, G, T = args.prompts_per_step, args.num_generations, args.temperature
    b = B // world  # prompts per process
    kept = []
    if (state or args.sft_steps) and os.path.exists(metrics_path):  # drop rows written after the last checkpoint
        kept = [x for x in open(metrics_path) if x.strip() and json.loads(x).get("step", 0) <= start]
    log = open(metrics_path, "w") if main else None
    if log:
        log.writelines(kept)
    if main:
        print(f"GRPO {args.task}: {len(rows)} prompts, B={B} G={G} T={T} beta={args.beta} coords={coord_space} "
              f"weights={weights} device={device} processes={world}" + (f", resumed at step {start}" if state else ""),
              flush=True)
        if bad_rows:
            print(f"skipped {len(bad_rows)} bad rows (--skip-bad-rows):", *bad_rows[:10], sep="\n  ", flush=True)
            if not state:  # a resumed run keeps the row it logged at the start
                log.write(json.dumps({"step": 0, "bad_rows": len(bad_rows)}) + "\n")

    def held_out_eval(step):  # greedy, on the synthetic test (in-domain) and ood splits; the main process only
        if main:
            ev = evaluation.held_out(model, tokenizer, image_processor, coord_space, args.eval_n, args.task)
            log.write(json.dumps({"step": step, **ev}) + "\n")
            print(evaluation.eval_line(step, ev), flush=True)
        if world > 1:
            torch.distributed.barrier()

    def checkpoint_now(step):  # the main process writes; the others wait for it
        if main:
            save_state(args, step, model, tokenizer, image_processor, opt, rng, {"bad_steps": bad_steps})
        if world > 1:
            torch.distributed.barrier()
        return os.path.join(args.output_dir, f"checkpoint-{step:06d}")

    eval_every = 0 if args.train_data else args.eval_every  # the held-out splits are synthetic
    if eval_every and not state:
        held_out_eval(0)  # the starting point of the curves
    bad_steps = (state or {}).get("bad_steps", 0)
    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        batch = rng.sample(rows, B)  # the same on every process; each takes its own b prompts
        mine = batch[rank * b:(rank + 1) * b]
        try:
            prompt, sizes = encode_prompts(mine, tokenizer, image_processor, device)
        except data.BadInput as e:  # an image that passed the upfront check fails now (changed on disk?)
            sys.exit(f"error: {e} (step {step}; last checkpoint in {args.output_dir}; --resume after fixing it)")
        keys = sample_keys(args.seed, step, range(rank * b * G, (rank + 1) * b * G))
        # Vision-R1's staged length (PTST) and progressive rule refinement: both are functions of the step
        max_len = stage_value(args.length_schedule, step, args.max_completion_length)
        iou_threshold = stage_value(args.iou_threshold_schedule, step, 0.0)
        completion_ids, rollout_logps = sample_group(model, prompt, G, max_len, T, eos_id, pad_id, suppress, keys,
                                                     args.min_completion_length)
        mask = completion_mask(completion_ids, eos_id)
        texts = [tokenizer.decode(c[: int(m.sum())], skip_special_tokens=True) for c, m in zip(completion_ids, mask)]
        gts = [gt for gt in ground_truths(mine, sizes, coord_space, iou_threshold) for _ in range(G)]
        r, components = compute_rewards(texts, gts, weights)
        # (2) and (6) over the global batch, then this process's rows. DDP averages gradients over the
        # processes, so the weights are scaled by `world` to make the sum of all processes' losses.
        mine_rows = slice(rank * b * G, (rank + 1) * b * G)
        r_all, mask_all = gather(r.to(device), world), gather(mask, world)
        advantages = group_advantages(r_all, G, args.scale_rewards)[mine_rows]
        w = token_weights(mask_all, args.loss_agg)[mine_rows] * world
        N, grid = len(completion_ids), prompt["image_grid_thw"]
        mbs = [slice(i, min(i + args.micro_batch_size, N)) for i in range(0, N, args.micro_batch_size)]
        patches = grid.prod(-1)

        def inputs(s):  # micro-batch s of the completions, with each of its prompts (and images) once
            first, last = s.start // G, (s.stop - 1) // G + 1
            p0, p1 = int(patches[:first].sum()), int(patches[:last].sum())
            copies = torch.arange(s.start, s.stop, device=grid.device) // G - first
            return (prompt["input_ids"][first:last], prompt["attention_mask"][first:last],
                    prompt["pixel_values"][p0:p1], grid[first:last], copies, completion_ids[s], mask[s])

        with torch.no_grad():  # old and reference log-probs, stored at rollout time
            packed = [pack(model, *inputs(s)) for s in mbs]  # one layout per micro-batch, for every forward
            old = [packed_logps(model, p, T, args.logp_chunk) for p in packed] if args.mu > 1 else None
            ref = [packed_logps(ref_model, p, T, args.logp_chunk) for p in packed] if ref_model else None
        # loss, KL sum, clipped-token count, and |rollout - training log-prob| summed over this process's tokens
        totals = torch.zeros(4, device=device)
        skipped = 0
        for k in range(args.mu):
            pass_loss = torch.zeros((), device=device)
            for j, s in enumerate(mbs):
                # DDP syncs gradients in the last micro-batch's backward only (no_sync for the others)
                sync = world == 1 or j == len(mbs) - 1
                with policy.no_sync() if not sync else contextlib.nullcontext():
                    logps = policy(packed[j])
                    old_logps = old[j] if old is not None else logps.detach()
                    ref_logps = ref[j] if ref is not None else None
                    loss, st = grpo_loss(logps, old_logps, ref_logps, advantages[s], w[s], args.eps_low,
                                         args.eps_high, args.beta)
                    loss.backward()
                pass_loss += loss.detach() / world
                # the sampler (KV cache) and this forward (packed) should agree on pi_old: a numerical health check
                gap = ((logps.detach() - rollout_logps[s]).abs() * mask[s]).sum() if k == 0 else loss.new_zeros(())
                totals += torch.stack([loss.detach() / world, st["kl_sum"] / args.mu, st["clip_sum"] / args.mu, gap])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # synced by DDP
            finite = all_sum(torch.isfinite(pass_loss).float(), world).item() == world
            if finite and torch.isfinite(grad_norm):
                opt.step()
            else:  # a NaN/inf loss or gradient: skip this update rather than poison the weights
                skipped += 1
            opt.zero_grad(set_to_none=True)
        all_sum(totals, world)
        n_tok = mask_all.sum().item()
        m = {"step": step, "reward": r_all.mean().item(), "reward_std": r_all.std().item(),
             **{f"reward_{k}": gather(v.to(device), world).mean().item() for k, v in components.items()},
             "loss": totals[0].item() / args.mu, "kl": totals[1].item() / n_tok, "clip_frac": totals[2].item() / n_tok,
             "logp_gap": totals[3].item() / n_tok,
             "completion_len": n_tok / (B * G), "grad_norm": float(grad_norm), "lr": lr_at(args, step),
             **({"max_len": max_len} if args.length_schedule else {}),
             **({"iou_threshold": iou_threshold} if args.iou_threshold_schedule else {}),
             **evaluation.rollout_stats(args.task, texts, gts), "seconds": time.time() - t0}
        if skipped:
            m["skipped_updates"] = skipped
        bad_steps = bad_steps + 1 if skipped else 0
        if main:
            log.write(json.dumps(m) + "\n")
            log.flush()
            comp = " ".join(f"{k}={m['reward_' + k]:.3f}" for k in components)
            print(f"step {step}/{args.steps} reward={m['reward']:.3f} {comp} kl={m['kl']:.4f} "
                  f"clip={m['clip_frac']:.3f} len={m['completion_len']:.1f} {m['seconds']:.2f}s"
                  + (f"  SKIPPED: non-finite loss or gradient ({bad_steps} in a row)" if skipped else ""), flush=True)
            if args.sample_every and (step % args.sample_every == 0 or step == 1):
                for i in range(0, min(2 * G, len(texts)), G):
                    print(f"  [{mine[i // G]['problem'][-40:]}] gt={mine[i // G]['solution']} -> {texts[i]!r} "
                          f"r={r[i]:.2f}", flush=True)
        if eval_every and (step % eval_every == 0 or step == args.steps):
            held_out_eval(step)
        if bad_steps >= args.max_bad_steps:
            path = checkpoint_now(step)
            sys.exit(f"error: {bad_steps} steps in a row had a non-finite loss or gradient (lower --lr?); "
                     f"weights before them saved in {path}")
        interrupted = all_sum(torch.tensor(float("signal" in STOP), device=device), world).item() > 0
        if interrupted or (args.save_every and (step % args.save_every == 0 or step == args.steps)):
            path = checkpoint_now(step)
            if interrupted:
                if main:
                    print(f"interrupted at step {step}: resume with --resume {path}", flush=True)
                sys.exit(128 + STOP.get("signal", signal.SIGINT))
    if log:
        log.close()
    final = os.path.join(args.output_dir, "final")
    if main:
        if bad_rows:
            print(f"{len(bad_rows)} bad rows were skipped (see the top of this log and metrics.jsonl)", flush=True)
        evaluation.plot_metrics(metrics_path, os.path.join(args.output_dir, "curves.png"), args.task)
        save_checkpoint(model, tokenizer, image_processor, final)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def save_checkpoint(model, tokenizer, image_processor, out, quiet=False):
    """Model + tokenizer + image processor + chat template: what load_policy and eval.py read."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    with open(os.path.join(out, "chat_template.json"), "w") as f:
        json.dump({"chat_template": tokenizer.chat_template}, f)
    if not quiet:
        print(f"saved {out}", flush=True)


# Ctrl-C / SIGTERM (set when run as a script): the loop finishes its step, saves a checkpoint and exits
# with 128 + the signal number. A second Ctrl-C kills at once.
STOP = {}


def on_signal(signum, frame):
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL)


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    train(parse_args())
