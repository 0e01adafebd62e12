"""Benchmark a (layer x latent step) patching grid with prefill reuse against independent runs, and an attention
knockout run against a clean run.

Sections, each timed side by side in this one process (repetitions interleaved in rotating order, medians):

grid       one instance, the denoising grid over every layer 0..N x every latent step (image-swap corruption):
  reuse        the clean and the corrupted reference runs (prefill + decode, states copied at every layer),
               then ONE batched decode of all L x K patched cells from the corrupted prefill
               (`latentprobe.where.patching.run_cells`, what `patch_map` does);
  independent  the clean reference run, then L x K separate runs of the corrupted input, each with its own
               prefill and one patched cell. Expected: far more (about L x K corrupted runs).
  Before timing, every cell of the two variants is checked to give the same answer probabilities.
knockout   one instance: ``decoder.run`` vs the same run with ``knockout[answer->latent]@layers[all]`` (the
           mask edit in every block at every answer step), as whole runs and as decodes from one prefill.
           Target: within 1.2x.

    python bench/bench_patching.py                      # CPU, the "small" model
    python bench/bench_patching.py --size tiny
    python bench/bench_patching.py --device cuda --dtype bfloat16 --size 7b
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import numpy as np
import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.interventions.knockout import AttentionKnockout, run_knockout
from latentprobe.where.patching import DecodePatcher, PatchGrid, _outcomes, reference_run, run_cells
from latentprobe.model.protocol import LVR


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=448, help="side of the (square) image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--sections", default="grid,knockout")
    C.add_budget(parser, cpu_seconds=150.0)
    args, on_cpu, budget = C.parse_checked(parser, cpu_seconds=150.0)
    args.reps = args.reps or (5 if on_cpu else 10)
    C.quiet_transformers()
    side = args.image_size
    subject, shape = C.build_subject(args, protocol=LVR.with_steps(args.latent_steps), force_start=True,
                                     max_pixels=side * side)
    clock = C.resolve_clock(args)
    print(f"model: {args.size} {shape} on {args.device} ({C.resolve_dtype(args)}), attention {args.attn}, "
          f"{torch.get_num_threads()} CPU thread(s), timing {clock} time")
    decoder = LatentDecoder(subject, DecodeConfig(max_new_tokens=args.max_new_tokens, latent_steps=args.latent_steps))
    instances, images = C.instances_with_images([[(side, side)]] * 2)
    chunk = instances[:1]
    clean_batch = subject.encode(chunk, images=images[:1])
    corrupt_batch = subject.encode(chunk, images=images[1:])  # instance 1's image: an image swap
    payload = {"n_image_tokens": int(clean_batch.mm_token_type_ids.sum())}
    sections = [s.strip() for s in args.sections.split(",")]

    if "grid" in sections:
        grid = PatchGrid(layers=tuple(range(subject.num_layers + 1)), steps=tuple(range(args.latent_steps)), groups=())
        cells = grid.step_sites()

        def reuse():
            clean = reference_run(decoder, clean_batch, grid, None, prompt_states=False)
            corrupt = reference_run(decoder, corrupt_batch, grid, None, prompt_states=False)
            return run_cells(decoder, subject, chunk, grid, corrupt, clean, None, "recompute", max_rows=4096)

        def independent():
            clean = reference_run(decoder, clean_batch, grid, None, prompt_states=False)
            out = {}
            for cell in cells:
                prefill = decoder.prefill(corrupt_batch)
                base = _BaseCounts(prefill, clean)
                with DecodePatcher(decoder, [cell], clean, base):
                    result = decoder.decode(prefill, consume=True)
                out[cell] = _outcomes(subject, chunk, result)
            return out

        fast, slow = reuse(), independent()
        worst = max(abs(a[0][1] - b[0][1]) for a, b in ((fast[c], slow[c]) for c in cells))
        moved = sum(abs(fast[c][0][1] - fast[cells[0]][0][1]) > 1e-6 for c in cells)
        print(f"grid: {len(cells)} cells ({len(grid.layers)} layers x {len(grid.steps)} steps); reuse vs "
              f"independent: max |gold log-odds difference| {worst:.2e}; {moved} cells differ from the first")
        assert worst < (1e-3 if C.resolve_dtype(args) == torch.float32 else 5e-2), worst
        # (a variant returning a dict would be read as timed parts: return nothing)
        times = C.time_interleaved({"reuse": lambda: reuse() and None, "independent": lambda: independent() and None},
                                   args.reps, args.device, budget_s=budget, clock=clock)
        unit = C.time_interleaved({"clean run": lambda: decoder.run(clean_batch)}, args.reps, args.device,
                                  budget_s=budget, clock=clock)["clean run"]
        med = {k: C.median(v) for k, v in times.items()}
        clean_med = C.median(unit)
        rows = [{"variant": k, "median_s": med[k], "clean_runs": med[k] / clean_med} for k in med]
        ratio = med["independent"] / med["reuse"]
        C.print_table(f"grid: {len(cells)} cells, one instance with {payload['n_image_tokens']} image tokens",
                      rows, ["variant", "median_s", "clean_runs"])
        print(f"independent / reuse = {ratio:.2f}x (+/- {C.paired_spread(times['independent'], times['reuse']):.2f}); "
              f"reuse costs {med['reuse'] / clean_med:.2f} clean runs for {len(cells)} cells")
        payload["grid"] = {"cells": len(cells), "layers": len(grid.layers), "steps": len(grid.steps),
                           "times": times, "clean_run": unit, "median": med, "clean_median": clean_med,
                           "ratio_independent_over_reuse": ratio, "max_abs_logodds_diff": worst}

    if "knockout" in sections:
        knockout = AttentionKnockout(["answer->latent"])
        prefill = decoder.prefill(clean_batch)
        assert run_knockout(decoder, clean_batch, knockout).rows[0].generated_ids is not None
        variants = {
            "clean run": lambda: decoder.run(clean_batch),
            "knockout run": lambda: run_knockout(decoder, clean_batch, knockout),
            "clean decode": lambda: decoder.decode(prefill),
            "knockout decode": lambda: run_knockout(decoder, clean_batch, knockout, prefill=prefill),
        }
        times = C.time_interleaved(variants, max(args.reps, 7), args.device, budget_s=budget, clock=clock)
        med = {k: C.median(v) for k, v in times.items()}
        run_ratio = med["knockout run"] / med["clean run"]
        decode_ratio = med["knockout decode"] / med["clean decode"]
        C.print_table("knockout[answer->latent]@layers[all] vs clean", [{"variant": k, "median_s": v}
                                                                       for k, v in med.items()],
                      ["variant", "median_s"])
        print(f"knockout / clean: whole run {run_ratio:.3f}x "
              f"(+/- {C.paired_spread(times['knockout run'], times['clean run']):.3f}), decode only "
              f"{decode_ratio:.3f}x (+/- {C.paired_spread(times['knockout decode'], times['clean decode']):.3f}); "
              f"target <= 1.2x")
        payload["knockout"] = {"times": times, "median": med, "ratio_run": run_ratio, "ratio_decode": decode_ratio}
    C.write_results("bench_patching", args, shape, payload)


class _BaseCounts:
    """The base run's facts `DecodePatcher` reads for a recompute grid (latent counts are only used by pin)."""

    def __init__(self, prefill, like):
        self.prefill = prefill
        self.latent_count = like.latent_count
        self.latent = like.latent
        self.layers = like.layers

    def layer_pos(self, layer):
        return self.layers.index(layer)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
