"""Finding 1: latent tokens are similar across instances and collapse with the latent step.

Traces the subject, then measures the relative spread of the latents across instances per step against the
image-token and prompt baselines (the collapse statistic and its verdict), and draws the paper's raw cosine
heatmaps per step and the step x step similarity.

    python analyses/collapse.py --subject organism-mirage
"""

from latentprobe.report.build import collapse_study
from latentprobe.model.recording import RecordSpec
from latentprobe.runs.trace import trace

from _common import load, parser, run_dir

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    subject, instances = load(args)
    out = run_dir(args, subject, "trace")
    trace(subject, instances, out, spec=RecordSpec(layers="final"), resume=out.exists())
    table, figures = collapse_study([out], args.figures, seed=args.seed)
    print(table[table.statistic != "cosine"].to_string(index=False))
    from latentprobe.verdicts.collapse import verdict_collapse

    verdict = verdict_collapse(table, subject.name)
    print(f"collapse: {verdict.verdict} -- {verdict.evidence}")
    print("\n".join(str(p) for p in figures["collapse"]))
