"""Issue 31: one run on several nodes. Two torchrun launchers on this machine stand for two nodes
(--nnodes 2, one gloo process each, rendezvous on 127.0.0.1): DDP and FSDP2 train as one process
does; a checkpoint of the two-node run resumes exactly; an --output-dir that one node cannot see
stops the run with one line; a node that dies stops the other within seconds, with one line."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grpo_vlm as g  # noqa: E402
import infra  # noqa: E402

FLAGS = [
    "--prompts-per-step",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "48",
    "--train-size",
    "16",
    "--sample-every",
    "0",
    "--eval-every",
    "0",
    "--lr",
    "1e-3",
    "--loss-agg",
    "token",
    "--scale-rewards",
    "batch",
    "--steps",
    "2",
    "--micro-batch-size",
    "4",  # a process's share of the batch: the same sums of gradients on one process and on two
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same float rounding in every run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(node, port, elastic=False):
    """torchrun for node `node` of 2, one process: the static form (--node_rank, --master_addr) or
    the elastic one (c10d rendezvous: ranks follow arrival order)."""
    where = (
        ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        if elastic
        else ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    )
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    return run + where + [os.path.join(ROOT, "grpo_vlm.py")]


def start(flags, dirs, elastic=False):
    """The two launchers, node k in dirs[k], each in a process group of its own."""
    port = free_port()
    return [
        subprocess.Popen(
            launcher(k, port, elastic) + flags,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=d,
            env=ENV,
            start_new_session=True,
        )
        for k, d in enumerate(dirs)
    ]


def two_nodes(flags, dirs, elastic=False, ok=True):
    """Run both launchers to the end; (exit status, output) of each."""
    procs = start(flags, dirs, elastic)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    if ok:
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [(p.returncode, o) for p, o in zip(procs, outs)]


def weights(path):
    return load_file(os.path.join(path, "final", "model.safetensors"))


def metrics(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def errors(out):
    return [line for line in out.splitlines() if line.startswith("error:")]


def our_traceback(out):
    """A traceback of ours: one printed by a process of the run, not torchrun's own (it raises
    ChildFailedError whenever a process exits nonzero)."""
    theirs = out.find('Traceback (most recent call last):\n  File "<frozen runpy>"')
    return "Traceback" in (out if theirs < 0 else out[:theirs])


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same two steps on one process, in this one (one thread, as the launched runs)."""
    data.load_rows(g.Args(train_size=16))  # the synthetic rows, made once before any launch
    out, threads = tmp_path_factory.mktemp("one"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g.train(g.parse_args(FLAGS + ["--save-every", "0", "--output-dir", str(out)]))
    finally:
        torch.set_num_threads(threads)
    return out


def test_ddp_on_two_nodes_survives_a_lost_node_and_resumes_to_one_process_bit_for_bit(
    one, tmp_path
):
    """DDP over two launchers (the static form). The second node is killed after the step-1
    checkpoint: the first stops within 60 s, with one line naming the lost process and the
    checkpoint. Resumed from it on two nodes, the run ends bit for bit as one process's two steps
    (weights; rewards; loss within 1e-5 + 1e-3), so the two-node steps and the two-node checkpoint
    are both exact. torchrun starts each process in a session of its own: a dying node is the
    launcher's process group and its process's."""
    flags = FLAGS + ["--save-every", "1", "--output-dir", "out"]
    first, second = start(flags, [tmp_path, tmp_path])
    out, killed = "", None
    for line in first.stdout:
        out += line
        if "saved checkpoint" in line:
            killed = time.time()
            for pid in [second.pid, *children(second.pid)]:
                os.killpg(pid, signal.SIGKILL)
            break
    out += first.communicate(timeout=60)[0]
    assert killed and time.time() - killed < 60 and first.returncode != 0, out[-3000:]
    [line] = errors(out)
    assert line.startswith(
        f"error: lost rank 1 (node 1, host {socket.gethostname()}): "
    ) and line.endswith("--resume out/checkpoint-000001 once every node is back"), line
    assert not our_traceback(out), out[-3000:]
    second.wait()

    two_nodes(flags + ["--resume", "out"], [tmp_path, tmp_path])
    ran = tmp_path / "out"
    assert sorted(os.listdir(ran)) == [
        "checkpoint-000001",
        "checkpoint-000002",
        "curves.png",
        "final",
        "metrics.jsonl",
    ]  # the marker written before the first step is gone
    a, b = weights(one), weights(ran)
    base = load_file(os.path.join(g.TINY_MODEL, "model.safetensors"))
    assert max((a[k] - base[k]).abs().max() for k in a) > 1e-4  # the steps did move the weights
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = metrics(one), metrics(ran)
    assert [r["reward"] for r in m1] == [r["reward"] for r in m2] and m1[0]["reward"] > 0
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-3, abs=1e-5)


def children(pid):
    """The processes whose parent is `pid` (a launcher's: its workers)."""
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(d))
    return found


def test_fsdp_on_two_nodes_matches_one_process(one, tmp_path):
    """--fsdp over two launchers that meet by the elastic c10d rendezvous: the rewards of one
    process, the loss within 1e-5 + 1e-3 of it."""
    two_nodes(FLAGS + ["--fsdp", "--save-every", "0", "--output-dir", "out"], [tmp_path] * 2, True)
    m1, m2 = metrics(one), metrics(tmp_path / "out")
    assert [r["reward"] for r in m1] == [r["reward"] for r in m2]
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-3, abs=1e-5)
    assert m2[-1]["kl"] > 0  # the second step moved away from the reference


def test_an_output_dir_one_node_cannot_see_stops_the_run(one, tmp_path):  # one: the rows exist
    """Each launcher in its own folder with a relative --output-dir, as if each node had its own
    disk, and a checkpoint on node 0's only: the resume stops (it never starts fresh on node 1),
    with one line in each node's log naming the node and the path."""
    nodes, host = [tmp_path / "node0", tmp_path / "node1"], socket.gethostname()
    ckpt = nodes[0] / "out" / "checkpoint-000007"
    os.makedirs(ckpt)
    open(ckpt / "trainer_state.pt", "w").close()
    os.makedirs(nodes[1])
    for status, out in two_nodes(
        FLAGS + ["--output-dir", "out", "--resume", "out"], nodes, ok=False
    ):
        assert status != 0 and errors(out) == [
            f"error: rank 1 (node 1, host {host}) sees no checkpoint in --resume out, where rank 0 "
            f"(node 0, host {host}) sees {ckpt}{SHARED}"
        ], out[-3000:]
        assert not our_traceback(out), out[-3000:]


SHARED = ": --output-dir (and --resume) must be on a file system that every node shares"


def check_worker(rank, port, folder, resume, results):
    """One of two forked processes (no torchrun, no imports to repeat): infra's check of what
    each sees, the node's folder as its working directory."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK="0",
        GROUP_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.chdir(folder / f"node{rank}")
    args = g.Args(output_dir="out", resume=resume)
    infra.setup_distributed(args)
    try:
        results.put((rank, "ok", infra.shared_checkpoint(args)))
    except SystemExit as e:
        results.put((rank, "stopped", e.code))


def checked(folder, resume=""):
    """{rank: (what happened, what it returned or its exit line)} of the two forked processes."""
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=check_worker, args=(r, port, folder, resume, results)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict((r, (what, x)) for r, what, x in (results.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    return got


def test_every_process_checks_the_marker_and_the_checkpoint(tmp_path):
    """infra.shared_checkpoint on two forked gloo processes: a shared --output-dir passes (and the
    marker is removed), a folder of each node's own stops both at the marker, and a resume agrees
    on the checkpoint or stops."""
    host = socket.gethostname()
    for node in ("node0", "node1"):
        os.makedirs(tmp_path / "shared" / node)
    os.symlink(tmp_path / "shared" / "out", tmp_path / "shared" / "node1" / "out")
    os.makedirs(tmp_path / "shared" / "out")
    os.symlink(tmp_path / "shared" / "out", tmp_path / "shared" / "node0" / "out")
    assert checked(tmp_path / "shared") == {0: ("ok", None), 1: ("ok", None)}
    assert os.listdir(tmp_path / "shared" / "out") == []
    ckpt = tmp_path / "shared" / "out" / "checkpoint-000003"
    os.makedirs(ckpt)
    open(ckpt / "trainer_state.pt", "w").close()
    found = ("ok", os.path.join("out", "checkpoint-000003"))  # relative to each one's folder
    assert checked(tmp_path / "shared", resume="out") == {0: found, 1: found}

    for node in ("node0", "node1"):
        os.makedirs(tmp_path / "own" / node)
    line = (
        f"error: rank 1 (node 1, host {host}) does not see "
        f"{tmp_path / 'own' / 'node1' / 'out' / '.shared-disk-check'}, the marker rank 0 (node 0, "
        f"host {host}) wrote{SHARED}"
    )
    assert checked(tmp_path / "own") == {0: ("stopped", line), 1: ("stopped", line)}
    older = tmp_path / "own" / "node1" / "out" / "checkpoint-000001"  # node 1's own, older one
    os.makedirs(older)
    open(older / "trainer_state.pt", "w").close()
    newer = tmp_path / "own" / "node0" / "out" / "checkpoint-000002"
    os.makedirs(newer)
    open(newer / "trainer_state.pt", "w").close()
    line = (
        f"error: rank 1 (node 1, host {host}) sees {older}, where rank 0 (node 0, host {host}) "
        f"sees {newer}{SHARED}"
    )
    assert checked(tmp_path / "own", resume="out") == {0: ("stopped", line), 1: ("stopped", line)}


def barrier_worker(rank, port, results):
    """Rank 0 stands for the main process at a long held-out eval; rank 1 waits at infra.barrier."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1"
    )
    os.environ["MASTER_PORT"] = str(port)
    infra.setup_distributed(g.Args(dist_timeout=2.0))
    if rank == 0:
        time.sleep(30)  # alive (its heartbeat runs) but longer than --dist-timeout
        return
    t0 = time.time()
    try:
        infra.barrier(2)
        results.put(("passed", time.time() - t0, ""))
    except Exception as e:
        results.put((infra.collective_failure(e), time.time() - t0, infra.lost_line(e)))


def test_the_barrier_of_the_held_out_eval_waits_at_most_the_timeout():
    """With --dist-timeout 2, a process waiting at the barrier while the main one works for 30 s
    fails after about 2 s (not 30), and its line says that no process was lost."""
    ctx = multiprocessing.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=barrier_worker, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    failed, waited, line = results.get(timeout=60)
    procs[0].kill()  # done with the eval that never ends
    for p in procs:
        p.join(timeout=60)
    assert failed is True and 1.5 < waited < 10, (failed, waited, line)
    assert line.startswith("no process was lost, but a collective failed"), line


def test_dist_timeout_is_a_positive_number_of_seconds():
    assert g.parse_args(["--dist-timeout", "90"]).dist_timeout == 90.0
    with pytest.raises(SystemExit, match="error: --dist-timeout 0: give a positive number"):
        g.parse_args(["--dist-timeout", "0"])
