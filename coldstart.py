"""Vision-R1's cold start (Huang et al., arXiv 2503.06749): supervised steps on chain-of-thought
targets before RL, on a row's `response` if it has one, else data.sft_target. grpo_vlm.py runs them
before GRPO with --sft-steps N; sft.py runs the same steps alone (the SFT baseline; the tiny bases'
warm start).
"""

import os
import random

import torch

import data
import tools
import vlm


def sft_loss(model, family, rows, coord_space, task, chunk, device="cpu"):
    """Mean negative log-likelihood of the target tokens of `rows`, EOS included."""
    prompt, sizes = family.encode(rows, device)
    if task == "zoom":  # tool traces: conversations with the crops in their tool turns
        return trace_loss(model, family, rows, (prompt, sizes), coord_space, chunk)
    tok = family.tokenizer
    texts = [
        (r.get("response") or data.sft_target(task, r, gt))
        + tok.convert_ids_to_tokens(family.eos_id)
        for r, gt in zip(rows, data.ground_truths(rows, sizes, coord_space))
    ]
    ids = tok(
        texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )["input_ids"]
    ids = ids.to(device)
    mask = vlm.completion_mask(ids, family.eos_id)
    copies = torch.arange(len(rows), device=device)  # one target per prompt
    logp = vlm.completion_logps(model, family, prompt, copies, ids, mask, 1.0, chunk)
    return -(logp * mask).sum() / mask.sum()


def trace_loss(model, family, rows, encoded, coord_space, chunk):
    """sft_loss on the zoom task's synthetic tool traces (data.zoom_turns): the assistant turns'
    tokens are the targets; the tool turns between them (a crop of the called box) are context."""
    env = tools.environment(family, rows, encoded, coord_space, max_calls=1)
    traces = [data.zoom_turns(r, gt, data.zoom_uses_tool(r)) for r, gt in zip(rows, env.truths)]
    o, _, _, turns = tools.scripted(env, traces)  # Conversations
    copies = torch.arange(len(rows), device=o.device)
    packed = tools.pack(family, model, encoded[0], copies, o, turns)
    logp = vlm.packed_logps(model, family, packed, 1.0, chunk)
    return -(logp * turns.gen).sum() / turns.gen.sum()


def sft_steps(model, family, rows, coord_space, args, steps, lr, device="cpu"):
    """Yield (step, loss) over `steps` supervised steps of --prompts-per-step rows, drawn as GRPO
    draws its prompts (data.draw with random.Random(seed)), so an SFT run with GRPO's seed and B
    sees GRPO's images in order."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        batch = data.draw(rng, rows, args.prompts_per_step)
        loss = sft_loss(model, family, batch, coord_space, args.task, args.logp_chunk, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step, loss.item()


def cold_start(model, family, rows, coord_space, args, log, device):
    """SFT, then save the cold-started model: GRPO's start and its KL reference."""
    for s, loss in sft_steps(
        model, family, rows, coord_space, args, args.sft_steps, args.sft_lr, device
    ):
        shown = s % 50 == 0 or s in (1, args.sft_steps)
        line = f"cold start step {s}/{args.sft_steps} loss={loss:.4f}" if shown else None
        log.write({"step": 0, "sft_step": s, "sft_loss": loss}, line)
    if log.main:
        family.save(model, os.path.join(args.output_dir, "cold-start"))
        print(f"saved {os.path.join(args.output_dir, 'cold-start')}", flush=True)
