"""The `latentprobe` command line. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LatentProbeError


def _add_subject_args(p: argparse.ArgumentParser):
    p.add_argument("--subject", default="tiny", help="a subject name (see `latentprobe subjects`) or a checkpoint folder")
    p.add_argument("--protocol", default=None, help="latent protocol for a checkpoint folder: monet, lvr or mirage")
    p.add_argument("--checkpoint", default=None,
                   help="for a model family (monet, lvr, mirage, capimagine, qwen2.5-vl): a local folder or hub id")
    p.add_argument("--latent-steps", type=int, default=None, help="override the protocol's fixed K or cap")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the subject's)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _add_data_args(p: argparse.ArgumentParser):
    p.add_argument("--data", default=None,
                   help="a JSONL file, or BENCHMARK:FOLDER (e.g. mmvp:/data/MMVP); default: built-in images")
    p.add_argument("--split", default=None, help="only instances of this split")
    p.add_argument("--limit", type=int, default=None, help="at most this many instances")


def _add_decode_args(p: argparse.ArgumentParser):
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentprobe", description=(
        "Do a model's latent visual thoughts carry the image to the answer? Trace, intervene, measure."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("trace", help="decode instances and record latent states into a trace folder")
    _add_subject_args(p)
    _add_data_args(p)
    _add_decode_args(p)
    p.add_argument("--out", required=True, help="output folder (must be new unless --resume)")
    p.add_argument("--layers", default="final",
                   help="layers to record: 'final', 'all', or comma-separated hidden-state indices (0 = embeddings)")
    p.add_argument("--image-states", default="mean", choices=["mean", "all", "none"])
    p.add_argument("--answer-states", action="store_true", help="also record answer-token states")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--shard", default=None, help="i/n: run only the i-th of n interleaved shards of the data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("intervene", help="edit inputs, latents or a text mediator and measure causal effects")
    _add_subject_args(p)
    _add_data_args(p)
    _add_decode_args(p)
    p.add_argument("--out", required=True, help="output folder (must be new unless --resume)")
    p.add_argument("--target", required=True, choices=["latent", "input", "text"])
    p.add_argument("--kind", required=True, action="append",
                   help="intervention kind(s), comma-separated or repeated. latent: noise, constant, zero, patch, "
                        "drop, shuffle; input: image-swap, image-noise, image-blank, image-mask, question-swap, "
                        "no-image; text: text-swap, text-truncate, text-shuffle")
    p.add_argument("--steps", default=None, help="latent steps to edit, comma-separated from 0 (default: all)")
    p.add_argument("--scale", default=None,
                   help="comma-separated sweep: noise scale (x data std or x mean norm), image-noise level, "
                        "image-mask fraction, text-truncate fraction, drop: steps kept")
    p.add_argument("--relative-to", default="std", choices=["std", "norm"], help="noise scale reference")
    p.add_argument("--value", default=None, choices=["zero", "mean", "random"], help="constant: which tensor")
    p.add_argument("--layer", type=int, default=None,
                   help="edit this layer's output at latent positions (1..N) instead of the fed-back vector")
    p.add_argument("--semantics", default="recompute",
                   help="after an edited step: recompute later steps, pin them to clean, or both (recompute,pin)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for intervals")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--shard", default=None, help="i/n: run only the i-th of n interleaved shards of the data")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("similarity", help="collapse analysis: cosine similarity of latents across instances/steps")
    p.add_argument("runs", nargs="+", metavar="TRACE_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)

    p = sub.add_parser("probe", help="linear probes from latent states to instance attributes, with baselines")
    p.add_argument("run", metavar="TRACE_DIR")
    p.add_argument("--labels", required=True, help="comma-separated attributes (or 'answer')")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-init", default=None, metavar="TRACE_DIR",
                   help="a trace of the same data by a randomly initialised model, as a further baseline")

    p = sub.add_parser("report", help="one Markdown and one self-contained HTML report from runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default="", help="attributes to probe (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)

    p = sub.add_parser("plan", help="from a pilot run: instances needed to decide, smallest effect ruled out")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `latentprobe intervene`")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin for answer-change rates, correctness and gold probability (default 0.05)")
    p.add_argument("--alpha", type=float, default=0.05, help="error rate of intervals and tests (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="power to plan for (default 0.8)")

    p = sub.add_parser("demo", help="the whole analysis on the built-in organisms, with a report (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n-instances", "--instances", dest="instances", type=int, default=None,
                   help="held-out questions per subject (default 80: enough for `disconnect` at margin 0.05)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all shipped organisms)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("data", help="make procedural task data")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    make = data_sub.add_parser("make", help="write images and a JSONL (train/test splits) for a task")
    make.add_argument("task", help="transform, path or digits")
    make.add_argument("--n", type=int, default=200)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True)
    make.add_argument("--image-size", type=int, default=56)
    make.add_argument("--test-fraction", type=float, default=0.25)

    p = sub.add_parser("organisms", help="train the model organisms")
    org_sub = p.add_subparsers(dest="organisms_command", metavar="ACTION")
    train = org_sub.add_parser("train", help="train one organism (deterministic for a seed)")
    train.add_argument("name", help="bottleneck, shortcut, direct, mirage, lvr or capimagine")
    train.add_argument("--out", default=None, help="where to write weights (default: the package's weights folder)")
    train.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("subjects", help="list subjects and their protocols")
    p.add_argument("--show", default=None, metavar="NAME", help="print everything a subject will do")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .distributed import finish, init_if_launched

    try:
        handler = globals()[f"_cmd_{args.command.replace('-', '_')}"]
        if args.command in ("trace", "intervene"):
            init_if_launched()
        status = handler(args) or 0
        if args.command in ("trace", "intervene"):
            finish()
        return status
    except LatentProbeError as exc:
        print(f"latentprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished records are on disk (use --resume to continue)", file=sys.stderr)
        return 130


# -- helpers shared by commands -----------------------------------------------------------------------------
def select_instances(args):
    """The instances this process runs: --data, --limit and --split, then --shard and torchrun's rank."""
    from .data import load_instances
    from .distributed import distributed_shard

    instances, source = load_instances(args.data, limit=args.limit, split=args.split)
    instances, writer_id = shard_instances(instances, args.shard)
    instances, writer_id = distributed_shard(instances, writer_id)
    return instances, source, writer_id


def shard_instances(instances, shard: str | None):
    if not shard:
        return instances, "w0"
    try:
        index, count = (int(v) for v in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise LatentProbeError(f"--shard {shard!r} is not of the form i/n with 0 <= i < n", "e.g. --shard 0/4") from None
    return instances[index::count], f"s{index}of{count}"


def load_subject_from_args(args):
    from .subjects import load_subject

    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    return load_subject(args.subject, protocol=args.protocol, device=args.device, dtype=args.dtype, **kwargs)


def decode_config_from_args(args, subject):
    from .decoding import DecodeConfig

    return DecodeConfig(max_new_tokens=args.max_new_tokens or subject.max_new_tokens, do_sample=args.sample,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        latent_steps=args.latent_steps)


def parse_layers(text: str):
    if text in ("final", "all"):
        return text
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LatentProbeError(f"--layers {text!r} is not 'final', 'all' or a list of integers",
                               "e.g. --layers 0,14,28") from None


def print_block(title: str, lines: list[str]):
    width = max([len(title)] + [len(l) for l in lines]) + 2
    print("=" * width)
    print(title)
    print("-" * width)
    for line in lines:
        print(line)
    print("=" * width)


# -- commands -------------------------------------------------------------------------------------------------
def _cmd_trace(args):
    from .recording import RecordSpec
    from .tracing import trace

    instances, source, writer_id = select_instances(args)
    subject = load_subject_from_args(args)
    spec = RecordSpec(layers=parse_layers(args.layers), image=None if args.image_states == "none" else args.image_states,
                      answer=args.answer_states)
    summary = trace(subject, instances, args.out, config=decode_config_from_args(args, subject), spec=spec,
                    batch_size=args.batch_size, resume=args.resume, data_source=source,
                    progress=not args.quiet and sys.stderr.isatty(), writer_id=writer_id)
    print_block(f"latentprobe trace: {subject.name} on {source}", summary.lines())


def _split_list(text, convert, flag):
    if text is None:
        return None
    try:
        return [convert(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise LatentProbeError(f"{flag} {text!r} is not a comma-separated list of numbers", f"e.g. {flag} 0.5,1,3") from None


def _cmd_intervene(args):
    from .intervening import intervene
    from .interventions import make_interventions

    kinds = [k.strip() for spec in args.kind for k in spec.split(",") if k.strip()]
    interventions = make_interventions(
        args.target, kinds, steps=_split_list(args.steps, int, "--steps"), scales=_split_list(args.scale, float, "--scale"),
        layer=args.layer, semantics=[s.strip() for s in args.semantics.split(",")], seed=args.seed,
        relative_to=args.relative_to, value=args.value)
    instances, source, writer_id = select_instances(args)
    subject = load_subject_from_args(args)
    summary = intervene(subject, instances, interventions, args.out, config=decode_config_from_args(args, subject),
                        batch_size=args.batch_size, seed=args.seed, n_boot=args.bootstrap, resume=args.resume,
                        progress=not args.quiet and sys.stderr.isatty(), data_source=source, writer_id=writer_id)
    print_block(f"latentprobe intervene: {subject.name}, target {args.target}", summary.lines())


def _cmd_similarity(args):
    from .analysis import collapse_study

    table, made = collapse_study(args.runs, args.out, seed=args.seed, n_boot=args.bootstrap)
    lines = []
    for (subject, rep, centring), rows in table.groupby(["subject", "representation", "centring"], sort=True):
        values = ", ".join(f"{v:.3f}" for v in rows.sort_values("step").mean_similarity)
        lines.append(f"{subject:<12} {rep:<12} {centring:<8} {values}")
    lines.append(f"figures and tables in {args.out}")
    print_block("latentprobe similarity: mean inter-instance cosine (per step for latents)", lines)


def _cmd_probe(args):
    from .analysis import probe_study

    labels = [v.strip() for v in args.labels.split(",") if v.strip()]
    table, made = probe_study(args.run, labels, args.out, seed=args.seed, n_splits=args.folds,
                              random_init_dir=args.random_init)
    from .probes import best_probe_rows

    lines = []
    for row in best_probe_rows(table).itertuples():
        lines.append(f"{row.attribute:<14} {row.representation:<12} layer {row.layer:>2} step {row.step:>2}  "
                     f"score {row.score:.3f}  control {row.control_score:.3f}  selectivity {row.selectivity:+.3f}  "
                     f"chance {row.chance:.3f}")
    skipped = table[table.skipped_reason.fillna("") != ""]
    if len(skipped):
        lines.append(f"skipped {len(skipped)} probes: {skipped.skipped_reason.iloc[0]}")
    lines.append(f"tables and figures in {args.out}")
    print_block("latentprobe probe: best layer/step per attribute and representation", lines)


def _cmd_report(args):
    from .analysis import build_report

    labels = [v.strip() for v in args.labels.split(",") if v.strip()]
    md, html = build_report(args.runs, args.out, attributes=labels, seed=args.seed, n_boot=args.bootstrap)
    print_block("latentprobe report", [f"markdown  {md}", f"html      {html}"])


def _cmd_plan(args):
    from .planning import plan_lines, plan_runs
    from .verdicts import Margins

    margin = {} if args.margin is None else dict(answer_change=args.margin, correctness=args.margin,
                                                 gold_prob=args.margin)
    margins = Margins(alpha=args.alpha, power=args.power, **margin)
    print_block("latentprobe plan: instances needed per finding", plan_lines(plan_runs(args.runs, margins)))


def _cmd_demo(args):
    from .demo import run_demo

    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    from .demo import DEMO_N_INSTANCES

    result = run_demo(args.out, n_instances=DEMO_N_INSTANCES if args.instances is None else args.instances,
                      seed=args.seed, subjects=subjects, progress=sys.stderr.isatty())
    import pandas as pd

    verdicts = pd.read_csv(result["verdicts"])
    table = verdicts.pivot(index="subject", columns="finding", values="verdict")
    lines = table.to_string().splitlines()
    lines += ["", f"report    {result['report_html']}", f"markdown  {result['report_md']}",
              f"took      {result['seconds']:.0f}s"]
    print_block("latentprobe demo: verdict per subject and finding", lines)


def _cmd_data(args):
    if args.data_command != "make":
        raise LatentProbeError("missing action", "use `latentprobe data make TASK --out DIR`")
    from .tasks import make_task

    path = make_task(args.task, n=args.n, seed=args.seed, out_dir=args.out, test_fraction=args.test_fraction,
                     image_size=args.image_size)
    print(f"wrote {path}")


def _cmd_organisms(args):
    if args.organisms_command != "train":
        raise LatentProbeError("missing action", "use `latentprobe organisms train NAME`")
    from .organisms import train_organism, weights_dir

    out = args.out or weights_dir()
    result = train_organism(args.name, out_dir=out, seed=args.seed)
    metrics = result.metrics
    lines = [f"{key:<22} {metrics[key]}" for key in ("test_accuracy", "chance", "steps", "call_seconds", "seed")
             if key in metrics]
    lines.append(f"weights                {result.folder}")
    print_block(f"latentprobe organisms train: organism-{args.name}", lines)


def _cmd_subjects(args):
    from .subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    if args.show:
        if args.show not in SUBJECTS:
            raise LatentProbeError(f"unknown subject {args.show!r}", f"choose one of {', '.join(sorted(SUBJECTS))}")
        print(json.dumps(SUBJECTS[args.show].describe(), indent=2, default=str))
        return
    from .protocol import PROTOCOLS

    width = max(len(name) for name in SUBJECTS) + 2
    print(f"{'subject':<{width}} {'protocol':<10} {'checkpoint':<11} summary")
    for name, spec in sorted(SUBJECTS.items()):
        protocol = getattr(spec, "protocol_name", None) or "-"
        needs = "required" if spec.needs_checkpoint else "built in"
        print(f"{name:<{width}} {protocol:<10} {needs:<11} {spec.summary}")
    print()
    print("protocols:")
    for name, proto in sorted(PROTOCOLS.items()):
        print(f"  {name:<8} start {proto.start_token}  end {proto.end_token}  rule {proto.stop_rule} "
              f"({'K' if proto.stop_rule == 'fixed' else 'cap'}={proto.num_steps})")


if __name__ == "__main__":
    sys.exit(main())
