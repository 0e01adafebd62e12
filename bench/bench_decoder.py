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

from latentprobe.model.decoding import KV_CACHES, DecodeConfig, LatentDecoder

LONG_CACHES = ("preallocated", "dynamic")  # the default ("auto") preallocates at this size (9 MiB per layer)
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
    """Decoder tokens/s vs ``generate``: the decoder as it runs by default (``kv_cache="auto"``) and with each
    key/value cache forced (preallocated; transformers' DynamicCache, what ``generate`` uses), all timed side by
    side."""
    plain = C.with_protocol(subject, None)
    decoders = {kv: LatentDecoder(plain, DecodeConfig(max_new_tokens=args.max_new_tokens), kv_cache=kv)
                for kv in KV_CACHES}
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
    outputs = {kv: decoder.run(batch) for kv, decoder in decoders.items()}
    assert reference.shape[1] == args.max_new_tokens, reference.shape
    for out in outputs.values():
        assert all(len(row.generated_ids) == args.max_new_tokens for row in out.rows)
        assert torch.equal(out.sequences, outputs["auto"].sequences)
    agreement = float((outputs["auto"].sequences[:, prompt_len:] == reference).float().mean())
    auto_picks = type(decoders["auto"].last_cache).__name__

    names = {"auto": "decoder", "preallocated": "decoder, preallocated cache", "dynamic": "decoder, DynamicCache"}
    variants = {"generate": generate, **{names[kv]: (lambda d=d: d.run(batch)) for kv, d in decoders.items()}}
    times = C.time_interleaved(variants, args.reps, args.device, budget_s=budget, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    tokens = args.batch * args.max_new_tokens
    tps = {k: tokens / v for k, v in med.items()}
    ratios = {kv: tps[names[kv]] / tps["generate"] for kv in KV_CACHES}
    spreads = {kv: C.paired_spread(times["generate"], times[names[kv]]) for kv in KV_CACHES}
    ratio = ratios["auto"]
    rows = [{"variant": "model.generate", "median_s": med["generate"], "tokens/s": tps["generate"], "x generate": 1.0}]
    for kv in ("dynamic", "preallocated", "auto"):
        label = f"LatentDecoder.run (default: {auto_picks})" if kv == "auto" else f"LatentDecoder.run, {names[kv][9:]}"
        rows.append({"variant": label, "median_s": med[names[kv]], "tokens/s": tps[names[kv]],
                     "x generate": ratios[kv], "+-": spreads[kv],
                     **({"target": ">= 1.0", "met": "yes" if ratio >= 1.0 else "NO"} if kv == "auto" else {})})
    C.print_table(f"[generate] no latent steps, batch {args.batch} left-padded (prompt length {prompt_len}), "
                  f"{args.max_new_tokens} new tokens per row; greedy tokens agree on {agreement:.1%} (the caches: "
                  f"identical)", rows, ["variant", "median_s", "tokens/s", "x generate", "+-", "target", "met"])
    return {"times_s": times, "median_s": med, "tokens_per_s": tps, "ratio_decoder_over_generate": ratio,
            "ratio_by_cache": ratios, "spread_by_cache": spreads, "auto_cache": auto_picks,
            "ratio_spread": spreads["auto"], "target": ">= 1.0", "met": ratio >= 1.0, "token_agreement": agreement,
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


def bench_long(subject, args, budget):
    """Step time along a long output: no latent steps, ``--long-tokens`` new tokens at batch ``--batch``, with the
    decoder's preallocated KV cache and with transformers' DynamicCache (``kv_cache="dynamic"``), runs of the two
    interleaved. Each step's time is the time from one forward's start to the next one's (the decoder's
    bookkeeping and the model's forward); the forward alone and, inside it, the attention kernel
    (``scaled_dot_product_attention``, every layer) are timed too. The ratio is the median of the last 100 steps
    over the median of the first 100 (steps 1-100: step 0 also pays one-time setup)."""
    import torch.nn.functional as F

    plain = C.with_protocol(subject, None)
    decoders = {kv: LatentDecoder(plain, DecodeConfig(max_new_tokens=args.long_tokens), kv_cache=kv)
                for kv in LONG_CACHES}
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    batch = plain.encode(instances, images=images)
    clock = C.timer(C.resolve_clock(args))
    window = 100
    kernel = F.scaled_dot_product_attention

    def one_run(decoder):
        inner = decoder.inner_model
        starts, inside, attention = [], [], []
        spent = [0.0]

        def timed_attention(*a, **k):
            t0 = clock()
            out = kernel(*a, **k)
            C.sync(args.device)
            spent[0] += clock() - t0
            return out

        def forward(**kwargs):
            C.sync(args.device)
            spent[0] = 0.0
            t0 = clock()
            starts.append(t0)
            out = inner(**kwargs)
            C.sync(args.device)
            inside.append(clock() - t0)
            attention.append(spent[0])
            return out

        decoder.forward_fn = forward
        F.scaled_dot_product_attention = timed_attention
        try:
            result = decoder.run(batch)
        finally:
            decoder.forward_fn = None
            F.scaled_dot_product_attention = kernel
        assert all(len(row.generated_ids) == args.long_tokens for row in result.rows)
        steps = [b - a for a, b in zip(starts[1:], starts[2:])]  # starts[0] is the prefill
        n = len(steps)
        parts = {"whole step": steps, "model forward": inside[1:n + 1],
                 "attention kernel": attention[1:n + 1],
                 "forward without attention": [f - a for f, a in zip(inside[1:n + 1], attention[1:n + 1])],
                 "decoder outside the forward": [s - f for s, f in zip(steps, inside[1:n + 1])]}
        return {"parts": parts, "total_s": sum(steps), "sequences": result.sequences}

    runs = {kv: [] for kv in LONG_CACHES}
    start = C.time.perf_counter()
    for rep in range(args.reps):
        order = list(LONG_CACHES) if rep % 2 == 0 else list(LONG_CACHES)[::-1]
        for kv in order:
            runs[kv].append(one_run(decoders[kv]))
        if budget is not None and rep >= 2 and C.time.perf_counter() - start > budget:
            break
    assert torch.equal(runs["preallocated"][0]["sequences"], runs["dynamic"][0]["sequences"])

    def ratio(values):
        return C.median(values[-window:]) / C.median(values[1:window + 1])

    out = {}
    for kv, kv_runs in runs.items():
        summary = {}
        for part in kv_runs[0]["parts"]:
            series = [run["parts"][part] for run in kv_runs]
            summary[part] = {"ratio_last_over_first": C.median([ratio(v) for v in series]),
                             "per_run": [ratio(v) for v in series],
                             "first_100_ms": C.median([C.median(v[1:window + 1]) for v in series]) * 1e3,
                             "last_100_ms": C.median([C.median(v[-window:]) for v in series]) * 1e3}
        out[kv] = {"parts": summary, "total_s": [run["total_s"] for run in kv_runs],
                   "step_s": [run["parts"]["whole step"] for run in kv_runs],
                   "forward_s": [run["parts"]["model forward"] for run in kv_runs],
                   "attention_s": [run["parts"]["attention kernel"] for run in kv_runs]}
    total_ratio = C.median(out["preallocated"]["total_s"]) / C.median(out["dynamic"]["total_s"])
    floor = _attention_read_floor(plain.model, batch, args, out["preallocated"]["parts"], window)
    rows = []
    for part in out["preallocated"]["parts"]:
        d, p = out["dynamic"]["parts"][part], out["preallocated"]["parts"][part]
        rows.append({"part": part, "Dynamic ms first->last": f"{d['first_100_ms']:.2f} -> {d['last_100_ms']:.2f}",
                     "Dynamic last/first": d["ratio_last_over_first"],
                     "prealloc ms first->last": f"{p['first_100_ms']:.2f} -> {p['last_100_ms']:.2f}",
                     "prealloc last/first": p["ratio_last_over_first"]})
    rows[0]["target"] = "<= 1.10"
    rows[0]["met"] = "yes" if out["preallocated"]["parts"]["whole step"]["ratio_last_over_first"] <= 1.10 else "NO"
    C.print_table(f"[long] {args.long_tokens} new tokens at batch {args.batch} (prompt length "
                  f"{batch.input_ids.shape[1]}), {len(runs['preallocated'])} runs of each cache, interleaved: median "
                  f"step time of the last {window} steps over the first {window} (ids identical with both caches)",
                  rows, ["part", "Dynamic ms first->last", "Dynamic last/first", "prealloc ms first->last",
                         "prealloc last/first", "target", "met"])
    print(f"whole run, preallocated / DynamicCache: {total_ratio:.3f}x the time")
    print(f"attention's read floor: the keys and values it must read per step grow {floor['bytes_last_mb']:.1f} / "
          f"{floor['bytes_first_mb']:.1f} MB; at the measured read bandwidth ({floor['read_gb_per_s']:.1f} GB/s, one "
          f"thread) that is {floor['floor_first_ms']:.2f} -> {floor['floor_last_ms']:.2f} ms, so with attention at "
          f"that floor and the rest of the step as measured, last / first = {floor['ratio_at_floor']:.3f} (the "
          f"kernel runs at {floor['kernel_share_of_floor_last']:.0%} of it at the end)")
    whole = out["preallocated"]["parts"]["whole step"]
    return {"attention_read_floor": floor, "ratio_last_over_first": whole["ratio_last_over_first"],
            "ratio_last_over_first_dynamic": out["dynamic"]["parts"]["whole step"]["ratio_last_over_first"],
            "total_time_preallocated_over_dynamic": total_ratio, "by_cache": out, "target": "<= 1.10",
            "met": whole["ratio_last_over_first"] <= 1.10, "runs": len(runs["preallocated"]),
            "new_tokens": args.long_tokens, "batch": args.batch, "prompt_length": int(batch.input_ids.shape[1])}


def _attention_read_floor(model, batch, args, parts, window) -> dict:
    """What attention alone must cost along a long output: each decode step reads every cached key and value of
    every layer once (no kernel reads less), so its floor is those bytes over the machine's read bandwidth,
    measured here by summing buffers of the same total size (one thread, as the timed runs). Returns the floor
    at the medians of the first and last ``window`` steps and the whole-step ratio the decoder would reach with
    attention at that floor and every other part as measured."""
    import statistics

    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=model.dtype).element_size()
    prompt = int(batch.input_ids.shape[1])
    per_position = 2 * text.num_hidden_layers * args.batch * text.num_key_value_heads * head_dim * element

    def kv_bytes(steps):  # the median step of a window: prompt + generated positions at that step
        return per_position * (prompt + statistics.median(steps))

    first_bytes, last_bytes = kv_bytes(range(1, window + 1)), kv_bytes(range(args.long_tokens - window,
                                                                              args.long_tokens))
    # one buffer per layer and side, as the cache holds them, summed in turn: a read of every byte once
    buffers = [torch.ones(int(last_bytes // element // (2 * text.num_hidden_layers)), dtype=model.dtype,
                          device=args.device) for _ in range(2 * text.num_hidden_layers)]
    clock = C.timer(C.resolve_clock(args))
    times = []
    for _ in range(15):
        C.sync(args.device)
        t0 = clock()
        for buffer in buffers:
            buffer.sum()
        C.sync(args.device)
        times.append(clock() - t0)
    bandwidth = last_bytes / C.median(times[3:])
    floor_first, floor_last = first_bytes / bandwidth, last_bytes / bandwidth
    rest_first = (parts["whole step"]["first_100_ms"] - parts["attention kernel"]["first_100_ms"]) / 1e3
    rest_last = (parts["whole step"]["last_100_ms"] - parts["attention kernel"]["last_100_ms"]) / 1e3
    return {"bytes_first_mb": first_bytes / 1e6, "bytes_last_mb": last_bytes / 1e6, "read_gb_per_s": bandwidth / 1e9,
            "floor_first_ms": floor_first * 1e3, "floor_last_ms": floor_last * 1e3,
            "ratio_at_floor": (rest_last + floor_last) / (rest_first + floor_first),
            "ratio_without_attention": rest_last / rest_first,
            "kernel_share_of_floor_last": floor_last / (parts["attention kernel"]["last_100_ms"] / 1e3)}


def bench_syncs(subject, args, budget):
    """Host reads of device values per decode step (`latentprobe.host_syncs`), counted, not timed: the
    difference between runs of ``n`` and ``2n`` new tokens over ``n`` (one-time reads cancel). Counted outside the
    model's forward (the decoder's or generate's own loop) and in total."""
    from latentprobe.model.host_syncs import HostSyncCounter

    plain = C.with_protocol(subject, None)
    proto = LVR.with_steps(args.latent_steps)
    latent = C.with_protocol(subject, proto, force_start=True)
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    model = subject.model
    n = 16

    def count(fn, tokens):
        outside, total = HostSyncCounter(), HostSyncCounter()
        with total, outside, outside.pause_inside(model.model):
            fn(tokens)
        return outside.count, total.count

    plain_batch = plain.encode(instances, images=images)
    latent_batch = latent.encode(instances, images=images)

    def generate(tokens):
        model.generate(input_ids=plain_batch.input_ids, attention_mask=plain_batch.attention_mask,
                       pixel_values=plain_batch.pixel_values, image_grid_thw=plain_batch.image_grid_thw,
                       mm_token_type_ids=plain_batch.mm_token_type_ids, max_new_tokens=tokens, do_sample=False,
                       eos_token_id=plain.eos_token_ids, pad_token_id=plain.pad_token_id)

    def decoder_plain(tokens):
        LatentDecoder(plain, DecodeConfig(max_new_tokens=tokens)).run(plain_batch)

    def decoder_latent(tokens):  # the first half of the positions are latent steps, the rest text
        LatentDecoder(latent, DecodeConfig(max_new_tokens=tokens, latent_steps=tokens // 2)).run(latent_batch)

    rows, out = [], {}
    for name, fn in (("generate", generate), ("decoder, plain text", decoder_plain),
                     ("decoder, LVR: half latent steps, half text", decoder_latent)):
        (o1, t1), (o2, t2) = count(fn, n), count(fn, 2 * n)
        per_step = {"outside_model": (o2 - o1) / n, "total": (t2 - t1) / n}
        out[name] = per_step
        rows.append({"variant": name, "syncs/step outside model": per_step["outside_model"],
                     "syncs/step total": per_step["total"]})
    C.print_table(f"[syncs] host reads of device values per decode step, batch {args.batch} "
                  f"(counted: ({2 * n} tokens - {n} tokens) / {n})", rows,
                  ["variant", "syncs/step outside model", "syncs/step total"])
    return {"per_step": out, "batch": args.batch, "tokens": [n, 2 * n]}


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--latent-steps", type=int, default=24, help="latent steps per row (trace and batch)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the largest image in the batch")
    parser.add_argument("--sections", default="trace,generate,batch,long,syncs")
    parser.add_argument("--long-tokens", type=int, default=1024, help="new tokens per row in the long section")
    C.add_budget(parser, cpu_seconds=45.0)
    args, on_cpu, budget = C.parse_checked(parser, cpu_seconds=45.0)
    section_reps = ({"trace": 12, "generate": 9, "batch": 5, "long": 3, "syncs": 1} if on_cpu
                    else {"trace": 10, "generate": 10, "batch": 5, "long": 3, "syncs": 1})
    if args.reps:
        section_reps = {k: args.reps for k in section_reps}
    C.quiet_transformers()
    subject, shape = C.build_subject(args)
    print(f"model: {args.size} {shape} on {args.device} ({C.resolve_dtype(args)}), attention {args.attn}, "
          f"{torch.get_num_threads()} CPU thread(s), timing {C.resolve_clock(args)} time")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {}
    for name, fn in (("trace", bench_trace), ("generate", bench_generate), ("batch", bench_batch),
                     ("long", bench_long), ("syncs", bench_syncs)):
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
        summary["decoder_over_generate_by_cache"] = results["generate"]["ratio_by_cache"]
    if "batch" in results:
        summary["batch_over_single"] = results["batch"]["ratio_batch_over_single"]
    if "long" in results:
        summary["long_last_over_first_steps"] = results["long"]["ratio_last_over_first"]
        summary["long_last_over_first_steps_dynamic_cache"] = results["long"]["ratio_last_over_first_dynamic"]
        summary["targets"]["long_last_over_first_steps"] = "<= 1.10"
        floor = results["long"]["attention_read_floor"]
        summary["long_last_over_first_steps_attention_at_read_floor"] = floor["ratio_at_floor"]
        summary["long_last_over_first_steps_without_attention"] = floor["ratio_without_attention"]
    if "syncs" in results:
        summary["syncs_per_step"] = results["syncs"]["per_step"]
    C.write_results("bench_decoder", args, shape,
                    {"settings": {"batch": args.batch, "max_new_tokens": args.max_new_tokens,
                                  "latent_steps": args.latent_steps, "image_size": args.image_size,
                                  "long_tokens": args.long_tokens, "sections": sections,
                                  "reps": section_reps, "budget_s": budget},
                     "summary": summary, "sections": results})


if __name__ == "__main__":
    main()
