"""The runtime: what a training run needs that the GRPO paper does not cover.

parse_args        argparse built from a dataclass and its field docstrings;
                  task defaults < preset < flags
load_data         the rows, checked upfront: formats and images (data.py), prompt lengths (the
                  family's tokenizer)
setup_distributed torchrun processes on one node or several (gloo on the CPU, NCCL on GPUs); gather,
                  all_sum; watch_peers: --dist-timeout, a lost process named in one line
engine            the policy under DDP, or FSDP2 with --fsdp (fsdp; gathered: the weights once per
                  rollout), the optimizer (--optim); reference: pi_ref whole or sharded
resume, save_state atomic checkpoints (model, optimizer, step, prompt sampler, RNG) and a checked
                  resume (shared_checkpoint: --output-dir and the checkpoint seen by every
                  process); under --fsdp the weights gathered for save_pretrained, the optimizer in
                  shards (DCP)
MetricsLog        metrics.jsonl, cut back to the checkpoint on a resume; the progress line; the
                  curves (matplotlib)
Reporter          --report-to tensorboard|wandb: the same rows, and sample completions, to either
                  library
catch_signals     Ctrl-C / SIGTERM: finish the step, save, exit
"""

import argparse
import ast
import atexit
import contextlib
import datetime
import glob
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields

import torch

import data
import plan
import rewards
import vlm


# ---------------------------------------------------------------------------------------------
# Arguments: one flag per field of the dataclass, its docstring as the help.
# ---------------------------------------------------------------------------------------------
def field_docs(cls):
    """{field: the docstring written under it in the source of the class or of the dataclass it
    extends}."""
    docs = {}
    for c in reversed([c for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]):
        body = ast.parse(inspect.getsource(c)).body[0].body
        docs.update(
            {
                a.target.id: b.value.value
                for a, b in zip(body, body[1:])
                if isinstance(a, ast.AnnAssign)
            }
        )
    return docs


def boolean(text):
    """--flag, --flag true/false/1/0/yes/no; anything else is refused (never silently False)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
        str(text).lower()
    )
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def parse_args(cls, argv, task_defaults, presets, choices, prog):
    """An instance of `cls`: its defaults, then the task's defaults, then the preset's values
    (`presets(spec)` -> {flag: (value, preset name)}), then the flags given; `args.sources` says
    where each value that is not a default comes from."""
    docs, default = field_docs(cls), cls()
    p = OneLineParser(
        prog=prog,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Flags take --name value or --name=value; a bare boolean flag means true.",
    )
    groups = {}  # one --help group per flag class, in the order the class lists them
    for c in [c for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]:
        group = p.add_argument_group(c.__doc__.splitlines()[0] if c.__doc__ else c.__name__)
        groups.update({name: group for name in vars(c).get("__annotations__", {})})
    for f in sorted(fields(cls), key=lambda f: list(groups.values()).index(groups[f.name])):
        kw = (
            {"nargs": "?", "const": True, "type": boolean, "metavar": "BOOL"}
            if f.type is bool
            else {
                "type": f.type,
                "metavar": f.type.__name__.upper(),
                "choices": choices.get(f.name),
            }
        )
        groups[f.name].add_argument(
            "--" + f.name.replace("_", "-"),
            default=argparse.SUPPRESS,
            **kw,
            help=docs[f.name].replace("%", "%%") + f" [default {getattr(default, f.name)!r}]",
        )
    given = vars(p.parse_args(sys.argv[1:] if argv is None else argv))
    args, sources = cls(), {}  # sources: where each value not a default comes from
    task = task_defaults.get(given.get("task", args.task), {})
    try:  # presets(spec) -> {flag: (value, preset name)}
        preset = presets(given.get("preset", args.preset))
    except ValueError as e:
        p.error(str(e))
    for k, v in task.items():
        setattr(args, k, v)
        sources[k] = "task"
    for k, (v, name) in preset.items():
        setattr(args, k, v)
        sources[k] = f"preset {name}"
    for k, v in given.items():
        setattr(args, k, v)
        sources[k] = "flag"
    args.sources = sources
    return check_engine_flags(args) if isinstance(args, EngineFlags) else args


@dataclass
class EngineFlags:
    """Engine: how a run uses the hardware (the algorithm's flags are grpo_vlm.Args)"""

    micro_batch_size: int = 16
    """completions per forward/backward; gradients accumulate to the full B * G batch"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory"""
    logp_chunk: int = 1024
    """tokens per chunk when computing log-probs (the [tokens, vocab] logits never exist at once)"""
    rollout_batch_size: int = 0
    """completions that decode at once in the rollout, a multiple of G: bounds the KV cache (0: all
    of this process's)"""
    fsdp: bool = False
    """shard weights, gradients and optimizer state over the torchrun processes with FSDP2 (default
    engine: DDP)"""
    lora_r: int = 0
    """LoRA rank (0: full fine-tune); the reference is then the same model with its adapters off, no
    copy"""
    lora_alpha: float = 0.0
    """LoRA's alpha: the update is alpha / r * B A (0: 2 * --lora-r)"""
    lora_targets: str = ""
    """regex of the module names LoRA wraps (empty: the language model's attention and MLP
    projections)"""
    merge_lora: bool = False
    """with LoRA: also save final-merged/, the adapters merged into fp32 weights (loads without
    peft)"""
    optim: str = "adamw"
    """adamw (fp32 moments), or adamw8bit (8-bit moments: bitsandbytes', torchao's under --fsdp)"""
    plan: bool = False
    """print the expected peak memory per GPU of this run's rollout and training, part by part, and
    exit"""
    processes: int = 0
    """GPUs that --plan plans for (0: this launch's processes)"""
    gpu_memory: float = 79.6
    """GiB of one GPU that --plan compares the peak with (79.6: an 80 GB card)"""
    image_size: str = "640x480"
    """WxH of the image that --plan counts each prompt's image tokens at"""
    dist_timeout: float = 1800.0
    """seconds a collective waits for the other torchrun processes (a lost or stuck node) before all
    stop with one line"""


ENGINE_CHOICES = {"optim": ("adamw", "adamw8bit")}


@dataclass
class RunFlags:
    """Run: the model, the output folder, checkpoints and the alarms"""

    model: str = ""
    """HF hub id or local path of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 or Gemma 3 model (other
    families are refused); empty: the task's shipped tiny model"""
    output_dir: str = ""
    """where metrics.jsonl, checkpoints and the final model go (empty: runs/TASK)"""
    seed: int = 0
    """seed of prompt order, sampling and init"""
    min_completion_length: int = 0
    """no EOS before this many new tokens (benchmarks force equal work with it; 0: off)"""
    freeze_vision: bool = False
    """freeze the whole vision tower, merger included (VLM-R1's --freeze_vision_modules)"""
    save_every: int = 250
    """write an atomic checkpoint (model, optimizer, schedule, RNG, data position) every N steps (0:
    never)"""
    resume: str = ""
    """continue from this checkpoint, or from the latest checkpoint in this output folder"""
    max_bad_steps: int = 3
    """stop, with a checkpoint, after this many steps in a row with a non-finite loss or gradient"""
    max_logp_gap: float = 0.0
    """stop at step 1 if rollout and training log-probs differ by more than this per token on
    average, or 50x this at any token (0: 1e-4 in fp32, 0.02 under bf16 autocast; negative:
    never)"""


@dataclass
class LogFlags:
    """Logging: progress, sample completions, held-out evaluation, TensorBoard or W&B"""

    sample_every: int = 100
    """print a few sample completions every N steps"""
    report_to: str = "none"
    """also log metrics.jsonl's rows and the sample completions to tensorboard (events in
    --output-dir) or wandb"""
    eval_every: int = 250
    """greedy eval of the synthetic test/ood splits (not with --train-data) and --eval-data every N
    steps (0: never)"""
    eval_n: int = 128
    """held-out images per split for --eval-every"""


def check_engine_flags(args):
    """The engine's flags that do not go together, refused with one line before anything loads."""
    if not args.lora_r:
        for name in ("lora_alpha", "lora_targets", "merge_lora"):
            if getattr(args, name):
                sys.exit(
                    f"error: --{name.replace('_', '-')} is a LoRA flag: give --lora-r too (the "
                    "adapters' rank)"
                )
    if args.lora_r < 0:
        sys.exit(f"error: --lora-r {args.lora_r}: the rank must be positive (0: full fine-tune)")
    if args.lora_r and args.fsdp:
        sys.exit(
            "error: --fsdp with --lora-r is not built: drop --fsdp (LoRA's weights and optimizer "
            "fit one GPU)"
        )
    if args.dist_timeout <= 0:
        sys.exit(f"error: --dist-timeout {args.dist_timeout:g}: give a positive number of seconds")
    try:
        re.compile(args.lora_targets)
    except re.error as e:
        sys.exit(f"error: --lora-targets {args.lora_targets!r} is not a regular expression: {e}")
    return args


# ---------------------------------------------------------------------------------------------
# Data, checked before any model loads.
# ---------------------------------------------------------------------------------------------
def load_data(args, model_path, splits):
    """(rows, bad rows, held-out splits {name: rows}), all checked before a weight loads: the
    training rows (data.load_rows); with --eval-every, the synthetic held-out `splits` when there is
    no --train-data, and --eval-data as the split "eval". The training and --eval-data prompts must
    fit in --max-prompt-length tokens, image tokens included, counted with the tokenizer and image
    processor of `model_path` (vlm.adapter: no weight is loaded): a longer row stops the run with
    one line, or is skipped and listed with --skip-bad-rows."""
    rows, bad = data.load_rows(args)
    prompt = rewards.prompt_template(args.task, args.preset)  # a paper preset's prompt, or None
    rows, held, evaluating = data.with_prompt(rows, prompt), {}, args.eval_every > 0
    try:
        if evaluating and not args.train_data:
            held = {
                s: data.with_prompt(data.synthetic_split(s, args.eval_n, args.task), prompt)
                for s in splits
            }
        if evaluating and args.eval_data:
            held["eval"], bad_eval = data.load_eval_rows(args)
            held["eval"] = data.with_prompt(held["eval"], prompt)
            bad += bad_eval
        if args.max_prompt_length > 0:
            family = vlm.adapter(model_path)

            def fitting(part):
                return data.refuse_long(
                    part,
                    vlm.prompt_lengths(family, part),
                    args.max_prompt_length,
                    args.skip_bad_rows,
                    bad,
                )

            rows = fitting(rows)
            if "eval" in held:
                held["eval"] = fitting(held["eval"])
    except data.BadInput as e:
        sys.exit(f"error: {e}")
    return rows, bad, held


def encode(family, rows, step, args, device):
    """family.encode, where an image that passed the upfront check but fails now (changed on disk?)
    stops the run with one line."""
    try:
        return family.encode(rows, device)
    except data.BadInput as e:
        sys.exit(
            f"error: {e} (step {step}; last checkpoint in {args.output_dir}; --resume after fixing "
            "it)"
        )


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun). PyTorch's DDP averages gradients; the trainer gathers rewards and
# masks.
# ---------------------------------------------------------------------------------------------
def setup_distributed(args=None):
    """(rank, world size, device); a single process when not launched by torchrun. --fsdp needs
    torchrun's processes (it shards over them) and is refused here, before a weight loads, without
    them (with LoRA: check_engine_flags). On one node or several alike: a process's identity is the
    environment torchrun sets (RANK, LOCAL_RANK, GROUP_RANK), never a flag; every collective waits
    at most --dist-timeout seconds, and a lost process stops the others with one line
    (watch_peers)."""
    if getattr(args, "fsdp", False) and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        sys.exit(
            "error: --fsdp shards the model over torchrun's processes: launch with torchrun "
            "--nproc_per_node N"
        )
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    seconds = getattr(args, "dist_timeout", EngineFlags.dist_timeout)
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    watch_peers(rank, world, seconds, getattr(args, "output_dir", ""))
    return rank, world, device


# ---------------------------------------------------------------------------------------------
# A lost process. A collective that fails (a peer's connection reset, or --dist-timeout spent)
# raises in every process that waits on it; an uncaught one ends the process with one line naming
# the processes whose heartbeat stopped. The heartbeat: each process counts up a key of torchrun's
# rendezvous store (MASTER_ADDR:MASTER_PORT) every BEAT seconds from a thread.
# ---------------------------------------------------------------------------------------------
BEAT = 1.0
PEERS = {}


def node_name(rank=None):
    """How a line names a process: its rank, node (torchrun's GROUP_RANK) and host."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    return f"rank {rank} (node {os.environ.get('GROUP_RANK', '?')}, host {socket.gethostname()})"


def watch_peers(rank, world, seconds, output_dir):
    """Start this process's heartbeat, publish its name, and install the hook that turns an uncaught
    collective failure into one line (lost_line) and exit status 1, without a traceback or a hang
    in the interpreter's teardown (os._exit)."""
    if world == 1:
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    prefix = f"grpo-vlm/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
    prefix += f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    timeout = datetime.timedelta(seconds=min(seconds, 30))
    store = torch.distributed.PrefixStore(
        prefix, torch.distributed.TCPStore(addr, port, is_master=False, timeout=timeout)
    )
    store.set(f"who/{rank}", node_name(rank))
    PEERS.update(store=store, rank=rank, world=world, seconds=seconds, where=f"{addr}:{port}")
    PEERS["output_dir"] = output_dir

    done = threading.Event()

    def beat():
        while not done.wait(BEAT):
            try:
                store.add(f"beat/{rank}", 1)
            except Exception:  # the store's host is gone: lost_line says so
                return

    thread = threading.Thread(target=beat, daemon=True, name="grpo-vlm-heartbeat")
    thread.start()
    # stopped before the interpreter's teardown (by finish, else at exit): a daemon thread caught
    # there inside the store's C++ call could abort the process
    PEERS["stop"] = lambda: (done.set(), thread.join(timeout=2 * BEAT))
    atexit.register(PEERS["stop"])
    previous = sys.excepthook

    def hook(kind, error, tb):
        if not collective_failure(error):
            return previous(kind, error, tb)
        sys.stdout.flush()
        print(f"error: {lost_line(error)}", file=sys.stderr, flush=True)
        os._exit(1)

    sys.excepthook = hook


def collective_failure(error):
    """Whether an exception (or one it was raised from) is a failed collective or store."""
    while error is not None:
        text = str(error)
        if isinstance(error, torch.distributed.DistError) or (
            isinstance(error, RuntimeError)
            and any(s in text for s in ("gloo", "NCCL", "ProcessGroup", "Connection reset"))
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def lost_line(error):
    """One line: which processes were lost (their heartbeat stood still for 3 beats), what failed,
    and where to resume from."""
    store, rank, world = PEERS["store"], PEERS["rank"], PEERS["world"]
    reason = " ".join(str(error).split())
    reason = re.sub(r"^\[[^\]]*\] ", "", reason).split(". This is typically")[0][:200]
    try:
        store.set(f"gone/{rank}", "1")  # stopping on its own: not lost
        others = [r for r in range(world) if r != rank]
        before = [store.add(f"beat/{r}", 0) for r in others]
        time.sleep(3 * BEAT)
        after = [store.add(f"beat/{r}", 0) for r in others]
        lost = [
            store.get(f"who/{r}").decode() if store.check([f"who/{r}"]) else f"rank {r}"
            for r, a, b in zip(others, before, after)
            if a == b and not store.check([f"gone/{r}"])
        ]
        what = (
            "lost " + ", ".join(lost)
            if lost
            else "no process was lost, but a collective failed (a stuck process? a longer "
            "--dist-timeout?)"
        )
    except Exception:
        what = f"lost the node of torchrun's rendezvous store {PEERS['where']}"
    last = latest_checkpoint(PEERS["output_dir"]) if PEERS["output_dir"] else None
    again = f"--resume {last} once every node is back" if last else "no checkpoint yet"
    return (
        f"{what}: {reason}; {node_name(rank)} stops (--dist-timeout "
        f"{PEERS['seconds']:g} s); {again}"
    )


class Processes:
    """This run's processes, as the algorithm sees them: all of them together (gather), this
    process's share of a batch (mine), the loss scale that undoes DDP's averaging, and no_sync.
    grpo_vlm.py never names a rank or the process count."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device
        self.main = rank == 0  # the process that writes logs, checkpoints and the final model
        # DDP and FSDP2 average the processes' gradients; each process's objective is scaled by the
        # process count, so the gradient is that of the sum of all processes' objectives
        self.scale = world

    def gather(self, x):
        """Every process's rows of `x`, in process order."""
        return gather(x.to(self.device), self.world)

    def mine(self, rows):
        """This process's share of `rows` (a list, range or tensor of the whole batch)."""
        n = len(rows) // self.world
        return rows[self.rank * n : (self.rank + 1) * n]

    def widest(self, n):
        """The largest n over the processes (a batch's width, so that every share gathers)."""
        return int(all_max(torch.tensor(n, device=self.device), self.world))

    def round_down(self, n):
        """The most rows, up to n, that the processes can share equally."""
        return n - n % self.world

    def no_sync(self, policy, last):
        """DDP syncs gradients in the last micro-batch only (FSDP2 in each: Policy.no_sync)."""
        return policy.no_sync() if self.world > 1 and not last else contextlib.nullcontext()

    def barrier(self):
        barrier(self.world)


def processes(args):
    """torchrun's processes (or this one alone), with B checked against their number."""
    procs = Processes(*setup_distributed(args))
    if args.prompts_per_step % procs.world:
        sys.exit(
            f"error: --prompts-per-step {args.prompts_per_step} must be a multiple of the "
            f"{procs.world} processes"
        )
    return procs


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


def all_max(x, world):
    if world > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


class Policy(torch.nn.Module):
    """The training forward (completion log-probs) as one module, so DDP or FSDP2 can wrap exactly
    what backward runs. The reference is one too; `context` is entered around each forward (LoRA's
    reference: the adapters off)."""

    def __init__(self, model, family, T, chunk, context=contextlib.nullcontext):
        super().__init__()
        self.model, self.family, self.T, self.chunk, self.context = model, family, T, chunk, context

    def forward(self, packed):
        # a copy, not a view: FSDP2 hooks its backward onto the output (a view's hook can be lost)
        with self.context():
            return vlm.packed_logps(self.model, self.family, packed, self.T, self.chunk).clone()

    def gather(self):
        """FSDP2 (a registered forward method, so the root's own hooks gather the root's weights
        first): every layer's weights gathered now and kept until gathered() frees them."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.modules():
            if isinstance(m, FSDPModule) and m is not self:
                m.unshard()

    def no_sync(self):
        """FSDP2 reduce-scatters each micro-batch's gradients into the shards: accumulating them
        unsharded instead (DDP's no_sync) would hold a whole copy of the gradients, the memory FSDP2
        is there to save."""
        return contextlib.nullcontext()


def engine(args, model, family, state, procs):
    """(policy, optimizer): the training forward wrapped by the multi-process engine (DDP; FSDP2
    with --fsdp) and the optimizer (--optim) over the trainable weights (under FSDP2 their shards),
    its state restored on a resume."""
    module = Policy(model, family, args.temperature, args.logp_chunk)
    world, device = procs.world, procs.device
    policy = fsdp(module, world, device) if args.fsdp else ddp(module, world, device)
    opt = optimizer(
        args, [p for p in model.parameters() if p.requires_grad]
    )  # with LoRA: A and B only
    if state:
        load_optimizer(args, model, opt, state)
    return policy, opt


def optimizer(args, params):
    """AdamW without weight decay (as VLM-R1's GRPO runs): fp32 moments, or with --optim adamw8bit
    8-bit ones (block-wise quantized m and v, a quarter of the memory): bitsandbytes' AdamW8bit, or
    torchao's under --fsdp, because bitsandbytes' fails on FSDP2's sharded (DTensor) weights."""
    if args.optim == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if not args.fsdp:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=args.lr, weight_decay=0.0)
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        sys.exit(f"error: --optim adamw8bit with --fsdp needs torchao (pip install torchao): {e}")
    return AdamW8bit(params, lr=args.lr, weight_decay=0.0)


def set_lr(opt, lr):
    """Set (and return) the learning rate of every parameter group; in place where it is a tensor
    (torchao's 8-bit AdamW refuses a float written over it)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return lr


def ddp(module, world, device):
    """DDP around the module whose forward the training step calls (the others wait on its
    gradients)."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # the gradients live in DDP's buckets (no second copy of them), as long as they are zeroed,
    # never set to None
    return DistributedDataParallel(
        module,
        device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None,
        broadcast_buffers=False,  # same weights loaded; buffers are constants
        gradient_as_bucket_view=True,
    )


def fsdp(module, world, device, reshard_root=False):
    """FSDP2 over an infra.Policy: each decoder layer and vision block (the HF model's
    _no_split_modules) is a unit whose weights are gathered just before it runs and freed after; the
    Policy is the root, for the rest (embeddings, lm_head, norms, the vision merger). The root must
    be the module whose forward the step calls: the packed forward calls submodules, never the HF
    model's forward, so an HF root's hooks would never gather its own weights. On a GPU the gathered
    weights are bf16 (the master weights stay fp32) and gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.split(":")[0], (world,))
    bf16 = device.startswith("cuda")
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    units = set(module.model._no_split_modules or ())
    for m in module.model.modules():
        if type(m).__name__ in units:
            fully_shard(m, mesh=mesh, mp_policy=mp)
    # the root's weights stay gathered from forward to backward, as FSDP2 does by default (the
    # reference: freed)
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_root)
    register_fsdp_forward_method(module, "gather")
    return module


@contextlib.contextmanager
def gathered(policy):
    """Under FSDP2, all of the policy's weights gathered once for a block that calls the HF model
    directly (the rollout's prefill and decode steps, the held-out eval) and freed after it. Left to
    FSDP2, every decoded token would gather every layer again (5.5 GB per token at 3B in bf16).
    Other engines: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(policy, FSDPModule):
        yield
        return
    policy.set_reshard_after_forward(False)
    try:
        policy.gather()
        yield
    finally:
        policy.set_reshard_after_forward(True)
        policy.set_reshard_after_forward(False, recurse=False)  # the root, as fsdp() set it
        for m in policy.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def reference(args, ref, path, device):
    """pi_ref as a forward (infra.Policy). Under --fsdp it stays whole on each process when the
    memory plan fits it (no gathers: the reference runs once per micro-batch), else it is sharded as
    the policy is."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not args.fsdp or plan.reference_whole(args, path, world):
        return ref
    return fsdp(ref, world, device, reshard_root=True)


@dataclass
class Stats:
    """A step's statistics, summed over this process's tokens (tensors: no host sync in the loop):
    the objective J (loss), the KL, the clipped tokens, and logp_gap, |log-prob of the rollout - of
    the training forward| (the sampler and the trainer must agree on pi_old), with its maximum."""

    loss: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    logp_gap: torch.Tensor
    logp_gap_max: torch.Tensor
    # the same difference as a ratio pi_train / pi_rollout: its sum, maximum, and tokens outside
    # [0.5, 2] (what truncated importance sampling, --tis-cap, corrects)
    ratio: torch.Tensor
    ratio_max: torch.Tensor
    ratio_outside: torch.Tensor
    grad_norm: torch.Tensor = None  # of the last update
    skipped: int = 0  # updates skipped for a non-finite loss or gradient

    @classmethod
    def zeros(cls, device):
        return cls(*(torch.zeros((), device=device) for _ in range(8)))

    def add_gap(self, logp, logp_rollout, mask):
        """logp_gap of a micro-batch: the training forward's log-probs against the rollout's."""
        diff = logp.detach() - logp_rollout
        gap = diff.abs() * mask
        self.logp_gap += gap.sum()
        self.logp_gap_max = torch.maximum(self.logp_gap_max, gap.max())
        ratio = torch.exp(diff) * mask
        self.ratio += ratio.sum()
        self.ratio_max = torch.maximum(self.ratio_max, ratio.max())
        self.ratio_outside += (((ratio < 0.5) | (ratio > 2)) * mask).sum()


def optimizer_step(model, opt, J, procs, args):
    """Clip the gradients (synced by DDP or FSDP2) and step, unless some process's objective J or
    the gradient is not finite: then skip this update rather than poison the weights. Returns (the
    gradient norm, whether the update was made)."""
    grad_norm = clip_grad_norm(model, args.max_grad_norm)
    finite = all_sum(torch.isfinite(J).float(), procs.world).item() == procs.world
    made = finite and bool(torch.isfinite(grad_norm))
    if made:
        opt.step()
    # freed for the rollout; DDP's gradients are views of its buckets, zeroed, never None
    opt.zero_grad(set_to_none=procs.world == 1 or args.fsdp)
    return grad_norm, made


def clip_grad_norm(model, max_norm):
    """The gradients' global norm, clipped to max_norm; under FSDP2 the norm of the whole gradient,
    not of a shard."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ---------------------------------------------------------------------------------------------
# Checkpoints: model (save_pretrained), optimizer, step, prompt sampler state and RNG state, written
# to a temporary folder and renamed, so a crash mid-write never leaves a half checkpoint behind. The
# learning rate is a function of the step, so the step is the schedule's whole state.
# ---------------------------------------------------------------------------------------------
RUN_DEFINING = (
    "model",
    "task",
    "train_data",
    "seed",
    "prompts_per_step",
    "num_generations",
    "train_size",
    "freeze_vision",
    "sft_steps",
    "problem_key",
    "solution_key",
    "image_key",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "optim",
    "fsdp",
)


def save_state(args, step, model, family, opt, rng, extra, rank=0, world=1):
    """Every process calls it; the main process writes the checkpoint to a temporary folder and
    renames it. Under --fsdp the weights are gathered from all processes, and each writes its shard
    of the optimizer state. Returns the checkpoint's path."""
    final = os.path.join(args.output_dir, f"checkpoint-{step:06d}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step:06d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    weights = full_weights(args, model)
    if args.fsdp:
        barrier(
            world
        )  # the temporary folder is gone before the processes write their optimizer shards into it
        save_optimizer_shards(model, opt, os.path.join(tmp, "optimizer"))
    if rank != 0:
        return final
    family.save(model, tmp, weights)
    torch.save(
        {
            "step": step,
            "args": vars(args),
            "optimizer": None if args.fsdp else opt.state_dict(),
            "prompt_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            **extra,
        },
        os.path.join(tmp, "trainer_state.pt"),
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(glob.glob(os.path.join(args.output_dir, "checkpoint-*")))[
        :-2
    ]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    print(f"saved checkpoint {final}", flush=True)
    return final


def checkpoint(args, step, model, family, opt, rng, extra, rank, world):
    """A checkpoint (save_state) on every process; the others wait until the main process has
    written it."""
    path = save_state(args, step, model, family, opt, rng, extra, rank, world)
    barrier(world)
    return path


def full_weights(args, model):
    """Under --fsdp: the whole model's weights gathered onto the main process's CPU (a collective:
    every process calls it; the others get {}), for save_pretrained; else None (save_pretrained
    reads the model). A tied weight comes back as two copies (lm_head and the embeddings): its alias
    is dropped, or it would be written twice."""
    if not args.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    return {k: v for k, v in weights.items() if k not in aliases}


def save_optimizer_shards(model, opt, folder):
    """Under --fsdp, the optimizer state in PyTorch's distributed checkpoint format: each process
    writes its own shards (nothing is gathered: fp32 AdamW's moments are 8 bytes a weight), keyed by
    weight name, so a resume may shard them over another number of processes. torchao's 8-bit
    moments round-trip exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)


def load_optimizer(args, model, opt, state):
    """The optimizer state of a checkpoint, back into `opt` (under --fsdp each process reads its
    shards; this must run before any gradient exists: FSDP2 builds the state it loads into with a
    step on zero gradients)."""
    if not args.fsdp:
        return opt.load_state_dict(state["optimizer"])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    sharded = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(sharded, checkpoint_id=os.path.join(state["checkpoint"], "optimizer"))
    set_optimizer_state_dict(model, opt, sharded["optimizer"])


def save_or_stop(args, step, bad_steps, run, rng):
    """At the end of a step: a checkpoint every --save-every steps and at the last; after
    --max-bad-steps non-finite steps in a row, or a signal to any process, a checkpoint and a
    stop."""
    procs, extra = run.procs, {"bad_steps": bad_steps}
    state = (args, step, run.model, run.family, run.opt, rng, extra, procs.rank, procs.world)
    if bad_steps >= args.max_bad_steps:
        path = checkpoint(*state)
        sys.exit(
            f"error: {bad_steps} steps in a row had a non-finite loss or gradient (lower --lr?); "
            f"weights before them saved in {path}"
        )
    stop = interrupted(procs.world, procs.device)
    if stop or (args.save_every and (step % args.save_every == 0 or step == args.steps)):
        path = checkpoint(*state)
        if stop:
            say(procs.main, f"interrupted at step {step}: resume with --resume {path}")
            sys.exit(128 + stop)


def latest_checkpoint(path):
    """`path` itself if it is a checkpoint, else the latest checkpoint-* inside it, else None."""
    if os.path.exists(os.path.join(path, "trainer_state.pt")):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.pt")))
    return os.path.dirname(found[-1]) if found else None


def find_checkpoint(path):
    """latest_checkpoint(path), or a stop with one line where there is none."""
    found = latest_checkpoint(path)
    if not found:
        sys.exit(
            f"error: --resume {path}: no checkpoint there (expected trainer_state.pt or "
            "checkpoint-*/)"
        )
    return found


SHARED = ": --output-dir (and --resume) must be on a file system that every node shares"


def shared_checkpoint(args):
    """The checkpoint --resume names (None without --resume), checked on every process before the
    first step. With several processes the main one writes a marker with a fresh token in
    --output-dir; every process reads it back and looks for the checkpoint itself, and all gather
    what each saw. Where one does not see the marker or the same checkpoint (each node writing to
    its own disk), every process stops, with one line per node naming the node and the path: a
    resume never starts fresh, or from another checkpoint, on some nodes."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world == 1:
        return find_checkpoint(args.resume) if args.resume else None
    rank = torch.distributed.get_rank()
    marker = os.path.join(args.output_dir, ".shared-disk-check")
    token = [f"{random.SystemRandom().getrandbits(64):016x} {node_name()}" if rank == 0 else None]
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token[0])
    torch.distributed.broadcast_object_list(token, src=0)  # after the marker is written
    try:
        with open(marker) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    found = latest_checkpoint(args.resume) if args.resume else None
    views = [None] * world
    torch.distributed.all_gather_object(
        views, (node_name(), os.path.abspath(marker), seen, found and os.path.abspath(found))
    )
    if rank == 0:
        os.remove(marker)
    ckpts = [os.path.basename(v[3]) if v[3] else None for v in views]
    if args.resume and any(ckpts):
        ref = next(r for r in range(world) if ckpts[r])
        for who, _, _, path in (v for r, v in enumerate(views) if ckpts[r] != ckpts[ref]):
            sees = f"sees {path}" if path else "sees no checkpoint in --resume " + args.resume
            stop(f"{who} {sees}, where {views[ref][0]} sees {views[ref][3]}{SHARED}")
    elif args.resume:
        find_checkpoint(args.resume)  # none anywhere: the one-process line, on every process
    for who, path, seen, _ in views:
        if not seen:
            stop(f"{who} does not see {path}, the marker {views[0][0]} wrote{SHARED}")
    return found


def stop(line):
    """Every process stops (status 1); the first of each node prints the line, so that each node's
    log shows it once."""
    sys.exit(f"error: {line}" if os.environ.get("LOCAL_RANK", "0") == "0" else 1)


def resume(args, defaults, rng):
    """(checkpoint folder, its state) of --resume, with the prompt sampler and torch's RNG set back
    to it; refused with one line if a flag that defines the run differs, or if some process does not
    see --output-dir or the checkpoint (shared_checkpoint: every process calls this)."""
    ckpt = shared_checkpoint(args)  # with several processes: seen by all of them
    if not ckpt:
        return None, None
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    changed = [
        k for k in RUN_DEFINING if state["args"].get(k, getattr(defaults, k)) != getattr(args, k)
    ]
    if changed:
        sys.exit(
            f"error: --resume {ckpt} was made with different "
            + ", ".join(
                f"--{k.replace('_', '-')} ({state['args'][k]!r} there, {getattr(args, k)!r} here)"
                for k in changed
            )
        )
    rng.setstate(state["prompt_rng"])
    torch.set_rng_state(state["torch_rng"])
    return ckpt, {**state, "checkpoint": ckpt}  # where --fsdp's optimizer shards are


def lr_at(args, step):
    """Linear warm-up over --warmup-steps, then constant or linear decay to 0 at --steps."""
    warm = min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_schedule == "linear":
        return (
            args.lr
            * warm
            * min(1.0, max(0.0, (args.steps - step + 1) / max(1, args.steps - args.warmup_steps)))
        )
    return args.lr * warm


CUDA = torch.cuda.is_available()
M32 = 0xFFFFFFFF


def hash32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32), elementwise on an int64 tensor."""
    x = x & M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    return x ^ (x >> 16)


def sample_keys(seed, step, indices):
    """One key per completion: its global index in the step's batch, hashed with the seed and step.
    Each token's uniform draw hashes the key with its position (grpo_vlm.draw), so a completion
    depends only on the model and its index: one process or two, before or after a resume, the same
    completions are drawn."""
    base = hash32(hash32(torch.tensor(seed)) + step)
    return hash32(base + torch.as_tensor(indices))


def prompt_sampler(seed):
    """The prompt sampler (its state is the data position); torch's RNG seeded alongside."""
    torch.manual_seed(seed)
    return random.Random(seed)


# ---------------------------------------------------------------------------------------------
# Logs: metrics.jsonl (main process only), progress lines, curves; --report-to sends the same rows
# elsewhere.
# ---------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl, written by the main process. A resumed run keeps the rows up to its
    checkpoint's step and drops those written after it (they will be written again). With
    `args.report_to`, every row also goes to TensorBoard or W&B (Reporter), from the main process
    only."""

    def __init__(self, output_dir, main, resumed_at=None, args=None):
        self.path, self.main = os.path.join(output_dir, "metrics.jsonl"), main
        self.resumed_at = resumed_at
        os.makedirs(output_dir, exist_ok=True)
        kept = []
        if resumed_at is not None and os.path.exists(self.path):
            kept = [
                x
                for x in open(self.path)
                if x.strip() and json.loads(x).get("step", 0) <= resumed_at
            ]
        self.file = open(self.path, "w") if main else None
        if main:
            self.file.writelines(kept)
            self.file.flush()
        report_to = getattr(args, "report_to", "none")
        self.report = (
            Reporter(report_to, output_dir, vars(args), resumed_at)
            if main and report_to != "none"
            else None
        )

    def write(self, row, line=None):
        """Append a row; print `line` (the progress line) on the main process."""
        if self.main:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            if self.report:
                self.report.scalars(row)
            if line:
                print(line, flush=True)

    def step(self, m, args, batch, bad_steps):
        """A step's row and progress line; every --sample-every steps a few of its completions, also
        to --report-to."""
        self.write(m, step_line(m, args, batch, bad_steps))
        if self.report and sample_due(args, m["step"]):
            G, rows = args.num_generations, batch.rows
            samples = [
                {
                    "problem": rows[i // G]["problem"],
                    "solution": rows[i // G]["solution"],
                    "completion": batch.texts[i],
                    "reward": float(batch.r[i]),
                }
                for i in range(0, len(batch.texts), G)
            ]
            self.report.samples(m["step"], samples[:4])

    def close(self):
        if self.main:
            self.file.close()
            if self.report:
                self.report.close()


REPORT_TO = ("none", "tensorboard", "wandb")


class Reporter:
    """--report-to: each row of metrics.jsonl as scalars named by its keys (reward, reward_iou, kl,
    test_acc50, ...) against its step (the cold start's sft_loss against sft_step), and a table of
    sample completions.
      tensorboard: event files in the output folder (tensorboard --logdir runs); a resume drops
                   the events after the checkpoint, as metrics.jsonl drops the rows
      wandb:       a run in OUTPUT/wandb, project $WANDB_PROJECT or grpo-vlm; WANDB_MODE=offline
                   needs no account
    Each library is imported here, only when asked for."""

    def __init__(self, kind, output_dir, config, resumed_at=None):
        self.kind = kind
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.writer = SummaryWriter(
                    output_dir,
                    flush_secs=10,
                    purge_step=None if resumed_at is None else resumed_at + 1,
                )
            elif kind == "wandb":
                import wandb

                self.wandb = wandb
                self.run = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", "grpo-vlm"),
                    dir=output_dir,
                    name=os.path.basename(os.path.normpath(output_dir)),
                    config=config,
                )
                self.run.define_metric("sft_loss", step_metric="sft_step")
                self.run.define_metric("*", step_metric="step")
            else:
                raise ValueError(f"unknown --report-to {kind!r}; choose from {REPORT_TO}")
        except ImportError as e:
            sys.exit(
                f"error: --report-to {kind} needs the {kind} package (pip install {kind}): {e}"
            )
        except Exception as e:  # e.g. wandb online without an account
            hint = (
                " (no W&B account? WANDB_MODE=offline writes the run locally)"
                if kind == "wandb"
                else ""
            )
            sys.exit(
                f"error: --report-to {kind}: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}{hint}"
            )

    def scalars(self, row):
        x = "sft_step" if "sft_step" in row else "step"
        values = {
            k: float(v)
            for k, v in row.items()
            if k not in ("step", "sft_step")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, row[x])
        else:
            self.run.log(
                {
                    "step": row["step"],
                    **({"sft_step": row["sft_step"]} if x == "sft_step" else {}),
                    **values,
                }
            )

    def samples(self, step, samples):
        """A table of sample completions: problem, solution, completion, reward."""
        cols = ["problem", "solution", "completion", "reward"]
        if self.kind == "tensorboard":
            cell = lambda v: " ".join(str(v).split()).replace("|", "\\|").replace("<", "&lt;")  # noqa: E731
            table = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
            table += [
                "| "
                + " | ".join(cell(f"{s[c]:.3f}" if c == "reward" else s[c]) for c in cols)
                + " |"
                for s in samples
            ]
            self.writer.add_text("samples", "\n".join(table), step)
        else:
            self.run.log(
                {
                    "step": step,
                    "samples": self.wandb.Table(
                        columns=["step", *cols],
                        data=[
                            [step, s["problem"], str(s["solution"]), s["completion"], s["reward"]]
                            for s in samples
                        ],
                    ),
                }
            )

    def close(self):
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.run.finish()


def say(main, *lines):
    if main:
        print(*lines, sep="\n", flush=True)


EVAL_LINE = (
    "acc50",
    "center_error",
    "area_ratio",
    "right_object",
    "accuracy",
    "mae",
    "map",
    "ap50",
    "pred_per_gt",
)


def eval_line(step, ev):
    """One progress line of a held-out eval's metrics."""
    return f"eval step {step}: " + " ".join(
        f"{k}={v:.3f}" for k, v in ev.items() if k.endswith(EVAL_LINE)
    )


def step_row(args, procs, step, batch, every, stats, **extra):
    """The step's row of metrics.jsonl: named statistics of every process's rows, the sums divided
    by the token count. `every`: the rewards, masks and cut-off flags of all processes' rows."""
    r, mask, world, G = every.r, every.mask, procs.world, args.num_generations
    n_tok, rg = mask.sum().item(), r.view(-1, G)
    sums = dict(loss=stats.loss, kl=stats.kl, clipped=stats.clipped, logp_gap=stats.logp_gap)
    sums.update(ratio=stats.ratio, ratio_outside=stats.ratio_outside)
    sums["entropy"] = (batch.H * batch.mask).sum()
    s = dict(zip(sums, all_sum(torch.stack(list(sums.values())), world).tolist()))
    gap_max, ratio_max = all_max(torch.stack([stats.logp_gap_max, stats.ratio_max]), world).tolist()
    gathered = {k: gather(v.to(r.device), world) for k, v in batch.components.items()}
    return {
        "step": step,
        "reward": r.mean().item(),
        "reward_std": r.std().item(),
        **{f"reward_{k}": v.mean().item() for k, v in gathered.items()},
        "loss": s["loss"] / args.mu,
        "kl": s["kl"] / n_tok,
        "clip_frac": s["clipped"] / n_tok,
        "logp_gap": s["logp_gap"] / n_tok,
        "logp_gap_max": gap_max,
        "train_rollout_ratio_mean": s["ratio"] / n_tok,
        "train_rollout_ratio_max": ratio_max,
        "train_rollout_ratio_outside": s["ratio_outside"] / n_tok,
        "entropy": s["entropy"] / n_tok,
        "completion_len": n_tok / len(mask),
        "grad_norm": float(stats.grad_norm),
        **({"gpu_peak_gib": torch.cuda.max_memory_allocated() / plan.GiB} if CUDA else {}),
        # the share of groups whose rewards are all equal (no signal), and of completions cut off
        "frac_reward_zero_std": (rg.amax(1) == rg.amin(1)).float().mean().item(),
        "truncated_frac": every.cut.mean().item(),
        **batch.dynamic,  # DAPO's dynamic sampling: rollouts spent, shortfall
        **(tool_stats(batch.turns, r, world) if batch.turns else {}),
        **rewards.rollout_stats(args.task, batch.texts, batch.truths),
        **extra,
        **({"skipped_updates": stats.skipped} if stats.skipped else {}),
    }


def tool_stats(turns, r, world):
    """The zoom tool's use over every process's completions (r: their rewards): the share that
    called it, the share of calls answered with a crop, calls per completion, the share of
    completions whose crop held the whole target object, and the mean reward of the completions
    with a call and without one (each only when there are such completions: no NaN in the log)."""
    calls, valid, useful = (
        gather(x.to(r.device), world) for x in (turns.calls, turns.valid, turns.useful)
    )
    called = calls > 0
    split = {"reward_with_call": r[called], "reward_without_call": r[~called]}
    return {
        "tool_call_rate": called.float().mean().item(),
        "tool_valid_rate": (valid.sum() / calls.sum().clamp(min=1)).item(),
        "tool_calls_per_completion": calls.mean().item(),
        "tool_useful_rate": (useful > 0).float().mean().item(),
        **{k: v.mean().item() for k, v in split.items() if len(v)},
    }


def sample_due(args, step):
    """Whether a step shows sample completions: the first, and every --sample-every."""
    return bool(args.sample_every) and (step % args.sample_every == 0 or step == 1)


def step_line(m, args, batch, bad_steps):
    """The progress line of a step, and every --sample-every steps a few of its completions."""
    G = args.num_generations
    comp = " ".join(f"{k}={m['reward_' + k]:.3f}" for k in batch.components)
    line = (
        f"step {m['step']}/{args.steps} reward={m['reward']:.3f} {comp} kl={m['kl']:.4f} "
        f"clip={m['clip_frac']:.3f} len={m['completion_len']:.1f} {m['seconds']:.2f}s"
    )
    if m.get("skipped_updates"):
        line += f"  SKIPPED: non-finite loss or gradient ({bad_steps} in a row)"
    if sample_due(args, m["step"]):
        for i in range(0, min(2 * G, len(batch.texts)), G):
            row = batch.rows[i // G]
            line += f"\n  [{row['problem'][-40:]}] gt={row['solution']} -> {batch.texts[i]!r} "
            line += f"r={batch.r[i]:.2f}"
    return line


def start_banner(args, run, log, rows, bad_rows, model_path):
    """What this run is, printed once; the bad rows skipped, listed and counted in metrics.jsonl."""
    resumed_at, device = log.resumed_at, run.procs.device
    say(
        log.main,
        f"GRPO {args.task}: {len(rows)} prompts, B={args.prompts_per_step} "
        f"G={args.num_generations} T={args.temperature} beta={args.beta} "
        f"coords={run.coord_space} weights={run.weights} device={device} "
        f"processes={run.procs.world}{' (FSDP2)' if args.fsdp else ''} optim={args.optim}"
        + (f" LoRA r={args.lora_r}" if args.lora_r else "")
        + (f", resumed at step {resumed_at}" if resumed_at is not None else ""),
    )
    if device.startswith("cuda"):  # the plan, to read beside each step's gpu_peak_gib
        p = plan.parts(args, model_path, run.procs.world)
        peaks = [f"{ph} {sum(p[ph].values()) / plan.GiB:.1f} GiB" for ph in ("rollout", "training")]
        say(log.main, "memory plan per GPU (--plan): " + ", ".join(peaks))
    if bad_rows:
        listed = "".join("\n  " + b for b in bad_rows[:10])
        say(log.main, f"skipped {len(bad_rows)} bad rows (--skip-bad-rows):" + listed)
        if resumed_at is None:  # a resumed run keeps the row it logged at the start
            log.write({"step": 0, "bad_rows": len(bad_rows)})


def check_logp_gap(m, limit, model_type):
    """Stop when the rollout's log-probs and the training forward's disagree (mean, or 50x at any
    one token: a leak into a few tokens hides in the mean). Every silent failure of a family adapter
    showed here first."""
    if limit >= 0 and (m["logp_gap"] > limit or m["logp_gap_max"] > 50 * limit):
        sys.exit(
            f"error: the rollout and the training forward disagree on pi_old for model type "
            f"{model_type!r}: "
            f"logp_gap {m['logp_gap']:.2e} per token (limit {limit:g}), {m['logp_gap_max']:.2e} at "
            "worst "
            f"(limit {50 * limit:g}); the family's adapter is wrong, or --max-logp-gap is too tight"
        )


def finish(args, run, log, bad_rows):
    """The end of a run: the curves and the final model (main process), then the processes part."""
    model, family, rank, world = run.model, run.family, run.procs.rank, run.procs.world
    log.close()
    final, weights = (
        os.path.join(args.output_dir, "final"),
        full_weights(args, model),
    )  # --fsdp: every process
    if rank == 0:
        if bad_rows:
            print(
                f"{len(bad_rows)} bad rows were skipped (see the top of this log and "
                "metrics.jsonl)",
                flush=True,
            )
        plot_metrics(log.path, os.path.join(args.output_dir, "curves.png"), args.task)
        family.save(model, final, weights)  # with LoRA: the adapter (vlm.load puts it on its base)
        print(f"saved {final}", flush=True)
        if args.merge_lora:
            vlm.merge_lora(final, final + "-merged")
            print(f"saved {final}-merged (the adapters merged into fp32 weights)", flush=True)
    if world > 1:
        torch.distributed.barrier()
        PEERS.pop("stop", lambda: None)()  # the heartbeat ends before the process group does
        torch.distributed.destroy_process_group()
    return final


# Training curves as a PNG, drawn with matplotlib (its Agg backend: no display needed)
REWARD_PANEL = ("reward (moving average over 20 steps)", "reward")
PANELS = {
    "rec": [
        REWARD_PANEL,
        ("held-out Acc@0.5", "acc50"),
        ("held-out centre error (/ image diagonal)", "center_error"),
        ("held-out area ratio (pred / true)", "area_ratio"),
    ],
    "cls": [
        REWARD_PANEL,
        ("held-out accuracy", "accuracy"),
        ("held-out format rate", "format_rate"),
        ("completion length (tokens)", "completion_len"),
    ],
    "count": [
        REWARD_PANEL,
        ("held-out accuracy", "accuracy"),
        ("held-out mean absolute error", "mae"),
        ("completion length (tokens)", "completion_len"),
    ],
    "zoom": [
        REWARD_PANEL,
        ("held-out accuracy", "accuracy"),
        ("held-out tool rate (a crop before the answer)", "tool_rate"),
        ("completion length (tokens)", "completion_len"),
    ],
    "det": [
        REWARD_PANEL,
        ("held-out mAP (IoU 0.50:0.95)", "map"),
        ("#pred / #gt (sampled: pred_per_gt; greedy held-out: test_)", "pred_per_gt"),
        ("held-out AP50", "ap50"),
    ],
}


def _series(rows, suffix):
    """{name: [(step, value)]} for the keys that are (or end with) `suffix`; rewards are
    smoothed."""
    out = {}
    for key in sorted({k for r in rows for k in r}):
        if (
            suffix == "reward"
            and (key == "reward" or key.startswith("reward_"))
            and key != "reward_std"
        ):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            out[key] = [
                (
                    s,
                    sum(v for _, v in pts[max(0, i - 19) : i + 1])
                    / len(pts[max(0, i - 19) : i + 1]),
                )
                for i, (s, _) in enumerate(pts)
            ]
        elif suffix != "reward" and (key == suffix or key.endswith("_" + suffix)):
            out[key] = [
                (r["step"], r[key]) for r in rows if key in r and r[key] == r[key]
            ]  # drop NaN
    return out


def plot_metrics(metrics_path, png_path, task="rec", width=1000, height=700):
    """The task's four panels (PANELS) of metrics.jsonl against steps, each legend beside its
    axes."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no display

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    for ax, (title, suffix) in zip(fig.subplots(2, 2).flat, PANELS[task]):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.locator_params(nbins=6)
        ax.grid(alpha=0.3)
        series = {k: v for k, v in _series(rows, suffix).items() if v}
        if not series:
            ax.text(
                0.5, 0.5, "no data", ha="center", va="center", color="gray", transform=ax.transAxes
            )
            continue
        for name, pts in series.items():
            ax.plot(*zip(*pts), label=name, lw=1.5, marker="o" if len(pts) < 40 else None, ms=3)
        ax.legend(
            fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False
        )
    fig.savefig(png_path)
    print(f"saved {png_path}", flush=True)


# ---------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: the loop finishes its step, saves a checkpoint and exits with 128 + the signal
# number. A second Ctrl-C kills at once.
# ---------------------------------------------------------------------------------------------
STOP = {}


def on_signal(signum, frame):
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL)


def catch_signals():
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)


def interrupted(world, device):
    """The signal that stopped any process (all agree), or 0."""
    anyone = all_sum(torch.tensor(float("signal" in STOP), device=device), world).item() > 0
    return STOP.get("signal", signal.SIGINT) if anyone else 0
