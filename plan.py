"""The memory plan (--plan): filled in below."""


def show(args, path):
    raise NotImplementedError("--plan is being built")


def reference_whole(args, path, world):
    """Under --fsdp: whether the plan fits a whole (unsharded) bf16 reference on each GPU in --gpu-memory."""
    return True  # placeholder until the plan is built
