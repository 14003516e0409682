"""The zoom tool's environment for multi-turn rollouts ("thinking with images", DeepEyes, arXiv
2505.14362): read a completion's tool call, check it, crop that region of the original
image, and write what the tool turn says (the crop, or a one-line error).

A call is Qwen's tool-call format, a JSON object between <tool_call> tags,

    <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
    </tool_call>

with the box in the family's coordinate space (--coord-space: 0-1000 for Qwen2-VL, pixels of the
resized input for Qwen2.5-VL), as DeepEyes' environment reads it (verl/workers/agent/envs/
mm_process_engine/visual_toolbox_v5.py at commit 522de01: `extract_action` about line 30, the
`bbox_2d` argument about line 74, the error observation in `execute`'s except branch,
`maybe_resize_bbox` about line 131). As there, a box sticking out of the image is clipped to it and
a box thinner than one vision token (data.MIN_SIDE px) is widened about its centre; unlike there, a
box with no area in the image is an error, not a crop.

The multi-turn rollout (`rollout`): each completion's turns are decoded by the trainer's own
sampler, one turn of every still-open completion at a time; a turn that ends in a tool call gets a
tool turn (the crop as an image, or the error), and the completion goes on, up to
--max-tool-calls calls (one call past the cap gets the error turn and a last turn to answer). The
tool turns are context, like the prompt: `pack` lays them out with their crops and the positions
of a plain forward of the whole conversation, and their tokens get no loss (Turns.gen is 0 there).

Where we depart from DeepEyes (its agent loop in verl/workers/agent/ at 522de01): its tool turn
also repeats an instruction after the image (`self.user_prompt`); ours holds the image (or the
error) only. Each turn
after a call is decoded from a fresh prefill of the whole conversation so far (the prompt's image
and the crops recomputed once per turn), not from a cache that grows in place: simpler, and the
crops' positions come from the model's own rope index.
"""

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

import data
import infra
import rewards

TOOL_NAME = "image_zoom_in_tool"
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    """What the environment made of a completion's tool call."""

    box: list | None  # the region to crop, [x1, y1, x2, y2] in original-image pixels (None: error)
    error: str = ""  # the tool turn's one-line error ("": a valid call)


def find_call(text):
    """The text inside the completion's first <tool_call> ... </tool_call>, or None (no call: the
    completion answers)."""
    m = CALL.search(text)
    return None if m is None else m.group(1).strip()


def read_call(call, image_size, gt_space, calls_made=0, max_calls=1):
    """A ToolCall from `call` (find_call's text). image_size is the original (W, H); gt_space is
    {"coord_space", "input_width", "input_height"} of the family's input, as data.ground_truths
    has them. Invalid JSON, another tool, a box that is not 4 numbers, an empty box, a box outside
    the image, and a call past `max_calls` each give a one-line error; nothing raises."""
    if calls_made >= max_calls:
        return ToolCall(None, f"error: no more tool calls (at most {max_calls}); answer now")
    try:
        obj = json.loads(call)
    except ValueError as e:
        return ToolCall(None, " ".join(f"error: the tool call is not valid JSON ({e})".split()))
    args = obj.get("arguments") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("name") != TOOL_NAME or not isinstance(args, dict):
        return ToolCall(
            None, f'error: call {{"name": "{TOOL_NAME}", "arguments": {{"bbox_2d": ...}}}}'
        )
    box = args.get("bbox_2d")
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (isinstance(box, list) and len(box) == 4 and all(map(is_num, box))):
        return ToolCall(None, "error: bbox_2d must be [x1, y1, x2, y2], four numbers")
    if box[0] >= box[2] or box[1] >= box[3]:
        return ToolCall(None, f"error: the box {box} is empty (x1 < x2 and y1 < y2 are needed)")
    W, H = image_size
    x1, y1, x2, y2 = rewards.to_original_pixels(box, {"width": W, "height": H, **gt_space})
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)  # clipped to the image
    if x1 >= x2 or y1 >= y2:
        return ToolCall(None, f"error: the box {box} lies outside the image")
    return ToolCall(widened([x1, y1, x2, y2], W, H))


def widened(box, W, H, side=data.MIN_SIDE):
    """Integer pixel box holding `box`, at least `side` px a side (within a W x H image): a thinner
    crop would be less than one vision token."""
    out = []
    for lo, hi, size in ((box[0], box[2], W), (box[1], box[3], H)):
        lo, hi = math.floor(lo), math.ceil(hi)
        n = max(hi - lo, min(side, size))  # the side it gets
        lo = min(max(0, lo - (n - (hi - lo)) // 2), size - n)  # about the centre, inside
        out.append((lo, lo + n))
    (x1, x2), (y1, y2) = out
    return [x1, y1, x2, y2]


def crop(image, call):
    """The region of the original PIL `image` that a valid call names (the family's processor
    resizes it within its min and max pixels when the tool turn is encoded)."""
    return image.crop(tuple(call.box))


# ---------------------------------------------------------------------------------------------
# Multi-turn rollouts: the model's turns and the environment's tool turns, one conversation per
# completion; each completion of a group takes its own path.
# ---------------------------------------------------------------------------------------------
@dataclass
class ToolFlags:
    """Thinking with images: multi-turn rollouts with the zoom tool (DeepEyes)"""

    max_tool_calls: int = 0
    """zoom-tool calls a completion may make (0: single-turn); one more call gets an error turn"""
    max_context_length: int = 0
    """tokens of the whole conversation (prompt, turns, tool turns) at most (0: no cap; the
    generated tokens are capped by --max-completion-length)"""
    tool_bonus: float = 0.0
    """W: reward W when the answer is right and the tool returned a crop (DeepEyes: 1.2)"""


TOOL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # tested with Qwen's tool-call format
# The tool turn after a turn that ended <|im_end|>: DeepEyes' observation (visual_toolbox_v5.py
# at 522de01, `execute`) without the instruction it repeats after the image
TOOL_TURN = (
    "\n<|im_start|>user\n<tool_response>{}</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


def check_family(model_type, max_tool_calls):
    """Refuse a family whose tool-call format we have not tested, in one line."""
    if max_tool_calls and model_type not in TOOL_FAMILIES:
        sys.exit(
            f"error: --max-tool-calls: the tool-call format of model type {model_type!r} is not "
            f"tested (tested: {', '.join(TOOL_FAMILIES)})"
        )


@dataclass
class Env:
    """The zoom tool's environment for a batch of n prompts."""

    family: object  # the model family's adapter (vlm.py)
    rows: list  # [n] the prompts' rows: the first image is the one a call crops
    truths: list  # [n] their ground truths: image size and coordinate space (data.ground_truths)
    prompt_ids: list  # [n] each prompt's tokens, unpadded
    prompt_images: list  # [n] each prompt's images as (pixel_values, image_grid_thw)
    max_calls: int  # --max-tool-calls
    max_context: int = 0  # --max-context-length (0: no cap)
    widest: object = int  # the widest conversation of every process (int: this one's; Processes)
    originals: dict = field(default_factory=dict)  # the first image of each prompt a call crops


def environment(family, rows, encoded, coord_space, max_calls, max_context=0):
    """The Env of `rows`, encoded by the family as (prompt, sizes)."""
    prompt, sizes = encoded
    truths = data.ground_truths(rows, sizes, coord_space)
    keep = prompt["attention_mask"].bool()
    prompt_ids = [ids[m].tolist() for ids, m in zip(prompt["input_ids"], keep)]
    images = images_of(prompt)
    return Env(family, rows, truths, prompt_ids, images, max_calls, max_context)


def images_of(prompt):
    """Each prompt's images as (pixel_values, image_grid_thw) pairs (a family's encode)."""
    grid = prompt["image_grid_thw"]
    pieces = zip(prompt["pixel_values"].split(grid.prod(-1).tolist()), grid.split(1))
    pieces = list(pieces)
    ends = prompt["images"].cumsum(0).tolist()
    return [pieces[e - n : e] for e, n in zip(ends, prompt["images"].tolist())]


@dataclass
class Path:
    """One completion after its prompt: the generated turns, and the tool turns between them."""

    prompt: int  # the index of its prompt
    ids: list = field(default_factory=list)  # the tokens after the prompt
    gen: list = field(default_factory=list)  # 1 on a generated token, 0 on a tool turn's
    logp: list = field(default_factory=list)  # the sampler's log-probs / T (0 on tool turns)
    H: list = field(default_factory=list)  # the entropy at each generated token
    crops: list = field(default_factory=list)  # (pixel_values, image_grid_thw) of each crop shown
    boxes: list = field(default_factory=list)  # each crop's box, in original-image pixels
    text: str = ""  # what the rewards read: the turns, each tool turn written in short
    last: str = ""  # the last generated turn's text
    calls: int = 0  # tool calls made, valid or not
    valid: int = 0  # calls answered with a crop
    useful: int = 0  # crops that hold the whole target object (rows with "objects")
    open: bool = False  # the last turn ended in a call that the environment answers
    cut: bool = False  # a length cap ended the conversation

    def extend(self, ids, generated, logp=None, H=None):
        """Append tokens: a generated turn's (with the sampler's log-probs and entropies) or a
        tool turn's (0 there)."""
        self.ids += ids
        self.gen += [int(generated)] * len(ids)
        self.logp += logp or [0.0] * len(ids)
        self.H += H or [0.0] * len(ids)


@dataclass
class Turns:
    """What a multi-turn rollout adds to its samples (N completions, W tokens after each prompt)."""

    gen: torch.Tensor  # [N, W] 1 on generated tokens (the loss's tokens), 0 on tool turns, padding
    context: torch.Tensor  # [N, W] 1 on every token of the conversation, tool turns included
    cut: torch.Tensor  # [N] 1 where a length cap ended the conversation
    texts: list  # [N] the rewards' texts: turns, each tool turn rewards.TOOL_IMAGE or its error
    crops: list  # [N] each completion's crops, (pixel_values, image_grid_thw) in order
    boxes: list  # [N] each completion's crop boxes, in original-image pixels
    calls: torch.Tensor  # [N] tool calls made
    valid: torch.Tensor  # [N] calls answered with a crop
    useful: torch.Tensor  # [N] crops holding the whole target object

    def __getitem__(self, s):
        """The completions s (a slice) of every field."""
        return Turns(*(getattr(self, f.name)[s] for f in dataclasses.fields(self)))


class Conversations(NamedTuple):
    """A multi-turn rollout: grpo_vlm.Samples' fields over whole conversations, and their Turns."""

    o: torch.Tensor  # [N, W] the tokens after each prompt: generated turns and tool turns, padded
    logp: torch.Tensor  # [N, W] the sampler's log-probs / T on generated tokens (0 elsewhere)
    H: torch.Tensor  # [N, W] the entropy at each generated token (0 elsewhere)
    turns: Turns  # which tokens are generated, the crops, the texts, the calls


def keyed(sample_group, model, family, dec, keys):
    """decode(prompt, G, L, k, idx) for rollout(): turn k of the completions idx by (0)'s keyed
    draw, the keys of turn k > 0 hashed with k (so a completion still depends on its key alone)."""

    def decode(prompt, G, L, k, idx):
        turn_keys = keys if k == 0 else infra.hash32(keys[idx] + k)
        d = dataclasses.replace(dec, max_new_tokens=L, min_new_tokens=dec.min_new_tokens * (k == 0))
        return sample_group(model, family, prompt, G, d, turn_keys)

    return decode


def rollout(decode, env, prompt, G, L):
    """Conversations: G completions of each prompt, then, for
    every completion whose turn ended in a tool call, a tool turn and its next turn, until each
    answers or reaches a cap. L caps each completion's generated tokens, all turns together."""
    paths = [Path(i // G) for i in range(len(prompt["input_ids"]) * G)]
    budgets = [room(env, p, L) for p in paths]
    add_turn(env, paths, decode(prompt, G, max(budgets), 0, None), budgets)
    for k in range(1, env.max_calls + 2):  # the calls, and one call past the cap: the error turn
        for path in (p for p in paths if p.open):
            tool_turn(env, path)
        going = [i for i, p in enumerate(paths) if p.open and room(env, p, L) > 0]
        for p in paths:
            p.cut |= p.open and room(env, p, L) <= 0
        if not going:
            break
        budgets = [room(env, paths[i], L) for i in going]
        turn = decode(continuation(env, [paths[i] for i in going]), 1, max(budgets), k, going)
        add_turn(env, [paths[i] for i in going], turn, budgets)
    return tensors(env, paths, prompt["input_ids"].device)


def scripted(env, conversations, G=1):
    """Conversations written out, G per prompt (prompt-major): each is the list
    of its assistant turns, each but the last ending in a tool call that the environment answers
    (the cold start's tool traces, and the tests'). Log-probs and entropies are 0."""
    tok, paths = env.family.tokenizer, []
    for i, turns in enumerate(conversations):
        path = Path(i // G)
        for k, text in enumerate(turns):
            if k:
                tool_turn(env, path)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [env.family.eos_id]
            path.extend(ids, True)
            path.last, path.text = text, path.text + text
        paths.append(path)
    return tensors(env, paths, env.prompt_images[0][0][0].device)


def room(env, path, L):
    """Tokens the path may still generate: L in all, and within --max-context-length."""
    left = L - sum(path.gen)
    if env.max_context:
        left = min(left, env.max_context - len(env.prompt_ids[path.prompt]) - len(path.ids))
    return left


def add_turn(env, paths, samples, budgets):
    """Append each path's new turn (up to its EOS, at most its budget of tokens)."""
    o, logp, H = samples[:3]
    tok, eos = env.family.tokenizer, env.family.eos_id
    for path, ids, lp, h, budget in zip(paths, o.tolist(), logp.tolist(), H.tolist(), budgets):
        n = min(ids.index(eos) + 1 if eos in ids else len(ids), budget)
        path.extend(ids[:n], True, lp[:n], h[:n])
        path.last = tok.decode(ids[:n], skip_special_tokens=True)
        path.text += path.last
        ended = n > 0 and ids[n - 1] == eos
        path.cut |= not ended
        path.open = ended and find_call(path.last) is not None


def tool_turn(env, path):
    """The environment's answer to the path's call: a tool turn with the crop as an image, or with
    a one-line error (an invalid call, a call past the cap); no turn if it would pass
    --max-context-length."""
    j, family = path.prompt, env.family
    gt = env.truths[j]
    call = read_call(
        find_call(path.last), (gt["width"], gt["height"]), gt, path.calls, env.max_calls
    )
    path.calls += 1
    if call.box is None:
        content, shown, crops = call.error, f"<tool_response>{call.error}</tool_response>", []
    else:
        if j not in env.originals:  # read once per prompt, not once per call
            env.originals[j] = data.load_image(data.row_images(env.rows[j])[0])
        vis = family.image_processor(images=[crop(env.originals[j], call)], return_tensors="pt")
        n = int(vis["image_grid_thw"].prod()) // family.image_processor.merge_size**2
        content = "<|vision_start|>" + family.image_token * n + "<|vision_end|>"
        shown, crops = rewards.TOOL_IMAGE, [(vis["pixel_values"], vis["image_grid_thw"])]
    ids = family.tokenizer(TOOL_TURN.format(content), add_special_tokens=False)["input_ids"]
    if env.max_context and len(env.prompt_ids[j]) + len(path.ids) + len(ids) >= env.max_context:
        path.open, path.cut = False, True  # no room for the tool turn and an answer
        return
    path.valid += bool(crops)
    path.useful += bool(crops) and holds(call.box, env.rows[j])
    path.extend(ids, False)
    path.crops += crops
    path.boxes += [call.box] if crops else []
    path.text += shown


def holds(box, row):
    """Whether a crop box holds the row's whole target object (its first "object", if any)."""
    target = (row.get("objects") or [{}])[0].get("box")
    return (
        bool(target)
        and box[0] <= target[0]
        and box[1] <= target[1]
        and (box[2] >= target[2] and box[3] >= target[3])
    )


def continuation(env, paths):
    """The conversations so far of `paths` as a batch of left-padded prompts, each with its prompt's
    images and its crops, in the layout of a family's encode."""
    ids = [env.prompt_ids[p.prompt] + p.ids for p in paths]
    width, pad = max(map(len, ids)), env.family.pad_id
    images = [pair for p in paths for pair in env.prompt_images[p.prompt] + p.crops]
    device = env.prompt_images[0][0][0].device
    return {
        "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device),
        "attention_mask": torch.tensor(
            [[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device
        ),
        "pixel_values": torch.cat([pv.to(device) for pv, _ in images]),
        "image_grid_thw": torch.cat([g.to(device) for _, g in images]),
        "images": torch.tensor(
            [len(env.prompt_images[p.prompt]) + len(p.crops) for p in paths], device=device
        ),
    }


def tensors(env, paths, device):
    """Conversations of the paths, padded to the widest conversation of every process."""
    N, W = len(paths), env.widest(max(len(p.ids) for p in paths))
    o = torch.full((N, W), env.family.pad_id, dtype=torch.long)
    gen, context, logp, H = (torch.zeros(N, W) for _ in range(4))
    for i, p in enumerate(paths):
        n = len(p.ids)
        o[i, :n], gen[i, :n], logp[i, :n], H[i, :n] = (
            torch.tensor(x) for x in (p.ids, p.gen, p.logp, p.H)
        )
        context[i, :n] = 1
    count = lambda name: torch.tensor([float(getattr(p, name)) for p in paths], device=device)  # noqa: E731
    turns = Turns(
        gen.to(device),
        context.to(device),
        count("cut"),
        [p.text for p in paths],
        [[(pv.to(device), g.to(device)) for pv, g in p.crops] for p in paths],
        [p.boxes for p in paths],
        count("calls"),
        count("valid"),
        count("useful"),
    )
    return Conversations(o.to(device), logp.to(device), H.to(device), turns)


# ---------------------------------------------------------------------------------------------
# Training on the conversations: the family's shared-prefix pack, with the tool turns' crops in
# their placeholders and every token at the position a plain forward of the whole conversation
# gives it (MRoPE over the crops too).
# ---------------------------------------------------------------------------------------------
def pack(family, model, prompt, copies, o, turns):
    """family.pack of completions `o` [n, W] that hold tool turns (`turns`: theirs, Turns[s])."""
    p = family.pack(model, prompt, copies, o, turns.context)
    image_id = family.config.image_token_id
    p["image"][copies[:, None], p["col"]] |= (o == image_id) & turns.context.bool()
    # the vision tower's inputs in the placeholders' order: each prompt's images, then its
    # completions' crops
    own, pieces = images_of(prompt), []
    for r in range(len(own)):
        pieces += own[r] + [
            c for i in (copies == r).nonzero()[:, 0].tolist() for c in turns.crops[i]
        ]
    p["pixel_values"] = torch.cat([pv for pv, _ in pieces])
    p["grid"] = torch.cat([g for _, g in pieces])
    ids, keep = prompt["input_ids"], prompt["attention_mask"].bool()
    for i, r in enumerate(copies.tolist()):
        ctx = turns.context[i].bool()
        whole = torch.cat([ids[r][keep[r]], o[i][ctx]])[None]
        grid = torch.cat([g for _, g in own[r] + turns.crops[i]])
        pos = family.positions(model, whole, torch.ones_like(whole), grid)
        p["pos"][:, r, p["col"][i][ctx]] = pos[:, 0, int(keep[r].sum()) :]
    return p


def greedy_turns(greedy, model, family, rows, encoded, coord_space, L, max_calls):
    """The held-out eval's multi-turn conversations (Turns), each turn greedy (grpo_vlm's)."""
    env = environment(family, rows, encoded, coord_space, max_calls)

    def decode(prompt, G, n, k, idx):
        o = greedy(model, family, prompt, n)
        return o, torch.zeros(o.shape), torch.zeros(o.shape)

    return rollout(decode, env, encoded[0], 1, L).turns
