"""Benchmark a (layer x latent step) patching grid with prefill reuse against independent runs, and an attention
knockout run against a clean run.

Sections, each timed side by side in this one process (repetitions interleaved in rotating order, medians):

grid       one instance, the denoising grid over every layer 0..N x every latent step (image-swap corruption), in
           clean runs (target: <= 4 for 7 x 8 cells):
  reuse        what `patch_map` does: the clean reference run (prefill + decode, the grid's states copied), the
               corrupted prefill, then ONE batched decode of all L x K patched cells in which a latent[k] cell's
               rows join at step k as copies of the unpatched corrupted run, decoded there as their trunk (its
               states copied from it: `reference_with_cells`); the decoder's default key/value cache;
  reuse, separate corrupted run   the corrupted reference run decoded on its own, then the cells (with joins);
  reuse, cells from step 0   that, with every cell's rows run from the first step (``join_late=False``);
  reuse, round 3             that, with transformers' DynamicCache (round three's code path);
  independent  the clean reference run, then L x K separate runs of the corrupted input, each with its own
               prefill and one patched cell. Expected: far more (about L x K corrupted runs).
  Before timing, every cell of every variant is checked against the independent runs (gold log-odds).
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
from latentprobe.where.patching import (DecodePatcher, PatchGrid, _outcomes, can_share_reference, reference_run,
                                       reference_with_cells, run_cells)
from latentprobe.model.protocol import LVR


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=448, help="side of the (square) image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--latent-steps", type=int, default=8)
    parser.add_argument("--sections", default="grid,knockout")
    parser.add_argument("--grid-variants", default="independent",
                        help="'independent' also times one independent run per cell (about 10x the rest); '' skips it")
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
        round3 = LatentDecoder(subject, decoder.config, kv_cache="dynamic")
        timer = C.timer(clock)

        def reuse_with(dec, join_late, shared):
            """The reference runs, then every cell side by side from the corrupted prefill; ``shared``: the
            corrupted run decoded as the trunk of the cells (patch_map's path); the parts are timed apart."""
            def run():
                t0 = timer()
                clean = reference_run(dec, clean_batch, grid, None, prompt_states=False)
                done = None
                if shared:
                    assert can_share_reference(dec, grid, "recompute")
                    corrupt, done = reference_with_cells(dec, subject, chunk, grid, corrupt_batch, clean, None,
                                                         4096, prompt_states=False)
                else:
                    corrupt = reference_run(dec, corrupt_batch, grid, None, prompt_states=False)
                t1 = timer()
                out = run_cells(dec, subject, chunk, grid, corrupt, clean, None, "recompute", max_rows=4096,
                                join_late=join_late, done=done)
                t2 = timer()
                run.out = out
                return {"reference runs": t1 - t0, "cells": t2 - t1}
            return run

        variants = {"reuse": reuse_with(decoder, True, True),
                    "reuse, separate corrupted run": reuse_with(decoder, True, False),
                    "reuse, cells from step 0": reuse_with(decoder, False, False),
                    "reuse, round 3 (DynamicCache, cells from step 0)": reuse_with(round3, False, False)}

        def independent():
            clean = reference_run(decoder, clean_batch, grid, None, prompt_states=False)
            out = {}
            for cell in cells:
                prefill = decoder.prefill(corrupt_batch)
                base = _BaseCounts(prefill, clean)
                with DecodePatcher(decoder, [cell], clean, base):
                    result = decoder.decode(prefill, consume=True)
                out[cell] = _outcomes(subject, chunk, result)
            independent.out = out

        independent()
        for run in variants.values():
            run()
        slow = independent.out
        worst = {name: max(abs(a[0][1] - b[0][1]) for a, b in ((run.out[c], slow[c]) for c in cells))
                 for name, run in variants.items()}
        moved = sum(abs(slow[c][0][1] - slow[cells[0]][0][1]) > 1e-6 for c in cells)
        print(f"grid: {len(cells)} cells ({len(grid.layers)} layers x {len(grid.steps)} steps); max |gold log-odds "
              f"difference| to independent runs: " + ", ".join(f"{k}: {v:.2e}" for k, v in worst.items())
              + f"; {moved} cells differ from the first")
        assert max(worst.values()) < (1e-3 if C.resolve_dtype(args) == torch.float32 else 5e-2), worst
        timed = {**variants, "independent": independent, "clean run": lambda: decoder.run(clean_batch) and None}
        if "independent" not in args.grid_variants:
            del timed["independent"]
        times = C.time_interleaved(timed, args.reps, args.device, budget_s=budget, clock=clock)
        med = {k: C.median(v) for k, v in times.items()}
        clean_med = med["clean run"]
        rows = []
        for name in variants:
            spread = C.paired_spread(times[name], times["clean run"])
            rows.append({"variant": name, "median_s": med[name], "clean runs": med[name] / clean_med, "+-": spread,
                         "reference runs (+ shared cells)": med[f"{name}/reference runs"] / clean_med,
                         "cells": med[f"{name}/cells"] / clean_med,
                         "target": "<= 4", "met": "yes" if med[name] / clean_med <= 4 else "NO"})
        if "independent" in med:
            rows.append({"variant": "independent runs", "median_s": med["independent"],
                         "clean runs": med["independent"] / clean_med})
        C.print_table(f"grid: {len(cells)} cells, one instance with {payload['n_image_tokens']} image tokens, in "
                      f"clean runs (the cells' decode and the two reference runs apart); variants interleaved",
                      rows, ["variant", "median_s", "clean runs", "+-", "reference runs (+ shared cells)", "cells",
                             "target", "met"])
        ratio = med["independent"] / med["reuse"] if "independent" in med else None
        if ratio is not None:
            print(f"independent / reuse = {ratio:.2f}x")
        payload["grid"] = {"cells": len(cells), "layers": len(grid.layers), "steps": len(grid.steps),
                           "times": times, "median": med, "clean_median": clean_med,
                           "clean_runs": {name: med[name] / clean_med for name in variants},
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
