"""The model family: everything that differs between vision-language models, behind one adapter per family.

grpo_vlm.py never reaches into a model; it calls these hooks of the adapter that `load` returns:
  family.encode(rows, device) -> prompt, sizes   chat template, image, placeholder expansion, left padding
  family.select(prompt, first, last)             prompts first..last-1 of a batch, with their images
  family.prefill(model, prompt, G, extra)        one forward of each prompt; its KV cache repeated G times
  family.decode(model, tokens, state, t)         one decode step of all B*G rows
  family.pack(model, prompt, copies, ids, mask)  shared-prefix layout of completions for the training forward
  family.hidden(model, packed)                   the hidden states that predict each completion token
  family.vision(model)                           what --freeze-vision freezes
  family.coord_space, family.suppress            the boxes' coordinate space; tokens never sampled
  family.save(model, out)                        everything load() reads back
A model type with no adapter is refused before any weight is loaded: a family we have not tested never trains.
"""

import contextlib
import json
import os
import sys

import torch
from transformers.cache_utils import DynamicLayer

import data


def precision(model):
    """bf16 autocast over fp32 weights on a GPU, plain fp32 on the CPU. AdamW moves a weight by about lr:
    at lr 1e-6 that is far below the spacing of bf16 numbers (1/256 of the weight), so bf16 weights
    would round most updates away; fp32 master weights keep them (as DeepSpeed's bf16 mode does)."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()


def mm_types(input_ids, image_token_id):
    """Modality of each token (0 text, 1 image). Without it MRoPE silently falls back to 1-D positions."""
    return (input_ids == image_token_id).int()


class RoomyLayer(DynamicLayer):
    """One layer's KV cache for decoding G samples per prompt: each prompt's keys and values repeated G times
    (prompt-major), with room for `extra` more positions. update() writes new keys and values in place and returns
    views, where DynamicLayer would torch.cat the whole cache at every decode step (O(length^2) bytes copied)."""

    def __init__(self, layer, G, extra):
        if getattr(layer, "is_sliding", True):  # a sliding or linear-attention layer would be kept wrongly
            raise NotImplementedError(f"the rollout's KV cache does not support {type(layer).__name__}")
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


class Qwen2VL:
    """Qwen2-VL: an image is t*h*w patches, merged 2x2 into <|image_pad|> tokens; MRoPE positions (3 axes over the
    image grid, text counting on from the maximum); boxes in 0-1000."""

    coord_space = "norm1000"
    image_token = "<|image_pad|>"
    vision_tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer, self.image_processor, self.config = tokenizer, image_processor, config
        ids = tokenizer.convert_tokens_to_ids(list(self.vision_tokens))
        self.suppress = [i for i in ids if i is not None and i != tokenizer.unk_token_id]  # a sampled one breaks decoding

    def encode(self, rows, device="cpu"):
        """Chat template + image -> left-padded prompt ids with <|image_pad|> expanded to the image's tokens;
        sizes are (input w, input h, original w, original h)."""
        images = [data.load_image(r["image_path"]) for r in rows]
        vis = self.image_processor(images=images, return_tensors="pt")
        grid, merge = vis["image_grid_thw"], self.image_processor.merge_size
        texts = []
        for r, g in zip(rows, grid):
            text = self.tokenizer.apply_chat_template(data.build_messages(r["problem"]), tokenize=False,
                                                      add_generation_prompt=True)
            texts.append(text.replace(self.image_token, self.image_token * int(g.prod() // merge**2), 1))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        patch = self.image_processor.patch_size
        sizes = [(int(g[2]) * patch, int(g[1]) * patch, im.width, im.height) for g, im in zip(grid, images)]
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                "pixel_values": vis["pixel_values"].to(device), "image_grid_thw": grid.to(device)}, sizes

    def select(self, prompt, first, last):
        """Prompts first..last-1 with their images (pixel_values holds each image's patches one after another)."""
        patches = prompt["image_grid_thw"].prod(-1)
        p0, p1 = int(patches[:first].sum()), int(patches[:last].sum())
        return {"input_ids": prompt["input_ids"][first:last], "attention_mask": prompt["attention_mask"][first:last],
                "pixel_values": prompt["pixel_values"][p0:p1], "image_grid_thw": prompt["image_grid_thw"][first:last]}

    def positions(self, model, ids, mask, grid):
        """MRoPE positions [3, B, P] of left-padded prompts."""
        types = mm_types(ids, self.config.image_token_id)
        return model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)[0]

    def prefill(self, model, prompt, G, extra):
        """Each prompt, image included, through the model once; its KV cache then repeated G times (prompt-major)
        with room for `extra` tokens. Returns the last position's logits, G times, and the decoding state."""
        ids, mask, grid = prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"]
        position_ids = self.positions(model, ids, mask, grid)
        with precision(model):
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=prompt["pixel_values"],
                        image_grid_thw=grid, mm_token_type_ids=mm_types(ids, self.config.image_token_id),
                        use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.layers = [RoomyLayer(layer, G, extra) for layer in cache.layers]
        state = {"cache": cache, "P": mask.shape[1],
                 "mask": torch.nn.functional.pad(mask.repeat_interleave(G, 0), (0, extra), value=1),
                 "next_pos": (position_ids.amax(dim=(0, 2)) + 1).repeat_interleave(G)}  # text counts on from the max
        return out.logits[:, -1].float().repeat_interleave(G, 0), state

    def decode(self, model, tokens, state, t):
        """Logits after feeding completion token t of every row."""
        pos = (state["next_pos"] + t).view(1, -1, 1).expand(3, -1, -1)
        with precision(model):
            return model(input_ids=tokens[:, None], attention_mask=state["mask"][:, :state["P"] + t + 1],
                         position_ids=pos, past_key_values=state["cache"], use_cache=True).logits[:, -1].float()

    def pack(self, model, prompt, copies, completion_ids, comp_mask):
        """Shared-prefix packing of completions (completion i continues prompt copies[i]) for one forward.

        Each prompt, image included, is computed once. Its row holds the prompt and then its completions one
        after another; a block mask lets each completion see the prompt and its own earlier tokens only, at the
        positions it would have alone. The layout depends on the tokens only, so the policy, reference and
        old-policy forwards of a micro-batch share one."""
        prompt_ids, prompt_mask, grid = prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"]
        n_p, P = prompt_ids.shape
        L, dev = completion_ids.shape[1], prompt_ids.device
        slot = (copies[:, None] == copies[None]).tril(-1).sum(1)  # i is the slot-th completion of its prompt
        S = P + (int(slot.max()) + 1) * L
        col = P + slot[:, None] * L + torch.arange(L, device=dev)  # where completion i's tokens go
        ids = torch.zeros(n_p, S, dtype=prompt_ids.dtype, device=dev)
        ids[:, :P] = prompt_ids
        ids[copies[:, None], col] = completion_ids
        valid = torch.zeros(n_p, S, dtype=torch.bool, device=dev)
        valid[:, :P] = prompt_mask.bool()
        valid[copies[:, None], col] = comp_mask.bool()
        block = torch.full((n_p, S), -1, device=dev)  # -1: the prompt
        block[copies[:, None], col] = slot[:, None]
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        seen = causal & valid[:, None, :] & ((block[:, None, :] == -1) | (block[:, None, :] == block[:, :, None]))
        seen |= torch.eye(S, dtype=torch.bool, device=dev)  # no query may see nothing (NaN in softmax)
        # positions: MRoPE for the prompt; each completion counts on from the prompt's maximum, as when sampled
        prompt_pos = self.positions(model, prompt_ids, prompt_mask, grid)
        pos = torch.zeros(3, n_p, S, dtype=prompt_pos.dtype, device=dev)
        pos[:, :, :P] = prompt_pos
        pos[:, copies[:, None], col] = prompt_pos.amax(dim=(0, 2))[copies, None] + 1 + torch.arange(L, device=dev)
        image = torch.zeros_like(valid)
        image[:, :P] = mm_types(prompt_ids, self.config.image_token_id).bool()
        # token t of completion i is predicted at its position t-1; token 0 at the prompt's last position
        pred = torch.cat([torch.full_like(col[:, :1], P - 1), col[:, :-1]], 1)
        return {"ids": ids, "mask": seen[:, None], "pos": pos, "image": image, "pixel_values": prompt["pixel_values"],
                "grid": grid, "rows": copies[:, None], "pred": pred, "targets": completion_ids}

    def hidden(self, model, p):
        """Last hidden states [N, L, D] that predict each completion token of a pack(); each image goes through the
        vision tower once and its features are shared by all completions of its prompt."""
        feats = model.model.get_image_features(p["pixel_values"], p["grid"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats  # one tensor per image
        embeds = model.get_input_embeddings()(p["ids"])
        embeds = embeds.masked_scatter(p["image"][..., None], torch.cat(list(feats)).to(embeds.dtype))
        hidden = model.model(inputs_embeds=embeds, attention_mask=p["mask"], position_ids=p["pos"]).last_hidden_state
        return hidden[p["rows"], p["pred"]]

    def vision(self, model):
        """The vision tower, merger included (VLM-R1's --freeze_vision_modules)."""
        return model.model.visual

    def save(self, model, out):
        """Model, tokenizer, image processor and chat template: what load() reads."""
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        with open(os.path.join(out, "chat_template.json"), "w") as f:
            json.dump({"chat_template": self.tokenizer.chat_template}, f)


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, but boxes in absolute pixels of the resized input image."""

    coord_space = "abs_resized"


ADAPTERS = {"qwen2_vl": Qwen2VL, "qwen2_5_vl": Qwen25VL}


def load(path, device="cpu"):
    """(model, family): the HF model in fp32 with SDPA attention, and its family's adapter.

    We never use AutoProcessor: it can silently return only the tokenizer, and Qwen's processor needs torchvision
    for videos. The tokenizer and the family's image-only PIL processor suffice."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig
    from transformers import Qwen2VLImageProcessorPil
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ADAPTERS:
        sys.exit(f"error: {path}: model type {config.model_type!r} is not supported; supported: "
                 f"{', '.join(sorted(ADAPTERS))}")
    # fp32 weights everywhere; on a GPU the forwards run in bf16 autocast (precision()). SDPA, also where flash-attn
    # is installed: the training forward's block attention mask (pack) is beyond flash-attn's kernels.
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device)
    # Rollouts must come from exactly the policy the loss scores: a hub generation_config's repetition penalty,
    # top-k or top-p would change them, so only the special tokens are kept.
    gc = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id,
                                               pad_token_id=gc.pad_token_id)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.chat_template is None:  # real Qwen checkpoints keep it beside the processor
        with open(cached_file(path, "chat_template.json")) as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return model, ADAPTERS[config.model_type](tokenizer, image_processor, config)


def enable_checkpointing(model):
    """Recompute activations in backward (renamed after transformers 5.17; the old name warns on newer versions)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
