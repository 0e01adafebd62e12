"""Benchmark the latent decoder on a random-weight Qwen2.5-VL-shaped model.

Three measurements, each a ratio of variants timed side by side in this one process (repetitions interleaved
in rotating order, medians taken). Targets are printed, never asserted.

  trace     tracing overhead at latent steps: untraced decoding vs Recorder(layers="final", latent only) vs
            Recorder(layers="all", latent only), each including ``records()`` (the one copy to CPU).
            Targets: <= 1.05x and <= 1.15x. Reported over the whole run and over the decode loop alone
            (run time minus the prefill's, i.e. the part made of latent/text steps).
  generate  no latent steps (protocol None): decoder tokens/s vs transformers' ``model.generate`` greedy on
            the same left-padded batch, same max_new_tokens, an eos id no argmax can produce so both decode
            exactly max_new_tokens per row (checked). Target: decoder/generate >= 1.0.
  batch     per-instance throughput of the latent decoder at batch B vs the same B instances run one by one
            (batch 1). Reported as throughput(B) / throughput(1).

    python bench/bench_decoder.py                       # CPU, the "small" model (hidden 512, 6 layers)
    python bench/bench_decoder.py --size tiny
    python bench/bench_decoder.py --device cuda --dtype bfloat16 --size 7b
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from latentprobe.model.protocol import LVR
from latentprobe.model.recording import Recorder, RecordSpec


def image_sizes(batch: int, side: int) -> list[list[tuple[int, int]]]:
    """Different image shapes per row (different prompt lengths, so the batch is really left-padded)."""
    q = lambda x: max(56, int(round(x / 28)) * 28)
    shapes = [(side, side), (q(side * 0.75), side), (side, q(side * 0.5)), (q(side * 0.5), q(side * 0.75))]
    return [[shapes[i % len(shapes)]] for i in range(batch)]


def bench_trace(subject, args, budget):
    proto = LVR.with_steps(args.latent_steps)
    latent = C.with_protocol(subject, proto, force_start=True)
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, latent_steps=args.latent_steps)
    decoder = LatentDecoder(latent, config)
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    batch = latent.encode(instances, images=images)
    specs = {"untraced": None,
             "recorder final": RecordSpec(layers="final", latent=True, image=None, prompt_last=False),
             "recorder all": RecordSpec(layers="all", latent=True, image=None, prompt_last=False)}
    clock = C.resolve_clock(args)
    timer = C.timer(clock)
    shapes = {}

    def variant(name):
        """One whole run (= decoder.run), timing the prefill and the decode loop (+ records()) separately."""
        def run():
            recorder = Recorder(decoder, specs[name]).__enter__() if specs[name] is not None else None
            try:
                C.sync(args.device)
                t0 = timer()
                prefill = decoder.prefill(batch)
                C.sync(args.device)
                t1 = timer()
                decoder.decode(prefill, consume=True)
                if recorder is not None:
                    records = recorder.records()
                    shapes[name] = tuple(records[0]["latent_layers"].shape)
                C.sync(args.device)
                t2 = timer()
            finally:
                if recorder is not None:
                    recorder.close()
            return {"prefill": t1 - t0, "loop": t2 - t1}
        return run

    times = C.time_interleaved({name: variant(name) for name in specs}, args.reps, args.device, budget_s=budget,
                               clock=clock)
    med = {k: C.median(v) for k, v in times.items()}
    check = decoder.run(batch)
    n_latent = [row.n_latent_steps for row in check.rows]
    rows, ratios = [], {}
    for name, target in (("untraced", None), ("recorder final", 1.05), ("recorder all", 1.15)):
        run_ratio = med[name] / med["untraced"]
        loop_ratio = med[f"{name}/loop"] / med["untraced/loop"]
        spread = C.paired_spread(times[f"{name}/loop"], times["untraced/loop"])
        extra = 1e3 * (med[f"{name}/loop"] - med["untraced/loop"]) / args.max_new_tokens
        ratios[name] = {"run": run_ratio, "loop": loop_ratio, "loop_spread": spread, "target": target,
                        "met_loop": None if target is None else loop_ratio <= target,
                        "met_run": None if target is None else run_ratio <= target, "extra_ms_per_step": extra}
        rows.append({"variant": name, "prefill_s": med[f"{name}/prefill"], "loop_s": med[f"{name}/loop"],
                     "x loop": loop_ratio, "+-": spread, "x run": run_ratio,
                     "target": f"<= {target}" if target else "-",
                     "met": "-" if target is None else _met(loop_ratio <= target, run_ratio <= target),
                     "extra ms/step": extra})
    C.print_table(f"[trace] batch {args.batch}, {args.latent_steps} latent steps of {args.max_new_tokens} "
                  f"generated positions, prompt length {batch.input_ids.shape[1]}; x loop: the decode loop "
                  f"(+ records()), x run: prefill + loop; +-: half the IQR of per-repetition loop ratios",
                  rows, ["variant", "prefill_s", "loop_s", "x loop", "+-", "x run", "target", "met",
                         "extra ms/step"])
    return {"times_s": times, "median_s": med, "ratios": ratios, "latent_steps_per_row": n_latent,
            "record_shapes": shapes, "prompt_length": int(batch.input_ids.shape[1]), "batch": args.batch,
            "max_new_tokens": args.max_new_tokens, "latent_steps": args.latent_steps,
            "reps_done": len(times["untraced"])}


def _met(loop_ok: bool, run_ok: bool) -> str:
    if loop_ok and run_ok:
        return "yes"
    return "run only" if run_ok else ("loop only" if loop_ok else "NO")


def bench_generate(subject, args, budget):
    plain = C.with_protocol(subject, None)
    decoder = LatentDecoder(plain, DecodeConfig(max_new_tokens=args.max_new_tokens))
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    batch = plain.encode(instances, images=images).to(args.device)
    model = plain.model

    def generate():
        return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                              mm_token_type_ids=batch.mm_token_type_ids, max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=plain.eos_token_ids, pad_token_id=plain.pad_token_id)

    # Equal work: every row of both produces exactly max_new_tokens tokens (no early stop on either side).
    prompt_len = batch.input_ids.shape[1]
    reference = generate()[:, prompt_len:].cpu()
    ours = decoder.run(batch)
    assert reference.shape[1] == args.max_new_tokens, reference.shape
    assert all(len(row.generated_ids) == args.max_new_tokens for row in ours.rows)
    agreement = float((ours.sequences[:, prompt_len:] == reference).float().mean())

    times = C.time_interleaved({"generate": generate, "decoder": lambda: decoder.run(batch)}, args.reps,
                               args.device, budget_s=budget, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    tokens = args.batch * args.max_new_tokens
    tps = {k: tokens / v for k, v in med.items()}
    ratio = tps["decoder"] / tps["generate"]
    spread = C.paired_spread(times["generate"], times["decoder"])
    rows = [{"variant": "model.generate", "median_s": med["generate"], "tokens/s": tps["generate"], "x": 1.0},
            {"variant": "LatentDecoder.run", "median_s": med["decoder"], "tokens/s": tps["decoder"], "x": ratio,
             "+-": spread, "target": ">= 1.0", "met": "yes" if ratio >= 1.0 else "NO"}]
    C.print_table(f"[generate] no latent steps, batch {args.batch} left-padded (prompt length {prompt_len}), "
                  f"{args.max_new_tokens} new tokens per row; greedy tokens agree on {agreement:.1%}",
                  rows, ["variant", "median_s", "tokens/s", "x", "+-", "target", "met"])
    return {"times_s": times, "median_s": med, "tokens_per_s": tps, "ratio_decoder_over_generate": ratio,
            "ratio_spread": spread, "target": ">= 1.0", "met": ratio >= 1.0, "token_agreement": agreement,
            "prompt_length": int(prompt_len), "batch": args.batch, "max_new_tokens": args.max_new_tokens}


def bench_batch(subject, args, budget):
    proto = LVR.with_steps(args.latent_steps)
    latent = C.with_protocol(subject, proto, force_start=True)
    decoder = LatentDecoder(latent, DecodeConfig(max_new_tokens=args.max_new_tokens, latent_steps=args.latent_steps))
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    batch = latent.encode(instances, images=images)
    singles = [latent.encode([inst], images=[imgs]) for inst, imgs in zip(instances, images)]

    def one_by_one():
        for single in singles:
            decoder.run(single)

    times = C.time_interleaved({f"batch {args.batch}": lambda: decoder.run(batch), "batch 1": one_by_one},
                               args.reps, args.device, budget_s=budget, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    per_instance = {k: args.batch / v for k, v in med.items()}  # instances per second
    ratio = per_instance[f"batch {args.batch}"] / per_instance["batch 1"]
    spread = C.paired_spread(times["batch 1"], times[f"batch {args.batch}"])
    rows = [{"variant": f"{args.batch} instances one by one (batch 1)", "median_s": med["batch 1"],
             "instances/s": per_instance["batch 1"], "x": 1.0},
            {"variant": f"{args.batch} instances in one batch", "median_s": med[f"batch {args.batch}"],
             "instances/s": per_instance[f"batch {args.batch}"], "x": ratio, "+-": spread}]
    C.print_table(f"[batch] per-instance throughput, latent decoding ({args.latent_steps} latent steps, "
                  f"{args.max_new_tokens} positions)", rows, ["variant", "median_s", "instances/s", "x", "+-"])
    return {"times_s": times, "median_s": med, "instances_per_s": per_instance,
            "ratio_batch_over_single": ratio, "ratio_spread": spread, "batch": args.batch}


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--latent-steps", type=int, default=24, help="latent steps per row (trace and batch)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the largest image in the batch")
    parser.add_argument("--sections", default="trace,generate,batch")
    C.add_budget(parser, cpu_seconds=45.0)
    args, on_cpu, budget = C.parse_checked(parser, cpu_seconds=45.0)
    section_reps = {"trace": 12, "generate": 9, "batch": 5} if on_cpu else {"trace": 10, "generate": 10, "batch": 5}
    if args.reps:
        section_reps = {k: args.reps for k in section_reps}
    C.quiet_transformers()
    subject, shape = C.build_subject(args)
    print(f"model: {args.size} {shape} on {args.device} ({C.resolve_dtype(args)}), attention {args.attn}, "
          f"{torch.get_num_threads()} CPU thread(s), timing {C.resolve_clock(args)} time")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {}
    for name, fn in (("trace", bench_trace), ("generate", bench_generate), ("batch", bench_batch)):
        if name in sections:
            args.reps = section_reps[name]
            results[name] = fn(subject, args, budget)
    summary = {"targets": {"trace_final": "<= 1.05", "trace_all": "<= 1.15", "decoder_over_generate": ">= 1.0"}}
    if "trace" in results:
        r = results["trace"]["ratios"]
        summary["trace_final_loop"] = r["recorder final"]["loop"]
        summary["trace_final_run"] = r["recorder final"]["run"]
        summary["trace_all_loop"] = r["recorder all"]["loop"]
        summary["trace_all_run"] = r["recorder all"]["run"]
    if "generate" in results:
        summary["decoder_over_generate"] = results["generate"]["ratio_decoder_over_generate"]
    if "batch" in results:
        summary["batch_over_single"] = results["batch"]["ratio_batch_over_single"]
    C.write_results("bench_decoder", args, shape,
                    {"settings": {"batch": args.batch, "max_new_tokens": args.max_new_tokens,
                                  "latent_steps": args.latent_steps, "image_size": args.image_size,
                                  "reps": section_reps, "budget_s": budget},
                     "summary": summary, "sections": results})


if __name__ == "__main__":
    main()
