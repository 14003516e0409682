"""Held-out evaluation: greedy decoding of every row, scored by rewards.score and summarised by
rewards.summarize. The trainer runs it every --eval-every steps (held_out_eval); eval.py's command
line and sft.py call evaluate and held_out too.

The decoder is passed in (`greedy`: grpo_vlm.greedy, the rollout's own decoding loop with argmax
in place of the keyed draw), so this module sits below grpo_vlm.py.
"""

import torch

import data
import infra
import rewards
import tools
import viz
import vlm

EVAL_TOKENS = {"rec": 64, "cls": 64, "count": 64, "det": 160, "zoom": 64}
SPLITS = {"rec": ("test", "ood")}  # the synthetic held-out splits; the other tasks: test only


def splits(task):
    """The synthetic held-out splits evaluated during training."""
    return SPLITS.get(task, ("test",))


@torch.no_grad()
def evaluate(
    greedy,
    model,
    family,
    rows,
    coord_space,
    task="rec",
    batch_size=64,
    max_new_tokens=None,
    calls=0,
):
    """Greedy-decode every row with `greedy(model, family, prompt, max_new_tokens) -> [n, L]
    tokens` (calls > 0: conversations with up to `calls` zoom-tool calls, tools.py); return
    (summary, per-sample predictions)."""
    preds, L = [], max_new_tokens or EVAL_TOKENS[task]
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        prompt, sizes = family.encode(batch, model.device.type)
        if calls:
            encoded = (prompt, sizes)
            turns = tools.greedy_turns(greedy, model, family, batch, encoded, coord_space, L, calls)
            texts, boxes = turns.texts, turns.boxes
        else:
            o = greedy(model, family, prompt, L)
            texts = vlm.completion_texts(family.tokenizer, o, vlm.completion_mask(o, family.eos_id))
        truths = data.ground_truths(batch, sizes, coord_space)
        scored = [rewards.score(task, *x) for x in zip(batch, truths, texts)]
        if calls:  # where each conversation's crops fell
            for q, row, b in zip(scored, batch, boxes):
                q.update(crops=b, useful=any(tools.holds(x, row) for x in b))
        preds += scored
    return rewards.summarize(task, preds), preds


def held_out(greedy, model, family, coord_space, held, task="rec", calls=0):
    """Greedy metrics on each held-out split {name: rows} (infra.load_data), as flat
    {split_metric: v}."""
    out = {}
    for split, rows in held.items():
        summary, _ = evaluate(greedy, model, family, rows, coord_space, task, calls=calls)
        out.update({f"{split}_{k}": v for k, v in summary.items() if k != "n"})
    return out


def held_out_eval(greedy, run, args, step, log, held):
    """On the main process, log and print held_out(); the others wait (under FSDP2 after gathering
    the weights)."""
    model, family, coord_space = run.model, run.family, run.coord_space
    with infra.gathered(run.policy):
        if log.main:
            calls = args.max_tool_calls
            ev = held_out(greedy, model, family, coord_space, held, args.task, calls)
            log.write({"step": step, **ev}, infra.eval_line(step, ev))
            if step == args.steps:  # the end of the run: the final model's boxes on held-out images
                viz.held_out_grid(
                    args,
                    lambda rows: evaluate(greedy, model, family, rows, coord_space, args.task)[1],
                )
        run.procs.barrier()
