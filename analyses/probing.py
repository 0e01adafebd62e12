"""Finding 3: what visual information the latent tokens hold. Linear probes per layer x latent step against
image-token and last-prompt-token baselines, with a per-type control task (selectivity), the best layer x step
chosen inside the training folds, and permutation p-values.

    python analyses/probing.py --subject organism-mirage --labels answer,cell_0_colour
"""

from latentprobe.report.build import probe_study
from latentprobe.model.recording import RecordSpec
from latentprobe.runs.trace import trace

from _common import load, parser, run_dir

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--labels", default="answer,cell_0_colour")
    args = p.parse_args()
    subject, instances = load(args)
    out = run_dir(args, subject, "trace-all-layers")
    trace(subject, instances, out, spec=RecordSpec(layers="all"), resume=out.exists())
    table, figs = probe_study(out, args.labels.split(","), args.figures, seed=args.seed)
    from latentprobe.stats.probes import best_probe_rows

    print(best_probe_rows(table)[["attribute", "representation", "layer", "step", "score", "control_score",
                                  "selectivity", "selectivity_ci_low", "selectivity_ci_high", "p_value",
                                  "chance"]].to_string(index=False))
    from latentprobe.verdicts.visual_info import verdict_visual_info

    verdict = verdict_visual_info(table, subject.name)
    print(f"visual_info: {verdict.verdict} -- {verdict.evidence}")
