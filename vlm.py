"""The model family: everything that differs between vision-language models, behind one adapter per
family.

grpo_vlm.py never reaches into a model; it calls these hooks of the adapter that `load` returns:
  family.encode(rows, device) -> prompt, sizes   chat template, image, placeholder expansion,
                                                 left padding
  family.select(prompt, first, last)             prompts first..last-1 of a batch, with their images
  family.prefill(model, prompt, G, extra)        one forward of each prompt; its KV cache repeated
                                                 G times
  family.decode(model, tokens, state, t)         one decode step of all B*G rows
  family.pack(model, prompt, copies, ids, mask)  shared-prefix layout of completions for the
                                                 training forward
  family.hidden(model, packed)                   the hidden states that predict each completion
                                                 token
  family.vision(model)                           what --freeze-vision freezes
  family.coord_space, family.suppress, eos_id    the boxes' coordinate space; tokens never sampled;
                                                 the EOS
  family.save(model, out, weights)               everything load() reads back
  family.prompt_text, family.image_tokens        the prompt's text and an image's token count
                                                 (prompt_lengths)
packed_logps turns a pack's hidden states into log pi(o_t | q, o_<t) / T (the training forward).
Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, Gemma 3 (ADAPTERS). A model type with no adapter
is refused before any weight is loaded: a family we have not tested never trains.
"""

import contextlib
import json
import os
import re
import sys

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicLayer

import data


def precision(model):
    """bf16 autocast over fp32 weights on a GPU, plain fp32 on the CPU. AdamW moves a weight by
    about lr: at lr 1e-6 that is far below the spacing of bf16 numbers (1/256 of the weight), so
    bf16 weights would round most updates away; fp32 master weights keep them (as DeepSpeed's bf16
    mode does)."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    # no cast cache: it would keep a bf16 copy of every weight (2 bytes a parameter) until the
    # region ends
    return (
        torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        if on_gpu
        else contextlib.nullcontext()
    )


# LoRA's default targets (--lora-targets): the language model's attention and MLP projections
# (Qwen3.5's Gated DeltaNet layers: their large projections), never the vision tower
LORA_TARGETS = (
    r".*language_model\.layers\.\d+\.(self_attn|linear_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|in_proj_qkv|in_proj_z|out_proj)"
)


def logp_gap_limit(model):
    """The default --max-logp-gap: per-token agreement of the rollout and the training forward that
    fp32, or bf16 autocast, keeps on every tested family (README: "Model families")."""
    return 0.02 if isinstance(precision(model), torch.autocast) else 1e-4


def mm_types(input_ids, image_token_id):
    """Modality of each token (0 text, 1 image). Without it MRoPE silently falls back to 1-D
    positions."""
    return (input_ids == image_token_id).int()


def cache_dtype(model):
    """The rollout's KV cache dtype: bf16 under autocast (attention reads its keys and values in
    bf16 anyway; RoPE would otherwise leave the keys in fp32, at twice the memory), else the
    prefill's."""
    return torch.bfloat16 if isinstance(precision(model), torch.autocast) else None


class RoomyLayer(DynamicLayer):
    """One layer's KV cache for decoding G samples per prompt: each prompt's keys and values
    repeated G times (prompt-major), with room for `extra` more positions, in `dtype` (None: the
    prefill's). update() writes new keys and values in place and returns views, where DynamicLayer
    would torch.cat the whole cache at every decode step (O(length^2) bytes copied)."""

    def __init__(self, layer, G, extra, dtype=None):
        if getattr(
            layer, "is_sliding", True
        ):  # a sliding or linear-attention layer would be kept wrongly
            raise NotImplementedError(
                f"the rollout's KV cache does not support {type(layer).__name__}"
            )
        super().__init__()
        self.dtype, self.device, self.is_initialized = (
            dtype or layer.keys.dtype,
            layer.keys.device,
            True,
        )
        (B, H, n, D), self.room = layer.keys.shape, []
        for x in (layer.keys, layer.values):
            r = x.new_empty(B * G, H, n + extra, D, dtype=self.dtype)
            r.view(B, G, H, n + extra, D)[..., :n, :] = x[:, None]  # one copy, no repeat_interleave
            self.room.append(r)
        self.keys, self.values = (r[..., :n, :] for r in self.room)

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        for r, new in zip(self.room, (key_states, value_states)):
            r[..., n : n + m, :] = new
        self.keys, self.values = (r[..., : n + m, :] for r in self.room)
        return self.keys, self.values


def shared_prefix(prompt_ids, prompt_mask, copies, completion_ids, comp_mask):
    """The shared-prefix layout of pack(): completion i continues prompt copies[i]. Each prompt's
    row holds the prompt and then its completions one after another; `seen` [n, S, S] lets each
    completion see the prompt and its own earlier tokens only. `col` is where completion i's tokens
    go, `pred` where each of them is predicted."""
    n_p, P = prompt_ids.shape
    L, dev = completion_ids.shape[1], prompt_ids.device
    slot = (
        (copies[:, None] == copies[None]).tril(-1).sum(1)
    )  # i is the slot-th completion of its prompt
    S = P + (int(slot.max()) + 1) * L
    col = P + slot[:, None] * L + torch.arange(L, device=dev)
    ids = torch.zeros(n_p, S, dtype=prompt_ids.dtype, device=dev)
    ids[:, :P] = prompt_ids
    ids[copies[:, None], col] = completion_ids
    valid = torch.zeros(n_p, S, dtype=torch.bool, device=dev)
    valid[:, :P] = prompt_mask.bool()
    valid[copies[:, None], col] = comp_mask.bool()
    block = torch.full((n_p, S), -1, device=dev)  # -1: the prompt
    block[copies[:, None], col] = slot[:, None]
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    seen = (
        causal
        & valid[:, None, :]
        & ((block[:, None, :] == -1) | (block[:, None, :] == block[:, :, None]))
    )
    seen |= torch.eye(S, dtype=torch.bool, device=dev)  # no query may see nothing (NaN in softmax)
    # token t of completion i is predicted at its position t-1; token 0 at the prompt's last
    # position
    pred = torch.cat([torch.full_like(col[:, :1], P - 1), col[:, :-1]], 1)
    return {
        "ids": ids,
        "seen": seen,
        "col": col,
        "pred": pred,
        "rows": copies[:, None],
        "targets": completion_ids,
    }


def expand(text, placeholder, blocks):
    """`text` with its first len(blocks) `placeholder`s replaced by `blocks`, in order."""
    parts = text.split(placeholder, len(blocks))
    return parts[0] + "".join(b + rest for b, rest in zip(blocks, parts[1:]))


def image_range(prompt, first, last):
    """(i0, i1): the images of prompts first..last-1 (prompt["images"] counts each prompt's)."""
    n = prompt["images"]
    return int(n[:first].sum()), int(n[:last].sum())


def file_of(path, name):
    """A file of a local checkpoint folder or of a hub id (from the local cache when offline)."""
    from transformers.utils import cached_file

    return cached_file(path, name)


class Qwen2VL:
    """Qwen2-VL: an image is t*h*w patches, merged 2x2 into <|image_pad|> tokens; MRoPE positions (3
    axes over the image grid, text counting on from the maximum); boxes in 0-1000."""

    coord_space = "norm1000"
    image_token = "<|image_pad|>"
    vision_tokens = (
        "<|image_pad|>",
        "<|video_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
    )
    image_processor_class = "Qwen2VLImageProcessorPil"

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config
        ids = tokenizer.convert_tokens_to_ids(list(self.vision_tokens))
        self.suppress = [
            i for i in ids if i is not None and i != tokenizer.unk_token_id
        ]  # a sampled one breaks decoding
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    @staticmethod
    def load_tokenizer(path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, padding_side="left")

    def encode(self, rows, device="cpu", images=None):
        """Chat template + a row's images -> left-padded prompt ids with each <|image_pad|>
        expanded to its image's tokens; `images` [n] counts each prompt's images (their patches
        follow one another in pixel_values, their grids in image_grid_thw). sizes are (input w,
        input h, original w, original h) of each row's first image, the one boxes refer to.
        `images`: other images of the rows, a list per row, the same sizes (a masked or distorted
        copy; objectives.encode_view)."""
        images = images or [[data.load_image(p) for p in data.row_images(r)] for r in rows]
        vis = self.image_processor(images=[im for ims in images for im in ims], return_tensors="pt")
        grid, merge = vis["image_grid_thw"], self.image_processor.merge_size
        counts = [len(ims) for ims in images]
        tokens = (grid.prod(-1) // merge**2).tolist()
        first = [sum(counts[:i]) for i in range(len(rows))]  # each row's first image
        texts = [
            self.prompt_text(r["problem"], tokens[i : i + n], r.get("_chat"))
            for r, i, n in zip(rows, first, counts)
        ]
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        patch = self.image_processor.patch_size
        sizes = [
            (int(grid[i, 2]) * patch, int(grid[i, 1]) * patch, ims[0].width, ims[0].height)
            for i, ims in zip(first, images)
        ]
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "pixel_values": vis["pixel_values"].to(device),
            "image_grid_thw": grid.to(device),
            "images": torch.tensor(counts, device=device),
        }, sizes

    def prompt_text(self, problem, image_tokens, chat=None):
        """The chat-templated prompt of a problem (or of a benchmark's `chat`, data.build_messages),
        its image placeholder expanded to `image_tokens` tokens (a list: one placeholder per image,
        each expanded to its count)."""
        counts = [image_tokens] if isinstance(image_tokens, int) else list(image_tokens)
        messages = data.build_messages(problem, chat, len(counts))
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return expand(text, self.image_token, [self.image_token * n for n in counts])

    def image_tokens(self, width, height):
        """The tokens of a width x height image: its patches after the processor's resize,
        merge_size^2 to a token."""
        return (
            self.image_processor.get_number_of_image_patches(height, width)
            // self.image_processor.merge_size**2
        )

    def select(self, prompt, first, last):
        """Prompts first..last-1 with their images (pixel_values holds each image's patches one
        after another)."""
        i0, i1 = image_range(prompt, first, last)
        patches = prompt["image_grid_thw"].prod(-1)
        p0, p1 = int(patches[:i0].sum()), int(patches[:i1].sum())
        return {
            "input_ids": prompt["input_ids"][first:last],
            "attention_mask": prompt["attention_mask"][first:last],
            "pixel_values": prompt["pixel_values"][p0:p1],
            "image_grid_thw": prompt["image_grid_thw"][i0:i1],
            "images": prompt["images"][first:last],
        }

    def positions(self, model, ids, mask, grid):
        """MRoPE positions [3, B, P] of left-padded prompts."""
        types = mm_types(ids, self.config.image_token_id)
        return model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask
        )[0]

    def prefill(self, model, prompt, G, extra):
        """Each prompt, image included, through the model once; its KV cache then repeated G times
        (prompt-major) with room for `extra` tokens. Returns the last position's logits, G times,
        and the decoding state."""
        ids, mask, grid = prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"]
        position_ids = self.positions(model, ids, mask, grid)
        with precision(model):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                pixel_values=prompt["pixel_values"],
                image_grid_thw=grid,
                mm_token_type_ids=mm_types(ids, self.config.image_token_id),
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.past_key_values
        cache.layers = [self.repeat(model, layer, G, extra) for layer in cache.layers]
        state = {
            "cache": cache,
            "P": mask.shape[1],
            "mask": torch.nn.functional.pad(mask.repeat_interleave(G, 0), (0, extra), value=1),
            "next_pos": (position_ids.amax(dim=(0, 2)) + 1).repeat_interleave(G),
        }  # text counts on from the max
        return out.logits[:, -1].float().repeat_interleave(G, 0), state

    def repeat(self, model, layer, G, extra):
        """One cache layer of the prefill, G times."""
        return RoomyLayer(layer, G, extra, cache_dtype(model))

    def decode(self, model, tokens, state, t):
        """Logits after feeding completion token t of every row."""
        pos = (state["next_pos"] + t).view(1, -1, 1).expand(3, -1, -1)
        with precision(model):
            return (
                model(
                    input_ids=tokens[:, None],
                    attention_mask=state["mask"][:, : state["P"] + t + 1],
                    position_ids=pos,
                    past_key_values=state["cache"],
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )

    def pack(self, model, prompt, copies, completion_ids, comp_mask):
        """Shared-prefix packing (shared_prefix) for one forward: each prompt, image included,
        computed once, and each completion at the positions it had when sampled. The layout depends
        on the tokens only, so the policy, reference and old-policy forwards of a micro-batch share
        one."""
        p = shared_prefix(
            prompt["input_ids"], prompt["attention_mask"], copies, completion_ids, comp_mask
        )
        (n_p, S), P, L = p["ids"].shape, prompt["input_ids"].shape[1], completion_ids.shape[1]
        # positions: MRoPE for the prompt; each completion counts on from the prompt's maximum, as
        # when sampled
        prompt_pos = self.positions(
            model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"]
        )
        pos = torch.zeros(3, n_p, S, dtype=prompt_pos.dtype, device=p["ids"].device)
        pos[:, :, :P] = prompt_pos
        pos[:, copies[:, None], p["col"]] = (
            prompt_pos.amax(dim=(0, 2))[copies, None] + 1 + torch.arange(L, device=pos.device)
        )
        image = torch.zeros_like(p["seen"][:, 0])
        image[:, :P] = mm_types(prompt["input_ids"], self.config.image_token_id).bool()
        mask = p.pop("seen")[:, None]
        return {
            **p,
            "mask": mask,
            "pos": pos,
            "image": image,
            "pixel_values": prompt["pixel_values"],
            "grid": prompt["image_grid_thw"],
        }

    def image_embeds(self, model, p):
        """Token embeddings with each image's features (the vision tower runs once per image) in its
        placeholders, and the features themselves. A pack with `copies` has one row per completion:
        the images of prompt copies[i] in row i."""
        feats = model.model.get_image_features(p["pixel_values"], p["grid"])
        merged = list(
            feats.pooler_output if hasattr(feats, "pooler_output") else feats
        )  # one tensor per image
        if "copies" in p:
            ends = p["images"].cumsum(0).tolist()
            per_prompt = [merged[e - n : e] for e, n in zip(ends, p["images"].tolist())]
            merged = [m for c in p["copies"].tolist() for m in per_prompt[c]]
        embeds = model.get_input_embeddings()(p["ids"])
        return embeds.masked_scatter(
            p["image"][..., None], torch.cat(merged).to(embeds.dtype)
        ), feats

    def hidden(self, model, p):
        """Last hidden states [N, L, D] that predict each completion token of a pack()."""
        embeds, _ = self.image_embeds(model, p)
        hidden = model.model(
            inputs_embeds=embeds, attention_mask=p["mask"], position_ids=p["pos"]
        ).last_hidden_state
        return hidden[p["rows"], p["pred"]]

    def vision(self, model):
        """The vision tower, merger included (VLM-R1's --freeze_vision_modules)."""
        return model.model.visual

    def save(self, model, out, weights=None):
        """Model (its `weights` if given: a sharded model's, gathered), tokenizer, image processor
        and chat template: what load() reads."""
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, state_dict=weights)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        with open(os.path.join(out, "chat_template.json"), "w") as f:
            json.dump({"chat_template": self.tokenizer.chat_template}, f)


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, but boxes in absolute pixels of the resized input image."""

    coord_space = "abs_resized"


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: as Qwen2-VL (patch 16, interleaved MRoPE, boxes in 0-1000), plus DeepStack: the
    vision tower also returns features of some of its middle blocks, which the language model adds
    to the image tokens' hidden states after its first layers. A forward that scatters the image
    features itself must pass those levels on too."""

    def hidden(self, model, p):
        embeds, feats = self.image_embeds(model, p)
        # per level: a tuple of per-image tensors (transformers 5.23) or one tensor of all images
        # (5.17)
        deep = [
            (torch.cat(list(f)) if isinstance(f, (list, tuple)) else f).to(embeds.dtype)
            for f in feats.deepstack_features
        ]
        hidden = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=p["mask"],
            position_ids=p["pos"],
            visual_pos_masks=p["image"],
            deepstack_visual_embeds=deep,
            use_cache=False,
        ).last_hidden_state
        return hidden[p["rows"], p["pred"]]


class Qwen35(Qwen2VL):
    """Qwen3.5: Qwen3-VL's vision (no DeepStack) and a hybrid text model: three of every four layers
    are Gated DeltaNet (linear attention), which carry a recurrent state and ignore 4-D masks. So
    the rollout repeats their states G times, and the training forward holds one completion per row
    (a shared-prefix row would run one completion's recurrence into the next); each image still goes
    through the vision tower once."""

    @staticmethod
    def load_tokenizer(path):
        """AutoTokenizer, except for a word-level tokenizer.json (the tiny test models): on
        transformers 5.23 AutoTokenizer forces Qwen3_5Tokenizer, which rebuilds such a vocabulary as
        byte-level BPE and splits words."""
        from transformers import PreTrainedTokenizerFast

        with open(file_of(path, "tokenizer.json")) as f:
            if json.load(f)["model"]["type"] != "WordLevel":
                return Qwen2VL.load_tokenizer(path)
        with open(file_of(path, "tokenizer_config.json")) as f:
            special = {
                k: v
                for k, v in json.load(f).items()
                if k in ("eos_token", "pad_token", "unk_token") and v
            }
        return PreTrainedTokenizerFast(
            tokenizer_file=file_of(path, "tokenizer.json"), padding_side="left", **special
        )

    def repeat(self, model, layer, G, extra):
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        if not isinstance(layer, LinearAttentionCacheLayerMixin):
            return RoomyLayer(layer, G, extra, cache_dtype(model))
        for states in (
            layer.conv_states,
            layer.recurrent_states,
        ):  # owned copies: decoding updates them in place
            for k, s in states.items():
                if s is not None:
                    states[k] = s.repeat_interleave(G, 0)
        return layer

    def pack(self, model, prompt, copies, completion_ids, comp_mask):
        """Row i: the left-padded prompt copies[i], then completion i. The linear layers zero the
        padded inputs (2-D mask), so their states stay zero over the padding."""
        ids_p, mask_p, grid = (
            prompt["input_ids"],
            prompt["attention_mask"],
            prompt["image_grid_thw"],
        )
        P, L = ids_p.shape[1], completion_ids.shape[1]
        pos_p = self.positions(model, ids_p, mask_p, grid)
        pos_c = (
            pos_p.amax(dim=(0, 2))[:, None] + 1 + torch.arange(L, device=ids_p.device)
        )  # on from the maximum
        ids = torch.cat([ids_p[copies], completion_ids], 1)
        return {
            "ids": ids,
            "mask": torch.cat([mask_p[copies], comp_mask.to(mask_p.dtype)], 1),
            "pos": torch.cat([pos_p[:, copies], pos_c[copies][None].expand(3, -1, -1)], 2),
            "image": ids == self.config.image_token_id,
            "copies": copies,
            "images": prompt["images"],
            "pixel_values": prompt["pixel_values"],
            "grid": grid,
            "P": P,
            "targets": completion_ids,
        }

    def hidden(self, model, p):
        embeds, _ = self.image_embeds(model, p)
        hidden = model.model(
            inputs_embeds=embeds, attention_mask=p["mask"], position_ids=p["pos"]
        ).last_hidden_state
        return hidden[
            :, p["P"] - 1 : -1
        ]  # token t of a completion is predicted at column P - 1 + t


class Gemma3(Qwen2VL):
    """Gemma 3: each image resized to one square and pooled to a fixed block of mm_tokens_per_image
    soft tokens, with bidirectional attention inside the block; 1-D positions; sliding-window layers
    mixed with global ones; the vision part is the SigLIP tower and a projector. No trained box
    format (no <loc> tokens): we use 0-1000, which does not depend on the processor's image size. A
    turn ends with <end_of_turn>, the EOS we stop on."""

    image_processor_class = "Gemma3ImageProcessorPil"

    def __init__(self, tokenizer, image_processor, config):
        super().__init__(tokenizer, image_processor, config)
        c, text = config, config.get_text_config()
        self.boi, self.soft, self.eoi = tokenizer.convert_ids_to_tokens(
            [c.boi_token_id, c.image_token_id, c.eoi_token_id]
        )
        self.suppress = [c.boi_token_id, c.image_token_id, c.eoi_token_id]
        end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        self.eos_id = (
            end if end is not None and end != tokenizer.unk_token_id else tokenizer.eos_token_id
        )
        self.layer_types, self.window = sorted(set(text.layer_types)), text.sliding_window

    def encode(self, rows, device="cpu", images=None):
        images = images or [[data.load_image(p) for p in data.row_images(r)] for r in rows]
        vis = self.image_processor(images=[im for ims in images for im in ims], return_tensors="pt")
        texts = [
            self.prompt_text(
                r["problem"], [self.config.mm_tokens_per_image] * len(ims), r.get("_chat")
            )
            for r, ims in zip(rows, images)
        ]
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        h, w = vis["pixel_values"].shape[-2:]  # every image is resized to the same square
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "pixel_values": vis["pixel_values"].to(device),
            "images": torch.tensor([len(ims) for ims in images], device=device),
        }, [(int(w), int(h), ims[0].width, ims[0].height) for ims in images]

    def prompt_text(self, problem, image_tokens, chat=None):
        counts = [image_tokens] if isinstance(image_tokens, int) else list(image_tokens)
        blocks = [f"\n\n{self.boi}{self.soft * n}{self.eoi}\n\n" for n in counts]  # Gemma3Processor
        messages = data.build_messages(problem, chat, len(counts))
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return expand(text, self.boi, blocks)

    def image_tokens(self, width, height):
        return self.config.mm_tokens_per_image  # every image is resized to one square

    def select(self, prompt, first, last):
        i0, i1 = image_range(prompt, first, last)
        return {
            **{k: prompt[k][first:last] for k in ("input_ids", "attention_mask", "images")},
            "pixel_values": prompt["pixel_values"][i0:i1],
        }

    def positions(self, model, ids, mask, grid=None):
        """1-D positions of a left-padded batch: the index among the row's real tokens (as HF
        generate)."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefill(self, model, prompt, G, extra):
        from transformers.cache_utils import DynamicCache

        ids, mask = prompt["input_ids"], prompt["attention_mask"]
        pos = self.positions(model, ids, mask)
        # a plain DynamicCache keeps every position of the sliding layers too (the decode steps'
        # masks window them); the cache HF builds from the config would already have dropped all but
        # the window
        cache = DynamicCache()
        with precision(model):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                pixel_values=prompt["pixel_values"],
                token_type_ids=mm_types(ids, self.config.image_token_id),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.layers = [RoomyLayer(layer, G, extra, cache_dtype(model)) for layer in cache.layers]
        state = {
            "cache": cache,
            "P": ids.shape[1],
            "next_pos": (pos[:, -1] + 1).repeat_interleave(G),
            "mask": torch.nn.functional.pad(mask.repeat_interleave(G, 0), (0, extra), value=1),
        }
        return out.logits[:, -1].float().repeat_interleave(G, 0), state

    def decode(self, model, tokens, state, t):
        with precision(model):
            return (
                model(
                    input_ids=tokens[:, None],
                    attention_mask=state["mask"][:, : state["P"] + t + 1],
                    position_ids=(state["next_pos"] + t)[:, None],
                    past_key_values=state["cache"],
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )

    def pack(self, model, prompt, copies, completion_ids, comp_mask):
        """Shared-prefix packing with one 4-D mask per layer type: the image block sees itself both
        ways, and the sliding layers see only keys fewer than `window` positions back."""
        p = shared_prefix(
            prompt["input_ids"], prompt["attention_mask"], copies, completion_ids, comp_mask
        )
        (n_p, S), P, L = p["ids"].shape, prompt["input_ids"].shape[1], completion_ids.shape[1]
        image = torch.zeros_like(p["seen"][:, 0])
        image[:, :P] = mm_types(prompt["input_ids"], self.config.image_token_id).bool()
        start = (
            image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        )  # each run of soft tokens is one image
        group = torch.where(image, start.long().cumsum(1), -1)
        seen = p.pop("seen") | ((group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0))
        prompt_pos = self.positions(model, prompt["input_ids"], prompt["attention_mask"])
        pos = torch.zeros(n_p, S, dtype=torch.long, device=seen.device)
        pos[:, :P] = prompt_pos
        pos[copies[:, None], p["col"]] = (
            prompt_pos[copies, -1:] + 1 + torch.arange(L, device=seen.device)
        )
        masks = {
            "full_attention": seen,
            "sliding_attention": seen & ((pos[:, :, None] - pos[:, None, :]) < self.window),
        }
        return {
            **p,
            "mask": {k: masks[k][:, None] for k in self.layer_types},
            "pos": pos,
            "pixel_values": prompt["pixel_values"],
        }

    def hidden(self, model, p):
        hidden = model.model(
            input_ids=p["ids"],
            pixel_values=p["pixel_values"],
            attention_mask=p["mask"],
            position_ids=p["pos"],
            use_cache=False,
        ).last_hidden_state
        return hidden[p["rows"], p["pred"]]

    def vision(self, model):
        return torch.nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector])


ADAPTERS = {
    "qwen2_vl": Qwen2VL,
    "qwen2_5_vl": Qwen25VL,
    "qwen3_vl": Qwen3VL,
    "qwen3_5": Qwen35,
    "gemma3": Gemma3,
}


def image_processor(path, family):
    """The family's PIL image processor, as named in preprocessor_config.json (torchvision, which
    the fast ones need, does not import with every torch)."""
    import transformers

    with open(file_of(path, "preprocessor_config.json")) as f:
        named = (
            json.load(f).get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
            + "Pil"
        )
    return getattr(transformers, named, None) or getattr(transformers, family.image_processor_class)


def adapter(path, config=None):
    """The family adapter of a checkpoint (its tokenizer, PIL image processor and config) without
    its weights: all the upfront prompt-length check needs. A model type with no adapter is refused
    with one line."""
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(path)
    family = ADAPTERS.get(config.model_type)
    if family is None:
        sys.exit(
            f"error: {path}: model type {config.model_type!r} is not supported (untested families "
            "are never "
            f"trained); supported: {', '.join(ADAPTERS)}"
        )
    tokenizer = family.load_tokenizer(path)
    if tokenizer.chat_template is None:  # real Qwen checkpoints keep it beside the processor
        with open(file_of(path, "chat_template.json")) as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
    if tokenizer.pad_token_id is None:
        sys.exit(f"error: {path}: the tokenizer has no pad token")
    return family(tokenizer, image_processor(path, family).from_pretrained(path), config)


def load(path, device="cpu"):
    """(model, family): the HF model in fp32 with SDPA attention, and its family's adapter (loaded
    first: an unsupported model type is refused before a weight loads). `path` may be a LoRA adapter
    folder (a LoRA run's checkpoint or final model): its base model with the adapter in place.

    We never use AutoProcessor: it can silently return only the tokenizer, and Qwen's processor
    needs torchvision for videos. The tokenizer and the family's image-only PIL processor
    suffice."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    base = lora_base(path)  # a LoRA adapter folder: its base model, then the adapter
    config = AutoConfig.from_pretrained(base)
    family = adapter(path, config)
    # fp32 weights everywhere; on a GPU the forwards run in bf16 autocast (precision()). SDPA, also
    # where flash-attn is installed: the training forward's block attention mask (pack) is beyond
    # flash-attn's kernels.
    model = AutoModelForImageTextToText.from_pretrained(
        base, dtype=torch.float32, attn_implementation="sdpa"
    )
    if base != path:
        model.load_adapter(
            path, is_trainable=True
        )  # A and B train on (a resume); the base weights stay frozen
    model = model.to(device)
    if base != path:
        frozen_to_bf16(model)
    # Rollouts must come from exactly the policy the loss scores: a hub generation_config's
    # repetition penalty, top-k or top-p would change them, so only the special tokens are kept.
    gc = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id
    )
    return model, family


def prompt_lengths(family, rows):
    """(prompt tokens, image tokens) of each checked row, as family.encode will make them, from the
    prompt's text and the image's size alone (no pixel is decoded; the text is tokenized once per
    distinct prompt)."""
    text, out = {}, []
    for r in rows:
        chat = r.get("_chat")  # a benchmark's or a paper recipe's prompt (data.build_messages)
        sizes = r.get("_sizes") or [r["_size"]]
        key = (r["problem"], len(sizes), *((chat["text"], chat.get("system")) if chat else ()))
        if key not in text:
            prompt = family.prompt_text(r["problem"], [0] * len(sizes), chat)
            text[key] = len(family.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n = sum(family.image_tokens(*s) for s in sizes)
        out.append((text[key] + n, n))
    return out


# --------------------------------------------------------------------------------------------- log
# pi(o_t | q, o_<t) / T of completion tokens only, from the family's packed forward, in chunks whose
# [chunk, vocab] logits are recomputed in backward (checkpoint): only log-probs are kept.
def token_logps(logits, targets, T):
    """log softmax(logits / T) at the targets: [...] from logits [..., V] and targets [...]
    (exercise 7)."""
    logits = logits / T
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def _chunk_logps(h, y, lm_head, T):
    return token_logps(lm_head(h).float(), y, T)


def completion_mask(completion_ids, eos_id):
    """[N, L] mask from lengths: tokens up to and including the first EOS (pad may equal EOS)."""
    is_eos = completion_ids == eos_id
    L = completion_ids.shape[1]
    no_eos = torch.full_like(is_eos[:, 0], L, dtype=torch.long)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), no_eos)
    lengths = (first_eos + 1).clamp(max=L)
    return (torch.arange(L, device=completion_ids.device)[None] < lengths[:, None]).float()


def completion_texts(tokenizer, completion_ids, mask):
    """The text of each completion's tokens under its mask, special tokens dropped."""
    return [
        tokenizer.decode(c[: int(m.sum())], skip_special_tokens=True)
        for c, m in zip(completion_ids, mask)
    ]


def chunked_logps(hidden, lm_head, targets, T, chunk):
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = [
        checkpoint(_chunk_logps, hc, yc, lm_head, T, use_reentrant=False)
        if torch.is_grad_enabled()
        else _chunk_logps(hc, yc, lm_head, T)
        for hc, yc in zip(h.split(chunk), y.split(chunk))
    ]
    return torch.cat(out).view_as(targets)


def packed_logps(model, family, packed, T, chunk):
    """log pi(o_t | q, o_<t) / T of every completion token of a family.pack(): the training
    forward."""
    with precision(model):
        return chunked_logps(
            family.hidden(model, packed), model.lm_head, packed["targets"], T, chunk
        )


def completion_logps(model, family, prompt, copies, completion_ids, comp_mask, T, chunk):
    """log pi(o_t | q, o_<t) / T for every completion token; completion i continues prompt
    copies[i]."""
    return packed_logps(
        model, family, family.pack(model, prompt, copies, completion_ids, comp_mask), T, chunk
    )


def enable_checkpointing(model):
    """Recompute activations in backward (renamed after transformers 5.17; the old name warns on
    newer versions)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------------------------- LoRA
# (Hu et al. 2021): W x + (alpha / r) B A x on the targeted linear layers; only A and B train. The
# adapters go into the HF model in place (transformers' peft integration), so the model stays the HF
# class every hook above calls; save_pretrained then writes the adapter only
# (adapter_model.safetensors, adapter_config.json).
def lora_modules(model, family, targets, freeze_vision=False):
    """Names of the linear layers whose full name matches the regex `targets` (empty: LORA_TARGETS);
    with --freeze-vision none in the vision tower (a frozen tower gets no adapter). Refused with one
    line if none match."""
    frozen = {id(m) for m in family.vision(model).modules()} if freeze_vision else set()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and id(m) not in frozen
        and re.fullmatch(targets or LORA_TARGETS, n)
    ]
    if not names:
        sys.exit(
            f"error: --lora-targets {targets or LORA_TARGETS!r} matches no linear layer"
            f"{' outside the frozen vision tower' if frozen else ''} (full names, as "
            "model.named_modules())"
        )
    return names


def add_lora(model, family, args, base):
    """Rank --lora-r adapters on lora_modules(), in place: A random, B = 0, so the run starts at
    exactly the base model. Dropout 0: any dropout makes the training forward differ from the
    rollout (rho != 1 at mu = 1, and the logp_gap check trips). The adapter records `base` (absolute
    if local), the weights load() puts it on."""
    from peft import LoraConfig

    names = lora_modules(model, family, args.lora_targets, args.freeze_vision)
    model.add_adapter(
        LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha or 2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=names,
        )
    )
    model.peft_config["default"].base_model_name_or_path = (
        os.path.abspath(base) if os.path.isdir(base) else base
    )
    frozen_to_bf16(model)


def frozen_to_bf16(model):
    """Under bf16 autocast (a GPU), LoRA's frozen base in bf16: it never takes an update, so it
    needs no fp32 master copy (half its memory, as --plan counts it; the forwards compute in bf16
    anyway, as the full fine-tune's bf16 reference does). The adapters A and B stay fp32."""
    if isinstance(precision(model), torch.autocast):
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


def lora_base(path):
    """The base model of a LoRA adapter folder (adapter_config.json), else `path` itself."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.exists(config):
        return path
    with open(config) as f:
        return json.load(f)["base_model_name_or_path"]


@contextlib.contextmanager
def adapters_off(model):
    """The model without its adapters: the base weights, LoRA's pi_ref (no copy). peft's toggle also
    sets A and B trainable again on the way back."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def merge_lora(path, out):
    """The adapter folder `path` merged into its base's fp32 weights, W + (alpha / r) B A (a bf16
    base would round small deltas away), saved to `out` as a plain model: loads with
    from_pretrained, no peft needed."""
    from peft import PeftModel

    model, _ = load(lora_base(path))
    family = adapter(path, model.config)  # the tokenizer, processor and chat template the run saved
    family.save(PeftModel.from_pretrained(model, path).merge_and_unload(), out)
