"""Build the offline default model: a tiny Qwen2.5-VL (the real HF architecture, 0.99M parameters)
with a word-level tokenizer, Qwen's special tokens and chat template, and an image-only processor;
then warm-start it with a deliberately short supervised run on the synthetic REC world (sft.py), so
that it is half-trained (Acc@0.5 ~0.39 in-domain) and RL has room to teach.

    OMP_NUM_THREADS=1 python make_tiny_model.py --out checkpoints/tiny-qwen2.5-vl-rec --sft-steps
    1500 --seed 0

The committed checkpoint was made by exactly this command (about 8 CPU minutes; see README).
`--arch qwen2_vl` builds the same thing as a Qwen2-VL (used by the tests, random weights, 0-1000
coordinates).
"""

import argparse
import math
import tempfile

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

import data
import sft
import vlm

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# The zoom task's tool turns (tools.py, Qwen's format). The JSON strings are one token each, quotes
# included: the decoder joins tokens with single spaces, which JSON allows between tokens but not
# inside a string ('" name "' would be another key).
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
JSON_STRINGS = ['"name"', '"arguments"', '"image_zoom_in_tool"', '"bbox_2d"']
# The tasks whose words the shipped cls, count and det tokenizers hold (data.TASKS when they were
# built): a later task's words must stay out of them, or their ids would change.
SHAPE_TASKS = ("rec", "cls", "count", "det")
# Qwen2-VL's chat template, reduced to what a single image + text turn needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INPUT_PIXELS = (
    112 * 112
)  # the processor resizes the 128x128 synthetic images to 112x112 (4x4 merged tokens)


def build_tokenizer(task="rec"):
    """Word-level tokenizer: words, integers 0..1000 and punctuation are one token each. The cls,
    count and det tokenizer appends the words of SHAPE_TASKS and the confidences 0.0, 0.1, ..., 1.0
    (one token each) to the REC vocabulary, so the REC model's embedding rows keep their ids
    (make_tiny_model --init starts from it) and the shipped REC model rebuilds bit-identically. The
    zoom tokenizer appends the zoom words, then TOOL_TAGS and JSON_STRINGS as added tokens."""
    words = data.synthetic_vocab() + ["user", "assistant", "system", "I", "a", "an"]
    tokens = SPECIAL + TAGS + [str(n) for n in range(1001)] + list("[]{}(),.:;\"'-+_/") + words
    vocab = {t: i for i, t in enumerate(tokens)}
    # The tags also occur among the words and keep their later id, which leaves 4 ids unused and 4
    # words ("system", "I", "a", "an") past the end of the embedding table. Those words never occur
    # in the REC data (so moving them changes no weight) and they now fill the gaps: before, a
    # caption with "a" crashed the REC model.
    gaps = sorted(set(range(len(vocab))) - set(vocab.values()))
    for t, gap in zip(sorted((t for t in vocab if vocab[t] >= len(vocab)), key=vocab.get), gaps):
        vocab[t] = gap
    extra = []  # rec: the vocabulary above
    if task == "zoom":
        extra = ["?"] + data.synthetic_vocab(("zoom",))
    elif task != "rec":
        extra = [f"{n / 10:.1f}" for n in range(11)] + ["?"] + data.synthetic_vocab(SHAPE_TASKS)
    for t in extra:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # decimals: one token when in the vocabulary
    number = r"\d+" if task in ("rec", "zoom") else r"\d+\.\d+|\d+"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(number + r"|[A-Za-z]+|[^\sA-Za-z\d]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    added = TAGS + (TOOL_TAGS + JSON_STRINGS if task == "zoom" else [])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def init_number_codes(model, tokenizer, dims=32, scale=0.05):
    """Give the integer tokens 0..1000 smooth value codes (sin/cos of n at periods 4..4000) in the
    first `dims` embedding dimensions, the rest staying random. With tied embeddings the same rows
    are the output head, so part of every number's logit is a smooth function of n, and nearby
    coordinates can share what is learned. A prior, not a measured win: `--number-codes 0` builds
    without it."""
    n = torch.arange(1001, dtype=torch.float32)[:, None]
    periods = torch.logspace(math.log10(4), math.log10(4000), dims // 2)
    angles = 2 * math.pi * n / periods
    ids = tokenizer.convert_tokens_to_ids([str(i) for i in range(1001)])
    with torch.no_grad():
        model.get_input_embeddings().weight[ids, :dims] = scale * torch.cat(
            [angles.sin(), angles.cos()], -1
        )


def build_model(tokenizer, arch="qwen2_5_vl", seed=0, hidden=128, layers=3, number_codes=True):
    torch.manual_seed(seed)
    ids = {
        k: tokenizer.convert_tokens_to_ids(t)
        for k, t in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,  # (t, h, w) split of head_dim / 2
            "mrope_section": [hidden // 32, 3 * hidden // 64, 3 * hidden // 64],
        },
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **ids
        )
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        vision = dict(
            depth=2,
            embed_dim=64,
            hidden_size=hidden,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=True, **ids
        )
        model = Qwen2VLForConditionalGeneration(config)
    if number_codes:
        init_number_codes(model, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_image_processor(task="rec"):
    """The tiny models' image processor: images resized to at most INPUT_PIXELS. For zoom also at
    least INPUT_PIXELS, so that the tool's small crop is resized up to the input's 112 x 112 (a
    square crop; tools.crop leaves the resizing to the processor)."""
    return Qwen2VLImageProcessorPil(
        min_pixels=INPUT_PIXELS if task == "zoom" else 56 * 56, max_pixels=INPUT_PIXELS
    )


def save(model, tokenizer, image_processor, out):
    vlm.ADAPTERS[model.config.model_type](tokenizer, image_processor, model.config).save(model, out)
    print(f"saved {out}", flush=True)


# --------------------------------------------------------------------------------------------- Tiny
# random checkpoints of today's other families, for the family tests. Each exercises what makes its
# family differ, or "packed = plain" would pass trivially: Qwen3-VL has three DeepStack levels,
# Qwen3.5 both of its layer types, Gemma 3 a sliding window (8) shorter than any prompt and a
# bidirectional image block.
# ---------------------------------------------------------------------------------------------
QWEN3_SPECIAL = SPECIAL[:-1] + [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|vision_pad|>",
    "<unk>",
]
GEMMA_SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Gemma 3's chat template reduced to one image + text turn: the assistant is "model", an image is
# <start_of_image>
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def family_tokenizer(special, template, **tokens):
    """A word-level tokenizer over the words of SHAPE_TASKS, with a family's special tokens
    first."""
    words = data.synthetic_vocab(SHAPE_TASKS) + [
        "user",
        "assistant",
        "model",
        "system",
        "I",
        "a",
        "an",
        "?",
    ]
    numbers = [str(n) for n in range(1001)] + [f"{n / 10:.1f}" for n in range(11)]
    vocab = {
        t: i
        for i, t in enumerate(
            dict.fromkeys(special + TAGS + numbers + list("[]{}(),.:;\"'-+_/") + words)
        )
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(
                Regex(r"\d+\.\d+|\d+|[A-Za-z]+|[^\sA-Za-z\d]"), behavior="isolated"
            ),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        chat_template=template,
        padding_side="left",
        **tokens,
    )


def build_family(arch, out, seed=0, hidden=64):
    """A random tiny qwen3_vl, qwen3_5 or gemma3 checkpoint in `out` (what vlm.load reads)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gemma3":
        tok = family_tokenizer(
            GEMMA_SPECIAL,
            GEMMA_TEMPLATE,
            bos_token="<bos>",
            eos_token="<end_of_turn>",
            pad_token="<pad>",
        )
        ids = tok.convert_tokens_to_ids
        text = tf.Gemma3TextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            max_position_embeddings=1024,
            sliding_window=8,
            initializer_range=0.1,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            pad_token_id=ids("<pad>"),
            eos_token_id=ids("<end_of_turn>"),
            bos_token_id=ids("<bos>"),
        )
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
            vision_use_head=False,
        )
        config = tf.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=16,
            boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"),
            initializer_range=0.1,
        )
        model = tf.Gemma3ForConditionalGeneration(config)
        with (
            torch.no_grad()
        ):  # HF initialises the projection to zeros, which would cut every vision gradient
            w = model.model.multi_modal_projector.mm_input_projection_weight
            w.normal_(0, w.shape[0] ** -0.5)
        ip = tf.Gemma3ImageProcessorPil(size={"height": 112, "width": 112})
    else:
        tok = family_tokenizer(
            QWEN3_SPECIAL, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        ids = {
            k: tok.convert_tokens_to_ids(t)
            for k, t in [
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            ]
        }
        text = dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
        )
        if arch == "qwen3_vl":
            config = tf.Qwen3VLConfig(
                text_config=text,
                vision_config={**vision, "deepstack_visual_indexes": [1, 2, 3]},
                tie_word_embeddings=True,
                **ids,
            )
            model = tf.Qwen3VLForConditionalGeneration(config)
        # every 4th layer full attention, the others Gated DeltaNet (linear attention), as the real
        # models
        else:
            text.update(
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_conv_kernel_dim=4,
                rope_parameters={
                    **text["rope_parameters"],
                    "mrope_section": [2, 1, 1],
                    "partial_rotary_factor": 0.25,
                },
            )
            config = tf.Qwen3_5Config(
                text_config=text, vision_config=vision, tie_word_embeddings=False, **ids
            )
            model = tf.Qwen3_5ForConditionalGeneration(config)
            # HF draws each linear head's decay from U(0.01, 16): the state then forgets all but the
            # last few tokens and different prompts' states agree to 1e-9, so no test could tell
            # them apart; U(0.001, 0.1) remembers
            with torch.no_grad():
                for layer in model.model.language_model.layers:
                    if hasattr(layer, "linear_attn"):
                        layer.linear_attn.A_log.uniform_(0.001, 0.1).log_()
        ip = tf.Qwen2VLImageProcessorPil(
            patch_size=16,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
        )
    model.generation_config = tf.GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    save(model, tok, ip, out)
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default="rec", choices=data.TASKS, help="the task of the warm start")
    p.add_argument(
        "--out",
        default="",
        help="where to write the checkpoint (empty: checkpoints/tiny-qwen2.5-vl-TASK)",
    )
    p.add_argument(
        "--arch",
        default="qwen2_5_vl",
        choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"],
        help="HF architecture (qwen3_vl, qwen3_5, gemma3: random weights only, for the family "
        "tests)",
    )
    p.add_argument(
        "--sft-steps",
        type=int,
        default=1500,
        help="supervised warm-start steps (0: random weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the SFT data order")
    p.add_argument("--hidden", type=int, default=128, help="text hidden size")
    p.add_argument("--layers", type=int, default=3, help="text decoder layers")
    p.add_argument("--sft-lr", type=float, default=2e-3, help="learning rate of the warm start")
    p.add_argument(
        "--eval-every", type=int, default=0, help="greedy test eval every N SFT steps (0: never)"
    )
    p.add_argument(
        "--number-codes",
        type=int,
        default=1,
        help="1: smooth value codes for number tokens; 0: random",
    )
    p.add_argument(
        "--init",
        default="",
        help="start from this tiny model (e.g. the REC one) instead of random weights; "
        "its embedding table grows to the task's vocabulary",
    )
    a = p.parse_args()
    if a.arch in ("qwen3_vl", "qwen3_5", "gemma3"):
        return build_family(a.arch, a.out or f"checkpoints/tiny-{a.arch}-random", a.seed)
    tokenizer, image_processor = build_tokenizer(a.task), build_image_processor(a.task)
    a.out = a.out or f"checkpoints/tiny-qwen2.5-vl-{a.task}"
    model = build_model(tokenizer, a.arch, a.seed, a.hidden, a.layers, bool(a.number_codes))
    if (
        a.init
    ):  # the REC vocabulary is a prefix of the others (build_tokenizer): its rows keep their ids
        model = vlm.load(a.init)[0]
        model.resize_token_embeddings(len(tokenizer))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    print(f"built {a.arch} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    if a.sft_steps == 0:
        return save(model, tokenizer, image_processor, a.out)
    # the random weights go to a scratch folder, so that --out only ever holds the finished model
    with tempfile.TemporaryDirectory() as init:
        save(model, tokenizer, image_processor, init)
        sft.main(
            [
                "--task",
                a.task,
                "--model",
                init,
                "--output-dir",
                a.out,
                "--steps",
                str(a.sft_steps),
                "--seed",
                str(a.seed),
                "--lr",
                str(a.sft_lr),
                "--prompts-per-step",
                "32",
                "--gradient-checkpointing",
                "false",
                "--eval-every",
                str(a.eval_every),
            ]
        )


if __name__ == "__main__":
    main()
