"""Several images per prompt (issue 32, part 1), on each family's tiny test model: with 2 and 3
images in one prompt the rollout's tokens equal HF generate's (same keyed draws), its packed
log-probs equal a plain forward (max gap below 1e-4 in fp32), and each image goes through the
vision tower once per group, in the rollout and in training."""

import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402
import vlm  # noqa: E402

import runs  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3"]
SIZES = [(128, 96), (96, 128), (112, 112), (140, 84), (84, 112)]  # distinct grids per image


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return vlm.load(g.TINY_MODEL)
    return vlm.load(runs.tiny_checkpoint(request.param, str(tmp_path_factory.mktemp("m"))))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Noise images of several sizes (a random model reads noise as well as shapes)."""
    d, gen = tmp_path_factory.mktemp("images"), torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        paths.append(str(d / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def rows_of(images, counts):
    """One row per count, each with that many images (the readers' schema: image_paths, _sizes;
    rows 0 and 1 share no image); the rows differ in length, so one is padded on the left."""
    rows, k = [], 0
    for i, n in enumerate(counts):
        paths = [images[(k + j) % len(images)] for j in range(n)]
        k += n
        sizes = [SIZES[images.index(p)] for p in paths]
        problem = "How many shapes are in these images?" + " please" * (3 * (i == 1))
        rows.append(
            {"problem": problem, "image_path": paths[0], "_size": sizes[0], "solution": 2}
            | ({"image_paths": paths, "_sizes": sizes} if n > 1 else {})
        )
    return rows


def image_indices(prompt, copies):
    """The indices (into the batch's images) of the images of prompt copies[i], row after row."""
    ends = prompt["images"].cumsum(0).tolist()
    counts = prompt["images"].tolist()
    return [j for c in copies.tolist() for j in range(ends[c] - counts[c], ends[c])]


def plain_inputs(family, prompt, copies, completion_ids=None, comp_mask=None):
    """HF's own inputs for one prompt (plus completion) per row: prompt copies[i] with all its
    images, then completion i."""
    ids, mask = prompt["input_ids"][copies], prompt["attention_mask"][copies]
    if completion_ids is not None:
        ids, mask = torch.cat([ids, completion_ids], 1), torch.cat([mask, comp_mask.long()], 1)
    types = vlm.mm_types(ids, family.config.image_token_id)
    which = image_indices(prompt, copies)
    if isinstance(family, vlm.Gemma3):
        pixels = prompt["pixel_values"][which]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixels,
            "token_type_ids": types,
        }
    per_image = prompt["pixel_values"].split(prompt["image_grid_thw"].prod(-1).tolist())
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "image_grid_thw": prompt["image_grid_thw"][which],
        "pixel_values": torch.cat([per_image[j] for j in which]),
        "mm_token_type_ids": types,
    }


def vision_rows(model, family):
    """A counter of the rows (patches, or images for Gemma 3) the vision tower is given."""
    seen = []
    tower = model.model.vision_tower if isinstance(family, vlm.Gemma3) else model.model.visual
    tower.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            len((a or [kw.get("pixel_values", kw.get("hidden_states"))])[0])
        ),
        with_kwargs=True,
    )
    return seen


def test_several_images_rollout_equals_generate_and_packed_equals_plain(family, images):
    model, fam = family
    counts = (2, 3)  # a prompt of 2 images and one of 3, in one batch
    rows = rows_of(images, counts)
    prompt, sizes = fam.encode(rows)
    assert prompt["images"].tolist() == list(counts) and (prompt["attention_mask"][:, 0] == 0).any()
    assert len(sizes) == 2 and sizes[0][2:] == SIZES[0]  # the first image's: boxes refer to it
    # every image's placeholder block is in the prompt: image tokens = the images' token counts
    tokens = [fam.image_tokens(*s) for r in rows for s in r.get("_sizes", [r["_size"]])]
    n_image = vlm.mm_types(prompt["input_ids"], fam.config.image_token_id).sum(1)
    assert n_image.tolist() == [sum(tokens[: counts[0]]), sum(tokens[counts[0] :])]
    assert [n for n, _ in vlm.prompt_lengths(fam, rows)] == prompt["attention_mask"].sum(1).tolist()

    seen = vision_rows(model, fam)
    all_rows = (
        len(prompt["pixel_values"])
        if isinstance(fam, vlm.Gemma3)
        else int(prompt["image_grid_thw"].prod(-1).sum())
    )
    G, L = 3, 16
    keys = infra.sample_keys(0, 5, range(2 * G))
    ids, logps, _ = g.sample_group(model, fam, prompt, G, g.Decoding(L, 1.0), keys)
    assert seen == [all_rows]  # the rollout: each image once, for the whole group
    assert len({tuple(r.tolist()) for r in ids}) > 2
    # a prompt per chunk (select() cuts the batch between prompts' images) draws the same tokens
    chunked = g.sample_group(model, fam, prompt, G, g.Decoding(L, 1.0, chunk=G), keys)
    assert torch.equal(chunked.o, ids)

    class Keyed:  # the same keyed draws, as a logits processor of HF generate (then the argmax)
        def __call__(self, input_ids, scores):
            token = g.draw_token(scores, keys, input_ids.shape[1] - prompt["input_ids"].shape[1])
            return torch.full_like(scores, -float("inf")).scatter(1, token[:, None], 0.0)

    copies = torch.arange(2).repeat_interleave(G)
    with torch.no_grad():
        out = model.generate(
            **plain_inputs(fam, prompt, copies),
            max_new_tokens=L,
            do_sample=False,
            logits_processor=[Keyed()],
            eos_token_id=fam.eos_id,
            pad_token_id=fam.pad_id,
            suppress_tokens=fam.suppress,
        )
    mask = vlm.completion_mask(ids, fam.eos_id)
    hf = out[:, prompt["input_ids"].shape[1] :]
    m = mask[:, : hf.shape[1]].long()
    assert torch.equal(ids[:, : hf.shape[1]] * m, hf * m)

    # packed = plain, with completions of different lengths
    mask[:, 5:] = 0
    mask[[0, 4], 5:] = 1
    mask[3, 5:12] = 1
    seen.clear()
    with torch.no_grad():
        packed = vlm.completion_logps(model, fam, prompt, copies, ids, mask, 1.0, 64)
        assert seen == [all_rows]  # training: each image once for its G completions
        logits = model(**plain_inputs(fam, prompt, copies, ids, mask)).logits
        logits = logits[:, prompt["input_ids"].shape[1] - 1 : -1]
        plain = logits.float().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    gap = ((packed - plain).abs() * mask).max()
    assert gap < 1e-4, gap
    assert ((logps - plain).abs() * mask).max() < 1e-4  # and the rollout's own log-probs


def test_count_and_cls_train_on_rows_of_several_images(images, tmp_path):
    """GRPO on VLM-R1 rows with an image list (count, then cls, on the shipped tiny Qwen2.5-VL):
    the run trains, micro-batches cut between prompts of 2 and 3 images, and the rollout agrees
    with the training forward (logp_gap)."""
    import json

    for task, answer in (
        ("count", "<answer> 2 </answer>"),
        ("cls", "<answer> red circle </answer>"),
    ):
        lines = [
            {
                "image": [images[(i + j) % 5] for j in range(2 + i % 2)],
                "conversations": [
                    {"from": "human", "value": "<image>" * (2 + i % 2) + "What is there?"},
                    {"from": "gpt", "value": answer},
                ],
            }
            for i in range(4)
        ]
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        out = tmp_path / task
        flags = [
            "--task",
            task,
            "--train-data",
            str(path),
            "--steps",
            "1",
            "--output-dir",
            str(out),
        ]
        small = ["--prompts-per-step", "2", "--num-generations", "3", "--micro-batch-size", "4"]
        quiet = ["--max-completion-length", "8", "--eval-every", "0", "--save-every", "0"]
        g.train(g.parse_args(flags + small + quiet + ["--sample-every", "0"]))
        rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert len(rows) == 1 and all(r["logp_gap_max"] < 1e-4 for r in rows), rows
