"""The memory plan (--plan): filled in below."""


def show(args, path):
    raise NotImplementedError("--plan is being built")
