"""Benchmark a sweep of 8 latent interventions over one long image prompt, against one clean run.

Three variants timed side by side in this one process (repetitions interleaved in rotating order, medians):

  clean          ``decoder.run(batch)``: one clean decode of the prompt (the unit)
  prefix reuse   ``decoder.prefill(batch)`` once + ``decoder.decode(prefill, edits, repeats=8)``: the prompt's
                 keys and values are computed once and the 8 edited decodes run side by side in one batch
                 (what ``latentprobe.runs.intervene`` does). Target: <= 1.5x one clean run (issue 22).
  naive          8 separate ``decoder.run(batch, edit)`` calls. Expected: about 8-9x.

Prefix reuse also runs with each key/value cache forced (``kv_cache="preallocated"`` and ``"dynamic"``; the
decoder's default ``"auto"`` picks by the cache's size), side by side; all three give the same rows bit for bit.

The prompt is one instance with one 448x448 image by default (256 image tokens after the 2x2 merge), decoded
with the LVR protocol (forced latent start, 8 latent steps, 16 generated positions). The edits are bound to
the clean run's latents and statistics as the intervention runner binds them; before timing, the swept rows
are checked to equal the naive runs (same generated ids, latents within float tolerance).

    python bench/bench_interventions.py                      # CPU, the "small" model
    python bench/bench_interventions.py --size tiny
    python bench/bench_interventions.py --device cuda --dtype bfloat16 --size 7b
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.interventions import (LatentConstant, LatentNoise, LatentPatch, LatentShuffle, LatentStats,
                                       RowBinding)
from latentprobe.model.protocol import LVR


def sweep_interventions():
    """Eight latent interventions of different kinds, as a user's sweep would mix them."""
    return [LatentNoise(scale=1.0, seed=1), LatentNoise(scale=3.0, seed=1),
            LatentNoise(scale=3.0, steps=[0], semantics="pin", seed=2), LatentConstant(value="zero"),
            LatentConstant(value="mean"), LatentConstant(value="random", seed=3), LatentPatch(),
            LatentShuffle(seed=4)]


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=448, help="side of each (square) image")
    parser.add_argument("--images", type=int, default=1, help="images in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--latent-steps", type=int, default=8)
    C.add_budget(parser, cpu_seconds=120.0)
    args, on_cpu, budget = C.parse_checked(parser, cpu_seconds=120.0)
    args.reps = args.reps or (9 if on_cpu else 10)
    C.quiet_transformers()
    side = args.image_size
    subject, shape = C.build_subject(args, protocol=LVR.with_steps(args.latent_steps), force_start=True,
                                     max_pixels=side * side)
    print(f"model: {args.size} {shape} on {args.device} ({C.resolve_dtype(args)}), attention {args.attn}, "
          f"{torch.get_num_threads()} CPU thread(s), timing {C.resolve_clock(args)} time")
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=args.max_new_tokens,
                                                  latent_steps=args.latent_steps))
    # instance 0 is the prompt under study; instance 1 only donates latents for the patch intervention
    instances, images = C.instances_with_images([[(side, side)] * args.images] * 2)
    batch = subject.encode(instances[:1], images=images[:1])
    donor_batch = subject.encode(instances[1:], images=images[1:])
    n_image_tokens = int(batch.mm_token_type_ids.sum())

    clean = decoder.run(batch).rows[0]
    donor = decoder.run(donor_batch).rows[0]
    stats = LatentStats.from_vectors(torch.cat([clean.latent_vectors, donor.latent_vectors]))
    ivs = sweep_interventions()
    binding = RowBinding(clean.instance_id, clean=clean.latent_vectors, stats=stats, donor=donor.latent_vectors)
    edits = [iv.bind(binding) for iv in ivs]
    m = len(edits)

    # The sweep must be the same computation as the naive runs, or the comparison means nothing.
    swept = decoder.decode(decoder.prefill(batch), edits, repeats=m)
    alone = [decoder.run(batch, edit).rows[0] for edit in edits]
    same_ids = all(a.generated_ids == b.generated_ids for a, b in zip(alone, swept.rows))
    tol = 1e-3 if on_cpu and C.resolve_dtype(args) == torch.float32 else 5e-2
    max_diff = max(float((a.latent_vectors - b.latent_vectors).abs().max()) if a.n_latent_steps else 0.0
                   for a, b in zip(alone, swept.rows))
    changed = sum(not torch.allclose(a.latent_vectors, clean.latent_vectors) for a in alone
                  if a.latent_vectors.shape == clean.latent_vectors.shape)

    def naive():
        for edit in edits:
            decoder.run(batch, edit)

    # the same sweep with each key/value cache forced (the default, "auto", picks by the cache's size)
    forced = {kv: LatentDecoder(subject, decoder.config, kv_cache=kv) for kv in ("preallocated", "dynamic")}
    for kv, other in forced.items():
        again = other.decode(other.prefill(batch), edits, repeats=m)
        assert all(a.generated_ids == b.generated_ids and torch.equal(a.latent_vectors, b.latent_vectors)
                   for a, b in zip(again.rows, swept.rows)), kv
    variants = {"clean": lambda: decoder.run(batch),
                "prefix reuse": lambda: decoder.decode(decoder.prefill(batch), edits, repeats=m),
                "prefix reuse, preallocated cache":
                    lambda: forced["preallocated"].decode(forced["preallocated"].prefill(batch), edits, repeats=m),
                "prefix reuse, DynamicCache":
                    lambda: forced["dynamic"].decode(forced["dynamic"].prefill(batch), edits, repeats=m),
                "naive": naive, "prefill only": lambda: decoder.prefill(batch)}
    times = C.time_interleaved(variants, args.reps, args.device, budget_s=budget, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    base = med["clean"]
    ratios = {k: v / base for k, v in med.items()}
    spreads = {k: C.paired_spread(times[k], times["clean"]) for k in variants}
    targets = {"prefix reuse": ("<= 1.5", ratios["prefix reuse"] <= 1.5),
               "naive": ("about 9 (8 runs)", None)}
    rows = []
    for name in variants:
        target, met = targets.get(name, ("-", None))
        rows.append({"variant": name, "median_s": med[name], "x clean": ratios[name], "+-": spreads[name],
                     "target": target,
                     "met": "-" if met is None else ("yes" if met else "NO")})
    C.print_table(f"[sweep of {m} latent interventions] prompt length {batch.input_ids.shape[1]} "
                  f"({n_image_tokens} image tokens), {args.latent_steps} latent steps, "
                  f"{args.max_new_tokens} generated positions; sweep equals naive runs: "
                  f"{'yes' if same_ids and max_diff <= tol else 'NO'} (ids {same_ids}, max |dz| {max_diff:.2e})",
                  rows, ["variant", "median_s", "x clean", "+-", "target", "met"])
    share = med["prefill only"] / base
    print(f"\nthe prefill is {share:.0%} of a clean run, so the sweep's {m}-row decode loop costs "
          f"{(med['prefix reuse'] - med['prefill only']) / (base - med['prefill only']):.2f}x one clean decode loop")
    C.write_results("bench_interventions", args, shape, {
        "settings": {"image_size": side, "images": args.images, "max_new_tokens": args.max_new_tokens,
                     "latent_steps": args.latent_steps, "reps": args.reps, "budget_s": budget},
        "prompt_length": int(batch.input_ids.shape[1]), "image_tokens": n_image_tokens,
        "interventions": [iv.name for iv in ivs], "interventions_changing_latents": changed,
        "sweep_equals_naive": {"generated_ids": same_ids, "max_abs_latent_diff": max_diff, "tolerance": tol},
        "times_s": times, "median_s": med, "ratios_to_clean": ratios, "ratio_spreads": spreads,
        "summary": {"prefix_reuse_over_clean": ratios["prefix reuse"], "naive_over_clean": ratios["naive"],
                    "prefix_reuse_target": "<= 1.5", "prefix_reuse_met": ratios["prefix reuse"] <= 1.5}})


if __name__ == "__main__":
    main()
