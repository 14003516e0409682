"""Multi-turn rollouts with the zoom tool (issue 32, part 2, tools.py): conversations whose tool
turns hold crops pack into the family's shared-prefix layout with the log-probs of a plain forward
of each whole conversation; a tool-turn token carries no loss; invalid calls and a call past the
cap get one-line error turns; untested families are refused."""

import json
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import coldstart  # noqa: E402
import data  # noqa: E402
import evaluation  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import rewards  # noqa: E402
import tools  # noqa: E402
import viz  # noqa: E402
import vlm  # noqa: E402

import runs  # noqa: E402


def call(box):
    args = f'{{"bbox_2d": {box}}}'
    return f'<tool_call>{{"name": "{tools.TOOL_NAME}", "arguments": {args}}}</tool_call>'


# Two prompts, two conversations each: a valid call then an answer; an invalid call (bad JSON)
# then an answer; two valid calls, the second past the cap of 1 (the error turn), then an answer;
# no call at all. The boxes are in each family's coordinate space, inside the 128 px image.
def conversations(space):
    box = [10, 20, 60, 70] if space == "abs_resized" else [100, 150, 500, 600]
    return [
        ["<think> red </think> " + call(box), "<answer> 3 </answer>"],
        ["<think> blue </think> <tool_call>{bad json</tool_call>", "<answer> 2 </answer>"],
        [call(box), call(box), "<answer> 1 </answer>"],
        ["<think> green </think> <answer> 4 </answer>"],
    ]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family(request, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return vlm.load(g.TINY_MODEL)
    return vlm.load(runs.tiny_checkpoint(request.param, str(tmp_path_factory.mktemp("m"))))


def conversation_batch(model, family, G=2):
    rows = data.synthetic_split("test", 2)
    encoded = family.encode(rows)
    env = tools.environment(family, rows, encoded, family.coord_space, max_calls=1)
    o, _, _, turns = tools.scripted(env, conversations(family.coord_space), G)
    return env, encoded[0], o, turns


def plain_logps(model, family, env, o, turns, i):
    """log pi of conversation i's tokens after its prompt: one forward of the whole conversation,
    its prompt's images and its crops in order, positions from the model's own rope index."""
    j, keep = i // 2, env.prompt_ids[i // 2]
    ctx = turns.context[i].bool()
    ids = torch.tensor(keep + o[i][ctx].tolist())[None]
    images = env.prompt_images[j] + turns.crops[i]
    with torch.no_grad(), vlm.precision(model):
        logits = model(
            input_ids=ids,
            pixel_values=torch.cat([pv for pv, _ in images]),
            image_grid_thw=torch.cat([grid for _, grid in images]),
            mm_token_type_ids=vlm.mm_types(ids, family.config.image_token_id),
        ).logits[0, len(keep) - 1 : -1]
    return logits.float().log_softmax(-1).gather(1, o[i][ctx][:, None])[:, 0]


def test_a_conversation_with_crops_packs_as_a_plain_forward(family):
    model, family = family
    env, prompt, o, turns = conversation_batch(model, family)
    assert turns.valid.tolist() == [1, 0, 1, 0] and turns.calls.tolist() == [1, 1, 2, 0]
    assert [len(c) for c in turns.crops] == [1, 0, 1, 0]
    assert rewards.TOOL_IMAGE in turns.texts[0] and "not valid JSON" in turns.texts[1]
    assert "no more tool calls" in turns.texts[2] and "tool_response" not in turns.texts[3]
    copies = torch.arange(4) // 2
    packed = tools.pack(family, model, prompt, copies, o, turns)
    with torch.no_grad():
        logp = vlm.packed_logps(model, family, packed, 1.0, 4096)
    for i in range(4):
        ctx = turns.context[i].bool()
        gap = (logp[i][ctx] - plain_logps(model, family, env, o, turns, i)).abs()
        assert gap.max() < 1e-4, (i, gap.max())  # every token, the tool turns' included


def test_a_tool_turn_token_carries_no_loss(family):
    model, family = family
    env, prompt, o, turns = conversation_batch(model, family)
    args = g.parse_args(["--num-generations", "2", "--mu", "2"])
    tw = g.token_weights(turns.gen, "grpo")
    A = torch.tensor([1.0, -1.0, 0.5, -0.5])
    packed = tools.pack(family, model, prompt, torch.arange(4) // 2, o, turns)

    with torch.no_grad():
        logp_old = vlm.packed_logps(model, family, packed, 1.0, 4096) - 0.1  # rho = 1.1, unclipped
    logp_ref = logp_old + 0.15

    def loss_and_grads(targets):
        model.zero_grad()
        logp = vlm.packed_logps(model, family, {**packed, "targets": targets}, 1.0, 4096)
        J, _ = g.grpo_loss(logp, logp_old, logp_ref, A, tw, args)
        J.backward()
        return J.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    J, grads = loss_and_grads(o)
    tool = (turns.context == 1) & (turns.gen == 0)
    assert tool.sum() > 20  # the tool turns, crops included
    J_tool, grads_tool = loss_and_grads(torch.where(tool, (o + 7) % 50, o))
    assert J_tool == J and all(torch.equal(a, b) for a, b in zip(grads, grads_tool))
    generated = turns.gen == 1
    J_gen, _ = loss_and_grads(torch.where(generated, (o + 7) % 50, o))
    assert J_gen != J  # a generated token's target does change the loss


def test_untested_families_are_refused_in_one_line():
    for model_type in ("qwen3_5", "gemma3"):
        with pytest.raises(SystemExit) as e:
            tools.check_family(model_type, 1)
        assert "not tested" in str(e.value) and "\n" not in str(e.value)
        tools.check_family(model_type, 0)  # single-turn: every family
    tools.check_family("qwen2_5_vl", 2)


# ---------------------------------------------------------------------------------------------
# Training with the tool, on the zoom task's tiny base (cold-started on tool traces: it calls).
# ---------------------------------------------------------------------------------------------
ZOOM = [
    *("--task", "zoom", "--max-tool-calls", "1", "--prompts-per-step", "2"),
    *("--num-generations", "4", "--train-size", "16", "--sample-every", "0", "--lr", "1e-3"),
    *("--eval-every", "0", "--save-every", "0", "--mu", "2"),
]


def metrics(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "loss" in r]


def test_a_step_with_the_tool_agrees_with_its_rollout_and_logs_tool_use(tmp_path):
    g.train(g.parse_args(ZOOM + ["--steps", "1", "--output-dir", str(tmp_path)]))
    (m,) = metrics(tmp_path)
    assert m["tool_call_rate"] > 0 and m["tool_valid_rate"] > 0  # the base calls the tool
    assert m["logp_gap_max"] < 1e-4  # every generated token, in every turn
    assert m["completion_len"] <= 64  # generated tokens only: the tool turns are not counted
    assert "reward_with_call" in m and 0 <= m["tool_useful_rate"] <= m["tool_call_rate"]


def test_the_logp_gap_alarm_covers_the_tool_turns(tmp_path, monkeypatch):
    """Packing that forgets the crops (their placeholders read as text, their positions 1-D): the
    first step's alarm stops the run."""
    monkeypatch.setattr(
        tools,
        "pack",
        lambda family, model, prompt, c, o, t: family.pack(model, prompt, c, o, t.context),
    )
    with pytest.raises(SystemExit, match="disagree on pi_old"):
        g.train(g.parse_args(ZOOM + ["--steps", "1", "--output-dir", str(tmp_path)]))


class Share(infra.Processes):
    """Process `rank` of `world`, run alone: its share of each batch, without the collectives."""

    def gather(self, x):
        return x

    def widest(self, n):
        return n


def test_one_and_two_processes_roll_out_the_same_conversations():
    args = g.parse_args(ZOOM + ["--prompts-per-step", "4"])
    model, family = vlm.load(g.tiny_model("zoom"))
    rows = data.synthetic_split("train", 8, "zoom")[:4]
    weights, stage = g.reward_weights(args), g.stage_at(args, 1)

    def batches(world):
        out = []
        for rank in range(world):
            procs = Share(rank, world, "cpu")
            run = g.Run(model, family, None, None, None, procs, weights, family.coord_space)
            out.append(g.sample_and_reward(run, rows, 0, 1, stage, args))
        return out

    (one,), two = batches(1), batches(2)
    both = [b for b in two]
    texts = [t for b in both for t in b.texts]
    assert one.texts == texts and one.turns.calls.sum() > 0
    assert torch.equal(one.r, torch.cat([b.r for b in both]))
    conversations = lambda b: [o[c.bool()].tolist() for o, c in zip(b.o, b.turns.context)]  # noqa: E731
    assert conversations(one) == [c for b in both for c in conversations(b)]


def test_resume_in_a_run_with_the_tool_equals_an_uninterrupted_run(tmp_path):
    flags = ZOOM + ["--save-every", "2"]
    g.train(g.parse_args(flags + ["--steps", "4", "--output-dir", str(tmp_path / "a")]))
    g.train(g.parse_args(flags + ["--steps", "2", "--output-dir", str(tmp_path / "b")]))
    resume = ["--steps", "4", "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")]
    g.train(g.parse_args(flags + resume))
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert any(m["tool_call_rate"] > 0 for m in metrics(tmp_path / "a")[2:])  # calls after resume


def test_the_rollout_answers_each_call_until_the_cap_and_stops_at_the_length_cap():
    """rollout() with a written decoder on the zoom tokenizer: each completion's path, the
    continuation prompts it is asked to decode (images: the prompt's and the crops so far), the
    error turn past the cap, and the generated-token cap over all turns."""
    model, family = vlm.load(g.tiny_model("zoom"))
    rows = data.synthetic_split("test", 2, "zoom")
    encoded = family.encode(rows)
    env = tools.environment(family, rows, encoded, family.coord_space, max_calls=1)
    tok, eos = family.tokenizer, family.eos_id
    box = "[10, 10, 60, 60]"
    script = {  # completion -> its turns; G = 2, completions 0, 1 of prompt 0 and 2, 3 of prompt 1
        0: ["<think> a </think> " + call(box), "<think> b </think> <answer> solid </answer>"],
        1: ["<think> a </think> <answer> solid </answer>"],
        2: [call(box), call(box), call(box)],  # past the cap, then a call that is not answered
        3: [call("[1, 2]"), "<think> " + "c " * 120 + "</think>"],  # the length cap cuts it
    }
    seen = []

    def decode(prompt, G, L, k, idx):
        idx = list(range(4)) if idx is None else idx
        seen.append((k, idx, prompt["images"].tolist(), L))
        texts = [script[i][k] for i in idx]
        ids = [tok(t, add_special_tokens=False)["input_ids"][:L] + [eos] for t in texts]
        o = torch.full((len(ids), max(map(len, ids))), family.pad_id)
        for i, x in enumerate(ids):
            o[i, : len(x)] = torch.tensor(x)
        return o, torch.full(o.shape, -0.5), torch.zeros(o.shape)

    o, logp, H, turns = tools.rollout(decode, env, encoded[0], 2, 100)
    assert [(k, idx, images) for k, idx, images, _ in seen] == [
        (0, [0, 1, 2, 3], [1, 1]),  # G completions of each prompt, from one prefill each
        (1, [0, 2, 3], [2, 2, 1]),  # after a crop: the prompt's image and the crop; an error: 1
        (2, [2], [2]),  # the call past the cap got the error turn: no new crop
    ]
    assert turns.calls.tolist() == [1, 0, 2, 1] and turns.valid.tolist() == [1, 0, 1, 0]
    assert "no more tool calls" in turns.texts[2] and turns.texts[2].endswith("</tool_call>")
    assert "four numbers" in turns.texts[3]
    assert turns.cut.tolist() == [0, 0, 0, 1]  # 3: the length cap; 2 ended its turn (unanswered)
    assert turns.gen.sum(1).max() <= 100 and turns.gen[3].sum() == 100  # generated tokens only
    assert torch.equal(logp != 0, turns.gen.bool())  # the sampler's log-probs on generated tokens
    assert rewards.tool_bonus(turns.texts[0], {"solution": "solid"}) == 1


def test_tool_bonus_flag_and_the_held_out_eval_with_the_tool(tmp_path):
    args = g.parse_args(["--task", "zoom", "--tool-bonus", "1.2"])
    assert dict(g.reward_weights(args)) == {
        "zoom_accuracy": 1.0,
        "tool_format": 0.2,
        "tool_bonus": 1.2,
    }
    model, family = vlm.load(g.tiny_model("zoom"))
    rows = data.synthetic_split("test", 4, "zoom")
    for calls in (0, 1):  # eval.py --max-tool-calls 0 and 1
        summary, preds = evaluation.evaluate(
            g.greedy, model, family, rows, family.coord_space, "zoom", calls=calls
        )
        assert summary["n"] == 4 and summary["tool_rate"] == (1.0 if calls else 0.0)
        assert all(("crops" in q) == bool(calls) for q in preds)
    assert summary["useful_rate"] == sum(q["useful"] for q in preds) / 4
    picture = Image.open(viz.tool_pictures(str(tmp_path / "zoom.png"), rows, preds, 3))
    assert picture.size == (2 * 224, 3 * (224 + 20))  # image and crop side by side, 3 rows


def test_the_cold_start_learns_the_tool_traces_with_their_crops_as_context():
    """coldstart.trace_loss on the zoom base (cold-started on these traces) against the REC base it
    started from, on the same rows: only the assistant turns are targets."""
    rows = data.synthetic_split("train", 8, "zoom")
    losses = {}
    for name in ("zoom", "rec"):
        model, family = vlm.load(g.tiny_model(name))
        if name == "rec":  # the zoom vocabulary: the REC ids first (make_tiny_model --init)
            family = vlm.load(g.tiny_model("zoom"))[1]
            model.resize_token_embeddings(len(family.tokenizer))
        with torch.no_grad():
            losses[name] = coldstart.sft_loss(model, family, rows, family.coord_space, "zoom", 4096)
    assert losses["zoom"] < 1.0 < losses["rec"], losses


def test_two_processes_under_torchrun_equal_one_with_the_tool(tmp_path):
    """DDP on 2 gloo processes against 1, two steps with the tool: each process rolls out its
    share of the conversations, pads them to the widest of both (Processes.widest) and gathers."""
    flags = ZOOM + ["--steps", "2", "--micro-batch-size", "4"]
    out = runs.one_and_two(flags, tmp_path)
    assert "processes=2" in out["two"] and "processes=1" in out["one"]
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-6) for k in one)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("reward", "loss", "tool_call_rate", "tool_valid_rate", "completion_len"):
        assert [r[key] for r in m1] == pytest.approx([r[key] for r in m2], abs=1e-6), key
    assert m1[0]["tool_call_rate"] > 0
