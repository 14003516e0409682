"""The one table of benchmarks/gpu_check.sh, from the files it wrote in OUT:

python benchmarks/gpu_summary.py OUT
"""

import glob
import json
import os
import sys

MiB = 2**20


def main(out):
    versions = os.path.join(out, "versions.txt")
    if os.path.exists(versions):
        print(open(versions).read().strip() + "\n")
    print("| check | what | result |\n|---|---|---|")
    for log in sorted(glob.glob(os.path.join(out, "gap-*", "metrics.jsonl"))):
        arch = os.path.basename(os.path.dirname(log))[4:]
        rows = [json.loads(x) for x in open(log) if '"logp_gap"' in x]
        if rows:
            r = rows[0]
            verdict = (
                "ok"
                if r["logp_gap"] <= 0.02 and r["logp_gap_max"] <= 1.0
                else "OVER the bf16 limit"
            )
            print(
                f"| logp_gap (bf16 on a GPU) | {arch} | {r['logp_gap']:.2e} per token, "
                f"{r['logp_gap_max']:.2e} at worst "
                f"(limit 0.02 / 1.0): {verdict}; max_memory_allocated "
                f"{r.get('gpu_peak_gib', float('nan')):.2f} GiB; pi_train / pi_rollout "
                f"mean {r.get('train_rollout_ratio_mean', float('nan')):.4f}, max "
                f"{r.get('train_rollout_ratio_max', float('nan')):.3f}, outside [0.5, 2] "
                f"{r.get('train_rollout_ratio_outside', float('nan')):.2e} (--tis-cap) |"
            )
    for arch in sorted(
        {os.path.basename(p)[4:-4] for p in glob.glob(os.path.join(out, "gap-*.log"))}
    ):
        if not os.path.exists(os.path.join(out, f"gap-{arch}", "metrics.jsonl")):
            print(f"| logp_gap (bf16 on a GPU) | {arch} | failed: see gap-{arch}.log |")
    path = os.path.join(out, "memory_plan.json")
    if os.path.exists(path):
        for shape, res in json.load(open(path)).items():
            for k, want in res["planned"].items():
                got = res["measured"][k]
                err = f"{100 * (want - got) / got:+.0f}%" if got > 0 else "-"
                print(
                    f"| --plan vs measured | {shape}: {k} | planned {want / MiB:.0f} MiB, measured "
                    f"{got / MiB:.0f} "
                    f"MiB ({err}) |"
                )
    else:
        print("| --plan vs measured | 3B | no result: see memory_plan.log |")
    path = os.path.join(out, "gpu_3b.json")
    if os.path.exists(path):
        res = json.load(open(path))["results"]
        o, t = res["ours"], res["trl"]
        print(
            f"| 3B step vs TRL | s/step, peak MiB | ours {o['median_s']:.2f} s, {o['peak_mb']:.0f} "
            "MiB; TRL "
            f"{t['median_s']:.2f} s, {t['peak_mb']:.0f} MiB; ours/TRL "
            f"{o['median_s'] / t['median_s']:.2f}x time, "
            f"{o['peak_mb'] / t['peak_mb']:.2f}x memory |"
        )
    else:
        print("| 3B step vs TRL | - | no result: see gpu_3b.log (TRL installed?) |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check")
