"""Benchmark the component controls (no-latent, markers-only, dummy, oracle) over one long image prompt.

Variants timed side by side in this one process (repetitions interleaved in rotating order, medians):

  clean          ``decoder.run(batch)``: one clean decode of the prompt (the unit)
  controls       what ``latentprobe.runs.intervene`` does: ``prefill`` once; markers-only, dummy and oracle decoded
                 side by side from it (``repeats=3``), and no-latent from ``prefill_without_start`` of the same
                 prefill (its cache cropped, one position rerun): no second prompt prefill
  naive          each control on its own: three ``run(batch, edit)`` calls and one ``run`` of a freshly encoded
                 prompt without the start token

Before timing, the reused-prefill rows are checked to equal the naive runs (same generated ids).

    python bench/bench_controls.py                      # CPU, the "small" model
    python bench/bench_controls.py --size tiny
    python bench/bench_controls.py --device cuda --dtype bfloat16 --size 7b
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import torch

from latentprobe.interventions import DummyToken, MarkersOnly, NoLatent, OracleLatents, RowBinding
from latentprobe.model.decoding import DecodeConfig, LatentDecoder, prefill_without_start
from latentprobe.model.protocol import LVR


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=448, help="side of the (square) image")
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
    instances, images = C.instances_with_images([[(side, side)]])
    batch = subject.encode(instances, images=images)
    start = subject.protocol.start_token
    stripped = subject.encode(instances, images=images, prompts=[p[: -len(start)] for p in batch.prompts])
    clean = decoder.run(batch).rows[0]
    dummy = DummyToken()
    dummy.check_subject(subject)
    binding = RowBinding(clean.instance_id, clean=clean.latent_vectors,
                         forced=torch.flip(clean.latent_vectors, dims=[0]))  # stands in for an oracle source
    side_by_side = [iv.bind(binding) for iv in (MarkersOnly(), dummy, OracleLatents(source=None))]
    no_latent = NoLatent().bind(binding)

    def controls():
        prefill = decoder.prefill(batch)
        rows = decoder.decode(prefill, side_by_side, repeats=len(side_by_side)).rows
        return rows + decoder.decode(prefill_without_start(decoder, prefill), no_latent).rows

    def naive():
        rows = [decoder.run(batch, edit).rows[0] for edit in side_by_side]
        return rows + decoder.run(stripped, no_latent).rows

    same_ids = all(a.generated_ids == b.generated_ids for a, b in zip(controls(), naive()))
    variants = {"clean": lambda: decoder.run(batch), "controls": controls, "naive": naive}
    times = C.time_interleaved(variants, args.reps, args.device, budget_s=budget, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    ratios = {k: v / med["clean"] for k, v in med.items()}
    spreads = {k: C.paired_spread(times[k], times["clean"]) for k in variants}
    rows = [{"variant": name, "median_s": med[name], "x clean": ratios[name], "+-": spreads[name]}
            for name in variants]
    C.print_table(f"[4 component controls] prompt length {batch.input_ids.shape[1]}, {args.latent_steps} latent "
                  f"steps, {args.max_new_tokens} generated positions; reused prefill equals naive runs: "
                  f"{'yes' if same_ids else 'NO'}", rows, ["variant", "median_s", "x clean", "+-"])
    C.write_results("bench_controls", args, shape, {
        "settings": {"image_size": side, "max_new_tokens": args.max_new_tokens, "latent_steps": args.latent_steps,
                     "reps": args.reps, "budget_s": budget},
        "prompt_length": int(batch.input_ids.shape[1]), "reused_prefill_equals_naive": same_ids,
        "times_s": times, "median_s": med, "ratios_to_clean": ratios, "ratio_spreads": spreads})


if __name__ == "__main__":
    main()
