"""Peak resident memory of whole runs against the number of instances: is memory flat as a dataset grows?

Each (command, instance count) runs in its own fresh Python process, which reports its peak resident set size
(``ru_maxrss``) and its resident size just before the run started (model loaded, instances listed). The ratio
reported is peak(large) / peak(small); the growth columns say how much memory the run itself added.

  trace      ``runs.trace`` with every layer recorded at every latent step (RecordSpec(layers="all")).
  intervene  ``runs.intervene`` with 8 latent interventions (the sweep of bench_interventions.py).
  patch      ``where.patching.patch_map`` over the default grid (every layer, step and position group), both
             directions, exact patching only (no attribution).

The subject is the ``tiny`` one (the test subject; the model is small, so what grows with the instance count is
the run's own bookkeeping and the store, not activations). Instances are the built-in synthetic image set; its
images and all run folders go to a temporary folder that is removed afterwards.

    python bench/bench_memory.py                        # 64 vs 1,024 instances, all three commands
    python bench/bench_memory.py --commands trace --sizes 64,256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = ("trace", "intervene", "patch")


def rss_mb() -> float:
    """The current resident set size (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(command: str, n: int, work: Path) -> dict:
    os.environ["LATENTPROBE_CACHE"] = str(work / "cache")
    sys.path.insert(0, str(HERE.parent))
    import torch

    torch.set_num_threads(1)
    from latentprobe.data import builtin_instances
    from latentprobe.model.decoding import DecodeConfig
    from latentprobe.model.recording import RecordSpec
    from latentprobe.model.subjects import load_subject

    subject = load_subject("tiny")
    instances = builtin_instances(n)
    config = DecodeConfig(max_new_tokens=subject.max_new_tokens)
    out = work / f"{command}-{n}"
    before = rss_mb()
    started = time.perf_counter()
    if command == "trace":
        from latentprobe.runs.trace import trace

        trace(subject, instances, out, config=config, spec=RecordSpec(layers="all", latent=True))
    elif command == "intervene":
        sys.path.insert(0, str(HERE))
        from bench_interventions import sweep_interventions
        from latentprobe.runs.intervene import intervene

        intervene(subject, instances, sweep_interventions(), out, config=config, n_boot=200)
    else:
        from latentprobe.where.patching import patch_map

        patch_map(subject, instances, out, config=config, attribution=False, n_boot=200)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"command": command, "instances": n, "rss_before_run_mb": before, "peak_rss_mb": peak,
            "run_growth_mb": peak - before, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--sizes", default="64,1024", help="two instance counts: small,large")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_memory-cpu-tiny.json"))
    parser.add_argument("--child", nargs=2, metavar=("COMMAND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), Path(args.work))))
        return
    small, large = (int(v) for v in args.sizes.split(","))
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lp-bench-memory-") as work:
        for command in commands:
            for n in (small, large):
                proc = subprocess.run([sys.executable, __file__, "--child", command, str(n), "--work", work],
                                      capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                          "TOKENIZERS_PARALLELISM": "false"})
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{command} with {n} instances failed")
                record = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault(command, {})[str(n)] = record
                print(f"{command:<10} {n:>5} instances: peak RSS {record['peak_rss_mb']:.0f} MiB "
                      f"(run added {record['run_growth_mb']:.0f} MiB) in {record['seconds']:.0f} s", flush=True)
    summary = {}
    for command, by_n in results.items():
        a, b = by_n[str(small)], by_n[str(large)]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        summary[command] = {"peak_ratio": ratio, "target": "<= 1.15", "met": ratio <= 1.15,
                            "growth_mb_small": a["run_growth_mb"], "growth_mb_large": b["run_growth_mb"]}
        print(f"{command:<10} peak RSS {large} / {small} instances = {ratio:.3f} (target <= 1.15); the run added "
              f"{a['run_growth_mb']:.0f} MiB at {small} and {b['run_growth_mb']:.0f} MiB at {large}")
    sys.path.insert(0, str(HERE))
    import _common as C

    record = {"script": "bench_memory", "size": "tiny", "device": "cpu", "sizes": [small, large],
              "machine": C.machine_info("cpu"), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:],
              "runs": results, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
