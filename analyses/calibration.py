"""Issue 18, item 7: the error rate of every verdict rule under each hard scenario, by simulation.

Each scenario draws runs from a known truth and decides them with the project's own statistics and rules
(``latentprobe.verdicts.simulation.scenarios``): false `connected` under a null (or a negligible effect), false
`disconnect` at twice the margin (2.5% target at the margin itself), false `collapsed` for latents that are not,
false `limited` for latents that hold the attribute, false `informative` on noise. Prints one Markdown table
(the README quotes it) with the Monte Carlo standard error of each rate.

    python analyses/calibration.py --sims 400          # about 10 minutes on one CPU core
    python analyses/calibration.py --sims 40 --fast    # a smoke run
"""

import argparse
import math
import time

from latentprobe.verdicts.simulation import scenarios, word_rates

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=400, help="simulated runs per scenario (probe scenarios: a quarter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="fewer bootstrap resamples and probe repeats")
    p.add_argument("--only", default="", help="run only the rules whose name contains this text")
    args = p.parse_args()
    print("| rule | scenario | error | rate | MC s.e. | runs | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for index, (rule, scenario, error, target, decide) in enumerate(scenarios(fast=args.fast)):
        if args.only and args.only not in rule:
            continue
        sims = max(20, args.sims // 4) if rule == "visual_info" else args.sims
        started = time.time()
        rates = word_rates(decide, n_sims=sims, seed=args.seed + 1000 * index)
        rate = rates.get(error, 0.0)
        se = math.sqrt(max(rate * (1 - rate), target * (1 - target)) / sims)
        met = "yes" if rate <= target + 2 * se else "NO"
        print(f"| {rule} | {scenario} | false {error} | {rate:.3f} | {se:.3f} | {sims} | <= {target:g} | {met} |",
              flush=True)
