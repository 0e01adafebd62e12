"""What one study saves against the same stages run as separate commands, counted in decodes (and seconds).

Two ways to get the same edits of one subject on the same instances:

  study      ``run_study``'s edits stage: ONE clean decode per instance (it is also the trace the collapse and
             probe analyses read), then every latent, input and text edit of the study file;
  separate   what a user chains by hand: ``trace`` (clean decode), ``intervene --target latent`` (its own clean
             decode, then the latent edits), ``intervene --target input`` (its own clean decode, then the input
             edits and their mediation runs), and ``intervene --target text`` for a text mediator.

Counted with `latentprobe.study.counting.DecodeCounter`: rows decoded (a sweep of M edits decoded side by side
from one prefill counts M) and prompt rows prefilled. Seconds are one sequential run of each on this machine (a
shared CPU: read them as a rough ratio; the decode counts are exact and machine-independent). A short trace of
two instances runs first, untimed, so that neither variant pays the first call's costs.

    python bench/bench_study.py                                 # organism-bottleneck, 16 held-out instances
    python bench/bench_study.py --subject organism-capimagine --n 16
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import argparse
import json
import tempfile
import time
from pathlib import Path

from latentprobe.interventions.factory import make_interventions
from latentprobe.model.recording import RecordSpec
from latentprobe.runs.intervene import intervene
from latentprobe.runs.trace import trace
from latentprobe.study import StudyConfig
from latentprobe.study.counting import DecodeCounter
from latentprobe.study.edits import study_edits
from latentprobe.study.run import _edits_stage, decode_config, load_study_subject, study_instances


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", default="organism-bottleneck")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    config = StudyConfig(subjects=[args.subject], n_instances=args.n, batch_size=args.batch_size, bootstrap=100)
    instances, source = study_instances(config, args.subject)
    subject = load_study_subject(config, args.subject)
    edits = study_edits(subject, config).interventions
    dc = decode_config(config, subject)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm-up (first-call costs: lazy imports, image loading, allocator), so neither variant pays them
        trace(subject, instances[:2], tmp / "warm-up", config=dc, batch_size=2, data_source=source)
        started = time.perf_counter()
        with DecodeCounter() as study:
            _edits_stage(subject, instances, source, edits, tmp / "study", config, progress=False, resume=False,
                         shard=None)
        results["study"] = {**study.as_dict(), "seconds": time.perf_counter() - started}
        started = time.perf_counter()
        with DecodeCounter() as separate:
            trace(subject, instances, tmp / "trace", config=dc, spec=RecordSpec(layers="all"),
                  batch_size=config.batch_size, data_source=source)
            for target in ("latent", "input", "text"):
                chosen = [iv for iv in edits if iv.target == target]
                if chosen:
                    intervene(subject, instances, chosen, tmp / f"intervene-{target}", config=dc,
                              batch_size=config.batch_size, seed=config.seed, n_boot=config.bootstrap,
                              data_source=source, mediators=tuple(config.mediators if subject.mediator == "latent"
                                                                  else ["fed_back"]))
        results["separate"] = {**separate.as_dict(), "seconds": time.perf_counter() - started}
    study, separate = results["study"], results["separate"]
    print(f"{args.subject}: {len(instances)} instances, {len(edits)} interventions, batch {args.batch_size}")
    print(f"{'':<10} {'rows decoded':>13} {'prompts prefilled':>18} {'seconds':>8}")
    for name, row in results.items():
        print(f"{name:<10} {row['decode_rows']:>13} {row['prefill_rows']:>18} {row['seconds']:>8.1f}")
    saving = {key: separate[key] / study[key] for key in ("decode_rows", "prefill_rows", "seconds") if study[key]}
    print("separate / study: " + ", ".join(f"{k} {v:.2f}x" for k, v in saving.items()))
    out = C.RESULTS_DIR / f"bench_study-cpu-{args.subject}.json"
    out.write_text(json.dumps({"subject": args.subject, "n_instances": len(instances), "interventions":
                               [iv.name for iv in edits], "batch_size": args.batch_size, "results": results,
                               "separate_over_study": saving, "machine": C.machine_info("cpu")}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
