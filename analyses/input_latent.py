"""Finding 2a: input-latent disconnect. Strong input perturbations (image swap, blank, pixel noise, question
swap) and how far they move each latent step, as a ratio of the spread between different instances.

    python analyses/input_latent.py --subject organism-lvr
"""

import pandas as pd

from latentprobe import figures
from latentprobe.runs.intervene import intervene
from latentprobe.interventions import make_interventions

from _common import load, parser, run_dir

if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    subject, instances = load(args)
    ivs = make_interventions("input", ["image-swap", "image-blank", "image-noise", "question-swap"],
                             scales=[0.5], seed=args.seed)
    out = run_dir(args, subject, "input")
    intervene(subject, instances, ivs, out, seed=args.seed, resume=out.exists())
    change = pd.read_parquet(out / "latent_change.parquet").assign(target="input")
    paths = figures.plot_effects_forest(change, f"{args.figures}/{out.name}-change-ratio", metrics=["change_ratio"],
                                        reference_lines={"change_ratio": 0.2})
    print(change[change.metric == "change_ratio"].to_string(index=False))
    print("\n".join(map(str, paths)))
