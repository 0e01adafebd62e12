"""The report's share of a study, side by side: the collapse interval's fits, and where the analyses run.

Two sections, each a ratio of variants timed in one run, repetitions interleaved in rotating order:

  collapse   one latent step's collapse ratio against two yardsticks (a single image token and the image-token
             mean, as the report measures every step) at the demo's shape: 240 instances, hidden 96, a pool of
             3,840 image tokens, 500 refitted BCa resamples. ``shared``: `collapse_ratios`, which fits the
             latents' subspaces once for both yardsticks (one whitening: the pool's); ``separate``: one call per
             yardstick, each refitting them (the cost before round seven). One thread, CPU time.
  demo       ``latentprobe demo`` (all eight organisms, defaults) from a warm data cache into a fresh folder:
             ``one process`` (``LATENTPROBE_THREADS=1``: every analysis in the study's process, after the
             decodes, as before round seven) against ``processes`` (the default: each subject's collapse and probes
             start in a process of their own as soon as its runs are decoded). Wall time of each demo, run as a
             separate ``python -m latentprobe demo`` so that neither inherits the other's warm state; the verdict
             tables of the two must be equal, and the script says whether they are. ``--against COMMIT`` adds
             that commit's demo (its package extracted with ``git archive``) as a third variant.

    python bench/bench_report.py                          # both sections (about 5 minutes on 2 cores)
    python bench/bench_report.py --sections demo --against 57bd4ab   # and round six's demo beside them
    python bench/bench_report.py --sections collapse --reps 5
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np


def collapse_section(reps: int) -> dict:
    from latentprobe.stats.collapse_spread import collapse_ratios

    os.environ["LATENTPROBE_THREADS"] = "1"
    rng = np.random.default_rng(0)
    n, d = 240, 96
    tokens = rng.normal(size=(n, 16, d)) * np.geomspace(3.0, 0.3, d)
    latents = rng.normal(size=(n, 12)) @ rng.normal(size=(12, d)) + rng.normal(size=d)
    yardsticks = {"image_token": tokens[:, 0], "image_mean": tokens.mean(axis=1)}
    pool = tokens.reshape(-1, d)
    results = {}

    def shared():
        results["shared"] = collapse_ratios(latents, yardsticks, pool, n_boot=500)

    def separate():
        results["separate"] = {name: collapse_ratios(latents, {name: y}, pool, n_boot=500)[name]
                               for name, y in yardsticks.items()}

    times = C.time_interleaved({"separate": separate, "shared": shared}, reps, "cpu", clock="cpu")
    same = all(results["shared"][k][key] == results["separate"][k][key]
               for k in yardsticks for key in ("estimate", "ci_low", "ci_high"))
    row = {"separate_s": C.median(times["separate"]), "shared_s": C.median(times["shared"]),
           "ratio": C.median(times["shared"]) / C.median(times["separate"]),
           "spread": C.paired_spread(times["shared"], times["separate"]), "same_intervals": same,
           "reps": len(times["shared"])}
    C.print_table("collapse ratio of one step against two yardsticks (CPU s, one thread)", [row], list(row))
    return row


def extract_commit(commit: str, folder: Path) -> dict:
    """The ``latentprobe`` package of ``commit`` (``git archive``) in ``folder``, and the environment that runs it."""
    archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", commit, "latentprobe"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder)
    env = {"PYTHONPATH": str(folder)}
    found = subprocess.run([sys.executable, "-c", "import latentprobe; print(latentprobe.__file__)"], cwd=folder,
                           env={**os.environ, **env}, check=True, capture_output=True, text=True).stdout.strip()
    if not found.startswith(str(folder)):
        raise SystemExit(f"--against {commit}: python imports {found}, not the extracted commit")
    return env


def demo_section(reps: int, against: str | None) -> dict:
    variants = {"one process": {"LATENTPROBE_THREADS": "1"}, "processes": {}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    verdicts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if against:
            variants[f"commit {against}"] = extract_commit(against, Path(tmp) / "before")
            times[f"commit {against}"] = []
        for rep in range(reps):
            order = list(variants)[rep % len(variants):] + list(variants)[: rep % len(variants)]
            for name in order:
                out = Path(tmp) / f"{name.replace(' ', '-')}-{rep}"
                env = {k: v for k, v in os.environ.items() if k != "LATENTPROBE_THREADS"} | variants[name]
                started = time.perf_counter()
                # run from the temporary folder: from the checkout, its own package would shadow a commit's
                subprocess.run([sys.executable, "-m", "latentprobe", "demo", "--out", str(out)], env=env, cwd=tmp,
                               check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - started)
                verdicts[name] = (out / "report" / "verdicts.csv").read_text()
                print(f"  {name:<12} rep {rep}: {times[name][-1]:.1f} s", flush=True)
    row = {"one_process_s": C.median(times["one process"]), "processes_s": C.median(times["processes"]),
           "ratio": C.median(times["processes"]) / C.median(times["one process"]),
           "all_s": {k: [round(v, 1) for v in vs] for k, vs in times.items()},
           "same_verdicts": verdicts["one process"] == verdicts["processes"], "reps": reps}
    if against:
        before = times[f"commit {against}"]
        row |= {"commit": against, "commit_s": C.median(before),
                "ratio_to_commit": C.median(times["processes"]) / C.median(before),
                "same_verdict_words_as_commit": _words(verdicts[f"commit {against}"]) == _words(verdicts["processes"])}
    C.print_table("latentprobe demo, wall s", [row], list(row))
    return row


def _words(verdicts_csv: str) -> list:
    import io

    import pandas as pd

    table = pd.read_csv(io.StringIO(verdicts_csv))
    return sorted(zip(table.subject, table.finding, table.verdict))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="collapse,demo")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default: 5 collapse, 2 demo)")
    parser.add_argument("--against", default=None, help="also time the demo of this earlier commit (a git revision)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - {"collapse", "demo"}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))} (choose from collapse, demo)")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps {args.reps}: pass 1 or more repetitions")
    payload = {}
    if "collapse" in sections:
        payload["collapse"] = collapse_section(args.reps or 5)
    if "demo" in sections:
        payload["demo"] = demo_section(args.reps or 2, args.against)
    path = Path(args.out) if args.out else C.RESULTS_DIR / "bench_report-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"script": "bench_report", "machine": C.machine_info("cpu"),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], **payload},
                               indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
