"""Finding 2b: latent-answer disconnect. Gaussian noise (a sweep of scales relative to the data), constant
replacement, patching and dropping of latent tokens, and how much the answer moves; plus the mediation
effects (TE, NDE, NIE) of an image swap with the latents as mediator (both definitions: the fed-back vectors,
and the latent positions' states at every layer). Ends with the latent_answer verdict: decided on the
information edits (patch, image-swap NIE), with the disruption edits (noise, constants, zero, drop) beside it.

    python analyses/latent_answer.py --subject organism-bottleneck
"""

import pandas as pd

from latentprobe import figures
from latentprobe.runs.intervene import intervene
from latentprobe.interventions import make_interventions
from latentprobe.verdicts import Margins, verdict_latent_answer

from _common import load, parser, run_dir

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    subject, instances = load(args)
    ivs = (make_interventions("latent", ["noise"], scales=[0.5, 1, 3, 10], semantics=["recompute", "pin"],
                              seed=args.seed)
           + make_interventions("latent", ["constant", "zero", "patch", "drop"], seed=args.seed)
           + make_interventions("input", ["image-swap"], seed=args.seed))
    out = run_dir(args, subject, "latent")
    intervene(subject, instances, ivs, out, seed=args.seed, resume=out.exists(), mediators=("fed_back", "all_layers"))
    table = pd.read_parquet(out / "effects_summary.parquet")
    paths = figures.plot_effects_forest(table, f"{args.figures}/{out.name}-effects",
                                        metrics=["accuracy_change", "flip_rate", "gold_prob_change", "NIE_correct"],
                                        reference_lines={"flip_rate": Margins().answer_change})
    print(table[table.metric.isin(["accuracy_change", "flip_rate", "NIE_answer_changed", "NIE_correct", "TE_correct"])]
          .to_string(index=False))
    verdict = verdict_latent_answer(table, subject.name)
    print(f"\nlatent_answer: {verdict.verdict} ({verdict.rule})\n{verdict.evidence}")
    print("\n".join(map(str, paths)))
