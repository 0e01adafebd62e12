"""The `latentprobe` command line. It parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from . import cli_types as T
from .errors import LatentProbeError


LIMIT_HELP = ("at most this many instances (default: 80 of the subject's own data when --data is not given, every "
              "instance of --data otherwise; the same rule for every command)")
OVERWRITE_HELP = ("replace an existing --out folder: the result is built in a new folder beside it and swapped in "
                  "when complete, so nothing stale is left and a failed run keeps the old one")
# Each swept kind's scale when --scale is not given (the classes' own defaults; tests/test_cli_ux.py holds them equal).
SCALE_DEFAULTS = {"noise": 3.0, "image-noise": 0.5, "image-mask": 0.5, "text-truncate": 0.5, "drop": 0}
SCALE_DEFAULTS_TEXT = ", ".join(f"{kind} {value:g}" for kind, value in SCALE_DEFAULTS.items())


def _add_subject_args(p: argparse.ArgumentParser):
    p.add_argument("--subject", default="tiny", help="a subject name (see `latentprobe subjects`) or a checkpoint folder")
    p.add_argument("--protocol", default=None, help="latent protocol for a checkpoint folder: monet, lvr or mirage")
    p.add_argument("--checkpoint", default=None,
                   help="for a model family (monet, lvr, mirage, capimagine, qwen2.5-vl): a local folder or hub id")
    p.add_argument("--latent-steps", type=T.int_at_least(0), default=None,
                   help="override the protocol's fixed K or cap (0: no latent step; None: the protocol's own)")
    p.add_argument("--latent-layout", default=None, choices=["inference", "training"],
                   help="where latent step 0 sits (None: the protocol's; Monet runs 'inference', as its vLLM "
                        "runner does: the state that chose the start token is fed at the start token's position)")
    p.add_argument("--device", type=T.device_name, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps, or auto (spread over GPUs); None: the subject's")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (None: the subject's; bfloat16 on a GPU)")
    p.add_argument("--mediator-markers", default=None, metavar="OPEN,CLOSE",
                   help="a text-mediator subject's imagination markers (capimagine: <think_image>,</think_image>)")


def _add_data_args(p: argparse.ArgumentParser):
    p.add_argument("--data", default=None,
                   help="a JSONL file, or BENCHMARK:FOLDER (e.g. mmvp:/data/MMVP); None: an organism's own held-out "
                        "split, else 8 built-in images")
    p.add_argument("--split", default=None, help="only instances of this split (None: all)")
    p.add_argument("--limit", type=T.int_at_least(1), default=None, help=LIMIT_HELP)


def _add_decode_args(p: argparse.ArgumentParser):
    p.add_argument("--batch-size", type=T.int_at_least(1), default=8,
                   help="instances decoded together (results do not depend on it beyond float rounding)")
    p.add_argument("--max-new-tokens", type=T.int_at_least(1), default=None,
                   help="generated tokens per instance, latent steps included (None: the subject's)")
    p.add_argument("--seed", type=T.seed_value, default=0,
                   help="seed of every random choice (sampling, donors, noise, bootstrap)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=T.positive_float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=T.probability_open_closed, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this probability, in (0, 1]")
    p.add_argument("--top-k", type=T.int_at_least(0), default=0,
                   help="sample among the k most likely tokens (0: no top-k cut)")
    p.add_argument("--decoding", default="greedy", choices=["greedy", "authors"],
                   help="greedy (the analysis default) or the family's own sampling settings (subjects --show NAME)")


RESUME_HELP = ("continue an interrupted run in --out (refused when a setting that changes a result differs; "
               "finished batches are kept, the rest computed: the tables equal an uninterrupted run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = T.Parser(prog="latentprobe", description=(
        "Do a model's latent visual thoughts carry the image to the answer? Trace, intervene, measure."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("trace", help="decode instances and record latent states into a trace folder")
    _add_subject_args(p)
    _add_data_args(p)
    _add_decode_args(p)
    p.add_argument("--out", required=True, type=T.output_folder, help="output folder (must be new unless --resume)")
    p.add_argument("--layers", default="final", type=T.layer_list,
                   help="layers to record: 'final', 'all', or comma-separated hidden-state indices (0 = embeddings)")
    p.add_argument("--image-states", default="mean", choices=["mean", "all", "none"],
                   help="image-token states to record per layer: their mean, all of them, or none")
    p.add_argument("--answer-states", action="store_true", help="also record answer-token states")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (refused when a setting that changes what is "
                        "recorded differs; damaged shards are re-run)")
    p.add_argument("--shard", default=None, help="i/n: run only the i-th of n interleaved shards of the data")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line every 30 s on stderr)")

    p = sub.add_parser("intervene", help="edit inputs, latents or a text mediator and measure causal effects")
    _add_subject_args(p)
    _add_data_args(p)
    _add_decode_args(p)
    p.add_argument("--out", required=True, type=T.output_folder, help="output folder (must be new unless --resume)")
    p.add_argument("--target", required=True, choices=["latent", "input", "text", "attention"],
                   help="what is edited: the latent tokens, the input (image/question), the text mediator, or "
                        "attention edges (knockout)")
    p.add_argument("--kind", required=True, action="append",
                   help="intervention kind(s), comma-separated or repeated. latent: noise, constant, zero, patch, "
                        "drop, shuffle, no-latent, markers-only, dummy, oracle, oracle-other, noise-norm, mean-step; input: image-swap, image-noise, image-blank, image-mask, question-swap, "
                        "no-image; text: text-swap, text-truncate, text-shuffle; attention: answer->latent, "
                        "answer->image, latent->image (join with + to block together), or knockout (each of the three)")
    p.add_argument("--attention-layers", default=None, type=T.block_list,
                   help="attention: decoder blocks whose attention is knocked out, comma-separated 0..N-1 (None: all)")
    p.add_argument("--steps", default=None, type=T.step_list,
                   help="latent steps to edit, comma-separated from 0 (None: all)")
    p.add_argument("--scale", default=None, type=T.scale_list,
                   help="comma-separated sweep: noise scale (x data std or x mean norm, 0..1e4), image-noise level "
                        "(0..1e4), image-mask fraction (0..1), text-truncate fraction (0..1), drop: whole number "
                        f"of steps kept (default per kind: {SCALE_DEFAULTS_TEXT})")
    p.add_argument("--relative-to", default="std", choices=["std", "norm"], help="noise scale reference")
    p.add_argument("--value", default=None, choices=["zero", "mean", "random"],
                   help="constant: which tensor replaces the latents (None: the kind's default)")
    p.add_argument("--dummy-token", default=None,
                   help="dummy: the token whose input embedding fills every slot (default: the protocol's latent "
                        "pad token); must be one token of the subject's vocabulary")
    p.add_argument("--oracle-source", default="auto", choices=["auto", "answer-region", "helper-image"],
                   help="oracle, oracle-other: the latents' targets: the answer region's image tokens (LVR-style), "
                        "a helper image's pooled cells (Mirage-style), or auto (helper-image for Mirage's protocol)")
    p.add_argument("--layer", type=T.int_at_least(1), default=None,
                   help="edit this layer's output at latent positions (1..N) instead of the fed-back vector")
    p.add_argument("--semantics", default="recompute",
                   help="after an edited step: recompute later steps, pin them to clean, or both (recompute,pin)")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=2000,
                   help="bootstrap resamples for the 95%% intervals (>= 100)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (refused when a setting differs)")
    p.add_argument("--no-placebo", dest="placebo", action="store_false",
                   help="skip the placebo of each family edited (default: run it; it is every effect's noise floor)")
    p.add_argument("--shard", default=None, help="i/n: run only the i-th of n interleaved shards of the data")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line every 30 s on stderr)")

    p = sub.add_parser("patch", help="activation patching maps: layer x latent step and layer x position group")
    _add_subject_args(p)
    p.add_argument("--data", default=None,
                   help="a JSONL file or BENCHMARK:FOLDER (default: the subject's own held-out split for organisms, "
                        "else the built-in images)")
    p.add_argument("--split", default=None, help="only instances of this split")
    p.add_argument("--limit", type=T.int_at_least(1), default=None, help=LIMIT_HELP)
    _add_decode_args(p)
    p.add_argument("--out", required=True, type=T.output_folder, help="output folder")
    p.add_argument("--layers", default="all", type=T.layer_list_all,
                   help="hidden-state layers 0..N, comma-separated, or 'all'")
    p.add_argument("--steps", default=None, type=T.step_list, help="latent steps, comma-separated from 0 (default: all)")
    p.add_argument("--groups", default=None,
                   help="position groups: image, question, prompt_last, latent, answer (default: all that exist)")
    p.add_argument("--sites", default=None,
                   help="patch only these sites, comma-separated (e.g. latent[2].layer[14],image.layer[3]) "
                        "instead of the --layers/--steps/--groups grid")
    p.add_argument("--direction", default="denoise,noise", help="denoise, noise or both (comma-separated)")
    p.add_argument("--corruption", default=None, choices=["image-swap", "image-noise", "question-swap"],
                   help="image-swap (another instance's image), image-noise (ROME-style, on image-token embeddings) "
                        "or question-swap (another instance's question); default: image-swap, question-swap for "
                        "a text-only subject")
    p.add_argument("--noise-scale", type=T.positive_float, default=3.0, help="image-noise: x the image-embedding std (default 3)")
    p.add_argument("--semantics", default="recompute", choices=["recompute", "pin"],
                   help="after a patched latent step: recompute later steps, or pin them to the patched run's")
    p.add_argument("--min-gap", type=T.fraction_open, default=0.05,
                   help="exclude instances with |p_clean - p_corrupt| below this from normalised metrics")
    p.add_argument("--no-attribution", action="store_true", help="skip attribution patching")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--max-rows", type=T.int_at_least(1), default=512, help="rows decoded side by side at most")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=1000,
                   help="bootstrap resamples for the 95%% intervals (>= 100)")
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line every 30 s on stderr)")

    p = sub.add_parser("similarity", help="collapse analysis: cosine similarity of latents across instances/steps")
    p.add_argument("runs", nargs="+", metavar="TRACE_DIR", help="trace folders")
    p.add_argument("--out", required=True, type=T.output_folder, help="a new folder for figures and tables")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--seed", type=T.seed_value, default=0, help="seed of the bootstrap and the baselines")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=1000,
                   help="bootstrap resamples for the 95%% intervals (>= 100)")

    p = sub.add_parser("probe", help="linear probes from latent states to instance attributes, with baselines")
    p.add_argument("run", metavar="TRACE_DIR", help="a trace folder")
    p.add_argument("--labels", required=True, type=T.name_list, help="comma-separated attributes (or 'answer')")
    p.add_argument("--out", required=True, type=T.output_folder, help="a new folder for figures and tables")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--folds", type=T.int_between(2, 100), default=5,
                   help="cross-validation folds, grouped by instance (2..100)")
    p.add_argument("--seed", type=T.seed_value, default=0, help="seed of the folds and the control task")
    p.add_argument("--random-init", default=None, metavar="TRACE_DIR",
                   help="a trace of the same data by a randomly initialised model, as a further baseline")
    p.add_argument("--control-type", default="auto",
                   help="what the control task's random labels are assigned to: auto (default: the image's "
                        "identity where instances have images, else the instance), image, question, instance, "
                        "or attribute names joined by '+'")
    p.add_argument("--permutations", type=T.int_at_least(0), default=199,
                   help="label permutations for each probe's p-value against chance (default 199; 0 = none)")

    p = sub.add_parser("decodability", help="decodability gap: is the gold option decodable at the latent steps "
                                            "or only after them (arXiv 2606.05753)?")
    p.add_argument("run", metavar="TRACE_DIR", help="a trace folder recorded with --answer-states")
    p.add_argument("--out", required=True, type=T.output_folder, help="folder for the tables and the figure")
    p.add_argument("--answer-positions", type=T.int_at_least(1), default=1,
                   help="answer-region positions probed after the latent phase (default 1: the first)")
    p.add_argument("--max-steps", type=T.int_at_least(1), default=None,
                   help="probe at most this many latent steps (default: every step all instances reached)")
    p.add_argument("--folds", type=T.int_at_least(2), default=5, help="outer folds, split by instance (default 5)")
    p.add_argument("--seed", type=T.int_at_least(0), default=0, help="seed of the folds and the bootstrap")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=2000,
                   help="bootstrap resamples for the gap's 95%% interval (>= 100)")

    p = sub.add_parser("step-influence", help="step x step influence map: edit latent step i, recompute the later "
                                              "steps, measure every later step and the answer (arXiv 2602.08783)")
    _add_subject_args(p)
    _add_data_args(p)
    _add_decode_args(p)
    p.add_argument("--out", required=True, type=T.output_folder, help="folder for the tables and the heatmap")
    p.add_argument("--kind", default="patch", choices=["patch", "noise", "mean"],
                   help="the edit at step i: another instance's latent (default), noise of --scale x the clean "
                        "std, or the step's dataset mean")
    p.add_argument("--scale", type=float, default=3.0, help="noise: scale x per-dimension std (default 3)")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=2000,
                   help="bootstrap resamples for the 95%% intervals (>= 100)")

    _add_where_parsers(sub)  # ground, lens

    p = sub.add_parser("report", help="one Markdown and one self-contained HTML report from runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="folders written by trace, intervene, patch, ground or lens (each shows in its section)")
    p.add_argument("--out", required=True, type=T.output_folder,
                   help="a new folder for report.md, report.html, verdicts.csv, figures/")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--labels", default="", help="attributes to probe (comma-separated; empty: no probes)")
    p.add_argument("--seed", type=T.seed_value, default=0, help="seed of the bootstrap and the probes")
    p.add_argument("--bootstrap", type=T.int_at_least(100), default=1000,
                   help="bootstrap resamples for the 95%% intervals (>= 100)")

    p = sub.add_parser("plan", help="from a pilot run: instances needed to decide, smallest effect ruled out")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by `latentprobe intervene`")
    p.add_argument("--margin", type=T.fraction_open, default=None,
                   help="equivalence margin for answer-change rates, correctness and gold probability (default 0.05)")
    p.add_argument("--alpha", type=T.fraction_open, default=0.05, help="error rate of intervals and tests (default 0.05)")
    p.add_argument("--power", type=T.fraction_open, default=0.8, help="power to plan for (default 0.8)")

    p = sub.add_parser("study", help="the whole analysis on one subject and benchmark (trace, edits, mediation, "
                                     "collapse, probes, verdicts, report), resumable and shardable")
    p.add_argument("--subject", default=None, help="subject name or checkpoint folder (see `latentprobe subjects`)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder or hub id for a real family")
    p.add_argument("--protocol", default=None, help="the protocol of a checkpoint folder given as --subject")
    p.add_argument("--data", default=None, help="FILE.jsonl or BENCH:FOLDER (None: the subject's own data)")
    p.add_argument("--split", default=None, help="only instances of this split")
    p.add_argument("--n-instances", "--limit", dest="n_instances", type=T.int_at_least(2), default=None,
                   help="instances to study (None: every instance of --data, or the first 80 of the subject's "
                        "own data; >= 2: swaps need a donor)")
    p.add_argument("--seed", type=T.int_at_least(0), default=None, help="seed of every random choice (default 0)")
    p.add_argument("--batch-size", type=T.int_at_least(1), default=None, help="instances decoded together (8)")
    p.add_argument("--max-new-tokens", type=T.int_at_least(1), default=None,
                   help="generated tokens per instance (None: the subject's)")
    p.add_argument("--device", type=T.device_name, default=None, help="cpu, cuda, cuda:N or auto (device_map)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    p.add_argument("--maps", action="store_true", default=None, help="also the where-and-when maps "
                                                                     "(patching, grounding, logit lens)")
    p.add_argument("--image-states", default=None, choices=["all", "mean"],
                   help="what the clean pass keeps of the image tokens (all: the collapse verdict's single-token "
                        "yardstick; mean: a store smaller by the number of image tokens)")
    p.add_argument("--config", default=None, help="a study file (TOML) stating every choice; flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the study file these flags make (the defaults where none is given) and exit")
    p.add_argument("--estimate", action="store_true",
                   help="decode a pilot, then print the full study's decodes, wall time, peak memory and the n "
                        "each finding needs; runs nothing else and writes nothing")
    p.add_argument("--estimate-instances", type=T.int_at_least(2), default=4, help="instances in the pilot")
    p.add_argument("--out", default=None, type=T.output_folder, help="the study folder (new unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed study in --out with its own study.toml (other settings are refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="the whole analysis on the built-in organisms, with a report (a few minutes)")
    p.add_argument("--out", default="runs/demo", type=T.output_folder, help="output folder (must be new)")
    p.add_argument("--n-instances", "--instances", dest="instances", type=T.int_at_least(2), default=None,
                   help="held-out questions per subject (None: 80, enough for `disconnect` at margin 0.05; "
                        ">= 2: swaps need a donor)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (None: all shipped organisms)")
    p.add_argument("--seed", type=T.seed_value, default=0, help="seed of every random choice")
    p.add_argument("--text", action="store_true",
                   help="the text organisms (organism-text-routed, organism-text-bypass) on held-out 2-hop lookup "
                        "questions, with latent edits and a question swap (under a minute)")

    p = sub.add_parser("data", help="make procedural task data")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    make = data_sub.add_parser("make", help="write images and a JSONL (train/test splits) for a task")
    make.add_argument("task", help="transform, path or digits")
    make.add_argument("--n", type=T.int_at_least(2), default=200, help="instances (train and test together)")
    make.add_argument("--seed", type=T.seed_value, default=0, help="seed of the generator")
    make.add_argument("--out", required=True, type=T.output_folder, help="folder for the images and data.jsonl")
    make.add_argument("--image-size", type=T.int_between(16, 4096), default=56,
                      help="image side in pixels (the shipped organisms were trained at 112)")
    make.add_argument("--test-fraction", type=T.fraction_open, default=0.25,
                      help="share of instances in the test split, strictly between 0 and 1")

    p = sub.add_parser("organisms", help="train the model organisms")
    org_sub = p.add_subparsers(dest="organisms_command", metavar="ACTION")
    train = org_sub.add_parser("train", help="train one organism (deterministic for a seed)")
    train.add_argument("name", help="bottleneck, shortcut, blind, collapsed, direct, mirage, lvr, capimagine, or a "
                                    "text organism: text-routed, text-bypass")
    train.add_argument("--out", default=None, type=T.output_folder,
                       help="where to write the weights (None: a new folder organisms/<name>-seed<S>; never the "
                            "package's shipped weights unless --overwrite-shipped)")
    train.add_argument("--overwrite-shipped", action="store_true",
                       help="write into the package's weights folder, replacing the shipped organism")
    train.add_argument("--seed", type=T.seed_value, default=0, help="seed of data, initialisation and order")

    p = sub.add_parser("check", help="conformance check of a checkpoint against its family (run before a long run)")
    p.add_argument("--subject", required=True,
                   help="a registered subject: a family (monet, lvr, mirage, capimagine, qwen2.5-vl), tiny, or an "
                        "organism (the report's last line states what is checked)")
    p.add_argument("--checkpoint", default=None, help="a local folder or hub id (default: the family's own)")
    p.add_argument("--device", type=T.device_name, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps, or auto; None: the subject's")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (None: the subject's; bfloat16 on a GPU)")
    p.add_argument("--max-new-tokens", type=T.int_at_least(1), default=256,
                   help="budget for the decoded built-in instance")
    p.add_argument("--latent-steps", type=T.int_at_least(0), default=None,
                   help="override the protocol's fixed K or cap (0: no latent step; None: the protocol's own)")
    p.add_argument("--mediator-markers", default=None, metavar="OPEN,CLOSE",
                   help="a text-mediator subject's imagination markers (capimagine: <think_image>,</think_image>)")
    p.add_argument("--decoding", default="greedy", choices=["greedy", "authors"],
                   help="greedy (the analysis default) or the family's own sampling settings")

    p = sub.add_parser("cache", help="where latentprobe's generated data are cached, how big, and --clear")
    p.add_argument("--clear", action="store_true",
                   help="delete what latentprobe wrote there (regenerated identically when next needed)")

    p = sub.add_parser("subjects", help="list subjects and their protocols")
    p.add_argument("--show", default=None, metavar="NAME", help="print everything a subject will do")
    T.show_defaults(parser)
    return parser


# Commands that write only into a new --out (trace and intervene continue their own runs with --resume).
NEW_FOLDER_COMMANDS = ("patch", "ground", "lens", "similarity", "probe", "report")


def main(argv: list[str] | None = None) -> int:
    import warnings

    from .model.conditions import ConditionWarning

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .runs.distributed import finish, init_if_launched

    try:
        handler = globals()[f"_cmd_{args.command.replace('-', '_')}"]
        if args.command in NEW_FOLDER_COMMANDS and not (getattr(args, "resume", False)
                                                         or getattr(args, "overwrite", False)):  # before any model runs
            from .runs.folders import require_new_folder

            require_new_folder(args.out, args.command)
        # patch, ground and lens lock their folder themselves; similarity, probe and report build into a fresh
        # staging folder that replaces --out in one rename (cli_types.fresh_output), so they need no lock
        if args.command in ("trace", "intervene", "study"):
            init_if_launched()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConditionWarning)  # the commands print these sentences themselves
            status = handler(args) or 0
        if args.command in ("trace", "intervene", "study"):
            finish()
        return status
    except LatentProbeError as exc:
        print(f"latentprobe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk, a vanished file: one line naming the file
        from .fileio import describe_os_error

        print(f"latentprobe {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished records are on disk (use --resume to continue)", file=sys.stderr)
        return 130


# -- helpers shared by commands -----------------------------------------------------------------------------
def select_instances(args):
    """The instances this process runs: --data, --limit and --split, then --shard and torchrun's rank."""
    from .data.loading import default_limit, load_instances
    from .runs.distributed import distributed_shard

    data, limit = args.data, default_limit(args.data, args.limit)  # the one rule (latentprobe.data.loading)
    if data is None and str(getattr(args, "subject", "")).startswith("organism-"):
        held_out = organism_default_data(args.subject, limit)  # its own held-out split, not the built-in set
        data = str(held_out) if held_out else None
    if data is None:
        from .model.subjects import is_text_subject

        if is_text_subject(getattr(args, "subject", None)) or is_text_subject(getattr(args, "checkpoint", None)):
            data = "builtin-text"  # a text-only model reads the built-in text set, not the images
    options = family_benchmark_options(args)
    instances, source = load_instances(data, limit=limit, split=args.split, benchmark_options=options)
    if not hasattr(args, "shard"):  # a command that writes one table from every instance does not shard
        return instances, source, None
    instances, writer_id = shard_instances(instances, args.shard)
    instances, writer_id = distributed_shard(instances, writer_id)
    return instances, source, writer_id


def family_benchmark_options(args) -> dict:
    """A family's own evaluation settings for the benchmark in --data (Mirage: VSP levels 3-6), said on stderr."""
    from pathlib import Path

    if not args.data or ":" not in args.data or Path(args.data).exists():
        return {}
    from .model.subjects import _register_builtin_families
    from .model.subjects.families import benchmark_options

    _register_builtin_families()
    try:
        options = benchmark_options(args.subject, args.data.partition(":")[0])
    except LatentProbeError:  # an unknown benchmark name: its loader says so
        return {}
    if options:
        print(f"latentprobe: {args.subject} is evaluated by its authors with "
              f"{', '.join(f'{k}={v}' for k, v in options.items())}; using them", file=sys.stderr)
    return options


def organism_default_data(subject: str, limit: int | None):
    """The file of an organism's held-out split for the general commands (None for other subjects); written
    without the training images, so it is cheaper than `latentprobe.runs.common.default_instances`."""
    from .organisms.training import organism_held_out_data
    from .organisms.recipes import organism_recipe

    from .data.loading import BUILTIN_HOPS
    from .organisms.text_recipes import text_recipe

    if text_recipe(subject) is not None:
        return BUILTIN_HOPS  # a text organism's held-out hops questions (generated in memory)
    recipe = organism_recipe(subject)
    return None if recipe is None else organism_held_out_data(recipe, min(limit, 600) if limit else None)


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
    from .model.subjects import load_subject

    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if getattr(args, "mediator_markers", None):
        kwargs["mediator_markers"] = args.mediator_markers
    return load_subject(args.subject, protocol=args.protocol, device=args.device, dtype=args.dtype, **kwargs)


def decode_config_from_args(args, subject):
    from .model.decoding import DecodeConfig

    sampling = {"do_sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if getattr(args, "decoding", "greedy") == "authors":
        from .model.subjects.families import decoding_preset

        if args.sample:
            raise LatentProbeError("--sample and --decoding authors both set the sampling",
                                   "use one: --decoding authors runs the family's own settings")
        applied, ignored = decoding_preset(subject, "authors")
        sampling.update({k: v for k, v in applied.items() if k != "max_new_tokens"})
        if ignored:
            print(f"latentprobe: the authors' {', '.join(f'{k}={v}' for k, v in ignored.items())} is not supported "
                  "by latentprobe's decoder and is not applied", file=sys.stderr)
    return DecodeConfig(max_new_tokens=args.max_new_tokens or subject.max_new_tokens, seed=args.seed,
                        latent_steps=args.latent_steps, latent_layout=getattr(args, "latent_layout", None),
                        **sampling)


def print_block(title: str, lines: list[str], width: int = 100):
    """A titled block of result lines; the rules are at most ``width`` columns (the lines are kept whole, so a
    warning or a path can be found with grep; the commands lay their tables out within 100 columns)."""
    rule = min(width, max([len(title)] + [len(line) for line in lines]) + 2)
    print("=" * rule)
    print(title)
    print("-" * rule)
    for line in lines:
        print(line)
    print("=" * rule)


# -- commands -------------------------------------------------------------------------------------------------
def _cmd_trace(args):
    from .model.recording import RecordSpec
    from .runs.trace import trace

    instances, source, writer_id = select_instances(args)
    subject = load_subject_from_args(args)
    warnings = _warn_about_conditions(subject, instances, source)
    spec = RecordSpec(layers=args.layers, image=None if args.image_states == "none" else args.image_states,
                      answer=args.answer_states)
    summary = trace(subject, instances, args.out, config=decode_config_from_args(args, subject), spec=spec,
                    batch_size=args.batch_size, resume=args.resume, data_source=source,
                    progress=not args.quiet, writer_id=writer_id)
    print_block(f"latentprobe trace: {subject.name} on {source}", summary.lines() + warnings)


def _warn_about_conditions(subject, instances, source) -> list[str]:
    """Say when the data are not what the subject expects (at once, before a long run) or when its answers mean
    nothing; the sentences are returned to be repeated under the run's summary."""
    from .model.conditions import condition_warnings

    found = condition_warnings(subject, instances, source)
    for line in found:
        if not line.startswith(f"{subject.name} has random weights"):
            print(f"warning: {line}", file=sys.stderr)
    return [f"warning         {line}" for line in found]


def _cmd_intervene(args):
    from .runs.intervene import intervene
    from .interventions import make_interventions

    kinds = [k.strip() for spec in args.kind for k in spec.split(",") if k.strip()]
    if not kinds:
        raise LatentProbeError("--kind names no intervention", "e.g. --kind noise,zero")
    T.check_scales(kinds, args.scale)  # also refuses a --scale that an attention knockout would ignore
    if args.target == "attention":
        from .interventions.knockout import make_knockouts

        if args.steps is not None or args.layer is not None:
            raise LatentProbeError("--steps and --layer edit latent steps; a knockout would ignore them",
                                   "leave them out (choose blocks with --attention-layers)")
        interventions = make_knockouts(kinds, args.attention_layers, args.seed)
    else:
        interventions = make_interventions(
            args.target, kinds, steps=args.steps,
            scales=args.scale, layer=args.layer,
            semantics=T.check_semantics(args.semantics), seed=args.seed,
            relative_to=args.relative_to, value=args.value)
    instances, source, writer_id = select_instances(args)
    subject = load_subject_from_args(args)
    from .where.oracle_sources import attach_oracle_sources

    for iv in interventions:  # the controls' own settings (checked with the subject before any model runs)
        if iv.kind == "dummy":
            iv.token = args.dummy_token
        if getattr(iv, "wants_row_targets", False):
            iv.source_name = args.oracle_source
    attach_oracle_sources(interventions, subject)
    if args.layer is not None and args.layer > subject.num_layers:  # edits a block's output: 1..N, not 0
        raise LatentProbeError(f"--layer {args.layer} is out of range: {subject.name} has {subject.num_layers} blocks",
                               f"use --layer 1..{subject.num_layers} (a block's output), or leave it out to edit "
                               "the fed-back vector")
    warnings = _warn_about_conditions(subject, instances, source)
    summary = intervene(subject, instances, interventions, args.out, config=decode_config_from_args(args, subject),
                        batch_size=args.batch_size, seed=args.seed, n_boot=args.bootstrap, resume=args.resume,
                        progress=not args.quiet, data_source=source, writer_id=writer_id,
                        placebo=args.placebo)
    if summary.contributions is not None and len(summary.contributions):
        from pathlib import Path

        from .report.contribution_figures import plot_contributions

        options = [len(inst.options) for inst in instances if inst.options]
        chance = sum(1.0 / k for k in options) / len(options) if options else None
        plot_contributions(summary.contributions, Path(args.out) / "contributions", chance=chance)
    print_block(f"latentprobe intervene: {subject.name}, target {args.target}", summary.lines() + warnings)


def _cmd_patch(args):
    from .data.loading import default_limit
    from .where.patching import default_instances, patch_map

    layers, steps = args.layers, args.steps  # parsed and range-checked by cli_types
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None
    directions = [d.strip() for d in args.direction.split(",") if d.strip()]
    subject = load_subject_from_args(args)
    config = decode_config_from_args(args, subject)
    if args.corruption is None:
        args.corruption = "question-swap" if subject.text_only else "image-swap"
    from .where.patching import check_patch_request, grid_of_sites, resolve_grid

    sites = [v.strip() for v in args.sites.split(",") if v.strip()] if args.sites else None
    # bad layers, steps, groups or sites fail before the data loads and before any model runs
    grid = grid_of_sites(subject, sites, config) if sites else resolve_grid(subject, layers, steps, groups, config)
    if args.data is None:
        instances, source = default_instances(subject.name, limit=default_limit(None, args.limit))
    else:
        from .data.loading import load_instances

        instances, source = load_instances(args.data, limit=args.limit, split=args.split)
    check_patch_request(subject, grid, len(instances), directions, args.corruption, args.noise_scale, args.min_gap,
                        args.semantics)
    result = patch_map(subject, instances, args.out, layers=layers, steps=steps, groups=groups, sites=sites,
                       directions=directions, corruption=args.corruption, noise_scale=args.noise_scale,
                       semantics=args.semantics, min_gap=args.min_gap, attribution=not args.no_attribution,
                       config=config, batch_size=args.batch_size, max_rows=args.max_rows, seed=args.seed,
                       n_boot=args.bootstrap, progress=not args.quiet, resume=args.resume)
    from .report.patch_figures import draw_patching_run

    result.figures = [str(path) for path in draw_patching_run(args.out)]
    lines = [f"data      {len(instances)} instances ({source})"] + result.lines()
    lines += [f"figure    {f}" for f in result.figures]
    print_block(f"latentprobe patch: {subject.name}, {result.table.corruption.iloc[0] if len(result.table) else ''}",
                lines)


def _cmd_similarity(args):
    from .report.build import collapse_study
    from .verdicts.collapse import verdict_collapse

    from .cli_types import fresh_output
    from .verdicts import Margins

    with fresh_output(args.out, args.overwrite, args.runs) as staging:
        table, made = collapse_study(args.runs, staging, seed=args.seed, n_boot=args.bootstrap,
                                     margin=Margins().collapse)
    lines = ["relative spread across instances (0 = collapsed) per latent step; baselines once:"]
    spread = table[table.statistic == "relative_spread"]
    for (subject, rep), rows in spread.groupby(["subject", "representation"], sort=True):
        values = ", ".join(f"{v:.3f}" for v in rows.sort_values("step").estimate)
        lines.append(f"  {subject:<20} {rep:<12} {values}")
    for subject in table.subject.unique():
        verdict = verdict_collapse(table, subject)
        lines.append(f"{subject:<20} collapse: {verdict.verdict:<13} {verdict.evidence}")
    lines.append(f"figures and tables in {args.out}")
    print_block("latentprobe similarity: collapse of latent tokens across instances", lines)


def _cmd_decodability(args):
    from pathlib import Path

    from .where.decodability import decodability_study
    from .report.contribution_figures import plot_decodability

    cells, gap = decodability_study(args.run, args.out, answer_positions=args.answer_positions,
                                    max_steps=args.max_steps, n_splits=args.folds, seed=args.seed,
                                    n_boot=args.bootstrap)
    lines = []
    for row in cells[cells.selection == "nested"].itertuples():
        where = f"latent step {row.step}" if row.position == "latent" else f"after, position {row.step}"
        lines.append(f"{where:<22} best layer {row.layer:>2}  accuracy {row.accuracy:.3f} "
                     f"[{row.ci_low:.3f}, {row.ci_high:.3f}]  chance {row.chance:.3f}"
                     f"{'  decodable' if row.decodable else ''}")
    g = gap.iloc[0]
    lines.append(f"gap after - at: {g.gap:+.3f} [{g.gap_ci_low:+.3f}, {g.gap_ci_high:+.3f}] (at {g.at_accuracy:.3f}, "
                 f"after {g.after_accuracy:.3f}, n={int(g.n)}); first decodable: {g.first_decodable}")
    made = plot_decodability(cells, Path(args.out) / "decodability")
    lines.append(f"tables and figure in {args.out} ({made[0].name})")
    print_block(f"latentprobe decodability: {g.subject}", lines)


def _cmd_step_influence(args):
    from pathlib import Path

    from .where.step_influence import check_step_influence, step_influence
    from .report.contribution_figures import plot_step_influence

    instances, source, _ = select_instances(args)
    subject = load_subject_from_args(args)
    config = decode_config_from_args(args, subject)
    check_step_influence(subject, instances, args.kind, args.scale, config)
    rows, table = step_influence(subject, instances, args.out, kind=args.kind, scale=args.scale, config=config,
                                 batch_size=args.batch_size, seed=args.seed, n_boot=args.bootstrap)
    made = plot_step_influence(table, Path(args.out) / "step-influence")
    lines = [f"edit z{row.source_step} -> {'z' + row.target if row.target != 'answer' else 'answer'}: "
             f"{row.estimate:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] n={int(row.n)}"
             for row in table.itertuples() if row.target == "answer" or int(row.target) > row.source_step]
    lines.append("latent cells: placebo-corrected R2, the share of the clean spread between instances that the "
                 "edit moves (1 = as far as another instance's latent); "
                 f"answer: answer-change rate. Tables and heatmap in {args.out} ({made[0].name})")
    print_block(f"latentprobe step-influence: {subject.name} on {source} ({args.kind})", lines)


def _cmd_probe(args):
    from .report.build import probe_study
    from .stats.probes import best_probe_rows
    from .verdicts.visual_info import verdict_visual_info

    labels = args.labels if isinstance(args.labels, list) else [v.strip() for v in args.labels.split(",") if v.strip()]
    from .cli_types import fresh_output

    inputs = [args.run] + ([args.random_init] if args.random_init else [])
    with fresh_output(args.out, args.overwrite, inputs) as staging:
        table, made = probe_study(args.run, labels, staging, seed=args.seed, n_splits=args.folds,
                                  random_init_dir=args.random_init, control_type=args.control_type,
                                  n_permutations=args.permutations)
    lines = [f"{'attribute':<12} {'states':<11} {'cell':<10} {'score':>5}  {'control':>7}  "
             f"{'selectivity [95% CI]':<26} {'p':>6}  chance"]
    for row in best_probe_rows(table).itertuples():
        cell = f"L{row.layer}" + (f" step {row.step}" if row.step is not None and row.step >= 0 else "")
        selectivity = f"{row.selectivity:+.3f} [{row.selectivity_ci_low:+.3f}, {row.selectivity_ci_high:+.3f}]"
        lines.append(f"{row.attribute[:12]:<12} {row.representation[:11]:<11} {cell:<10} {row.score:5.3f}  "
                     f"{row.control_score:7.3f}  {selectivity:<26} {row.p_value:6.3g}  {row.chance:.3f}")
    skipped = table[table.skipped_reason.fillna("") != ""]
    if len(skipped):
        lines.append(f"skipped {len(skipped)} probes: {skipped.skipped_reason.iloc[0]}")
    for subject in table.subject.unique():
        verdict = verdict_visual_info(table, subject)
        lines.append(f"{subject}: visual_info {verdict.verdict} ({verdict.evidence})")
    lines.append(f"control task per {table.control_type.iloc[0]} ({int(table.n_types.iloc[0])} types); "
                 f"best layer/step chosen inside the training folds; tables and figures in {args.out}")
    print_block("latentprobe probe: best layer/step per attribute and representation", lines)


def _cmd_report(args):
    from pathlib import Path

    from .cli_types import fresh_output
    from .report.build import build_report, run_kind
    from .runs.identity import data_mismatch_notes, distinct_runs
    from .runs.store import TraceStore

    args.runs, duplicates = distinct_runs(args.runs)  # the same run given twice is counted once, and said so
    for line in duplicates:
        print(f"latentprobe report: {line}", file=sys.stderr)
    labels = [v.strip() for v in args.labels.split(",") if v.strip()]
    kinds = [run_kind(run) for run in args.runs]  # a folder no command wrote is refused before anything is built
    with fresh_output(args.out, args.overwrite, args.runs) as staging:
        build_report(args.runs, staging, attributes=labels, seed=args.seed, n_boot=args.bootstrap,
                     say=lambda line: print(line, file=sys.stderr))
    out = Path(args.out)
    lines = verdict_lines(out / "verdicts.csv")
    lines.append("")
    manifests = []
    for run, kind in zip(args.runs, kinds):  # what each run actually holds, and whether it is complete
        lines.append(f"{kind:<9} {run}")
        if kind in ("trace", "intervene"):
            store = TraceStore(run)
            lines += [f"warning   {w}" for w in store.completeness()["warnings"]]
            manifests.append((str(run), store.manifest, set(store.records().instance_id.astype(str))))
    lines += [f"warning   {w}" for w in data_mismatch_notes(manifests)]
    lines += ["", f"report    {out / 'report.html'}", f"markdown  {out / 'report.md'}"]
    print_block("latentprobe report: verdict per subject and finding", lines)


def verdict_lines(verdicts_csv) -> list[str]:
    """The verdict table (subject x finding) as `demo` and `report` print it."""
    import pandas as pd

    verdicts = pd.read_csv(verdicts_csv)
    if not len(verdicts):
        return ["no verdicts (no run measured a finding)"]
    return verdicts.pivot(index="subject", columns="finding", values="verdict").to_string().splitlines()


def _cmd_plan(args):
    from .report.build import plan_runs
    from .verdicts.planning import plan_lines
    from .verdicts import Margins

    margin = {} if args.margin is None else dict(answer_change=args.margin, correctness=args.margin,
                                                 gold_prob=args.margin)
    from .runs.identity import distinct_runs

    args.runs, duplicates = distinct_runs(args.runs)
    for line in duplicates:
        print(f"latentprobe plan: {line}", file=sys.stderr)
    margins = Margins(alpha=args.alpha, power=args.power, **margin)
    print_block("latentprobe plan: instances needed per finding", plan_lines(plan_runs(args.runs, margins)))


def study_config_from_args(args):
    """The study file of ``--config`` (or of the folder, with ``--resume``; else the defaults), with the flags given
    on the command line put over it; refused in one line when it cannot work."""
    import dataclasses
    from pathlib import Path

    from .study.config import StudyConfig, check_config, load_study_file

    if args.config:
        config = load_study_file(args.config)
    elif args.resume and args.out and (Path(args.out) / "study.toml").is_file():
        config = load_study_file(Path(args.out) / "study.toml")
    else:
        config = StudyConfig()
    flags = {name: getattr(args, name) for name in ("checkpoint", "protocol", "data", "split", "n_instances", "seed",
                                                    "batch_size", "max_new_tokens", "device", "dtype", "maps",
                                                    "image_states")}
    changes = {name: value for name, value in flags.items() if value is not None}
    if args.subject is not None:
        changes["subjects"] = [args.subject]
    config = dataclasses.replace(config, **changes)
    if not config.subjects and args.print_config:  # the defaults alone: the file then needs its subjects
        return config
    if not config.subjects:
        raise LatentProbeError("no subject to study", "pass --subject NAME (or a study file with subjects = [...])")
    check_config(config)
    return config


def _cmd_study(args):
    from .study.config import study_toml
    from .study.edits import check_kinds_registered

    config = study_config_from_args(args)
    if args.print_config:
        print(study_toml(config), end="")
        return 0
    check_kinds_registered(config)
    if args.estimate:
        from .study.estimate import estimate_study

        lines = []
        for estimate in estimate_study(config, pilot=args.estimate_instances):
            lines += estimate.lines()
        print_block(f"latentprobe study --estimate: {', '.join(config.subjects)}", lines)
        return 0
    if args.out is None:
        raise LatentProbeError("no study folder", "pass --out DIR (or --print-config / --estimate, which write nothing)")
    from .study.run import run_study

    result = run_study(config, args.out, resume=args.resume, progress=not args.quiet and sys.stderr.isatty())
    lines = verdict_lines(result.verdicts) if result.verdicts else []
    print_block(f"latentprobe study: {', '.join(config.subjects)}", lines + [""] + result.lines())
    return 0


def _cmd_demo(args):
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    if args.text:
        import pandas as pd

        from .study.text_demo import run_text_demo

        result = run_text_demo(args.out, n_instances=80 if args.instances is None else args.instances,
                               seed=args.seed, subjects=subjects, progress=True)
        lines = verdict_lines(result["verdicts"])
        if result["truth"] is not None:
            lines += ["", "built-in truth (expected -> decided):"] + [
                f"  {row.subject:<22} {row.finding:<14} {row.expected} -> {row.decided}"
                for row in pd.read_csv(result["truth"]).itertuples()]
        lines += ["", f"report    {result['report_html']}", f"took      {result['seconds']:.0f}s"]
        print_block("latentprobe demo --text: verdict per subject and finding", lines)
        return
    from .study.demo import run_demo

    from .study.demo import DEMO_N_INSTANCES

    result = run_demo(args.out, n_instances=DEMO_N_INSTANCES if args.instances is None else args.instances,
                      seed=args.seed, subjects=subjects, progress=True)
    lines = verdict_lines(result["verdicts"])
    lines += ["", f"report    {result['report_html']}", f"markdown  {result['report_md']}",
              f"took      {result['seconds']:.0f}s"]
    print_block("latentprobe demo: verdict per subject and finding", lines)


def _cmd_data(args):
    if args.data_command != "make":
        raise LatentProbeError("missing action", "use `latentprobe data make TASK --out DIR`")
    from .data.tasks import make_task

    path = make_task(args.task, n=args.n, seed=args.seed, out_dir=args.out, test_fraction=args.test_fraction,
                     image_size=args.image_size)
    print(f"wrote {path}")


def _cmd_organisms(args):
    if args.organisms_command != "train":
        raise LatentProbeError("missing action", "use `latentprobe organisms train NAME`")
    from .organisms import train_organism, weights_dir

    if args.overwrite_shipped and args.out:
        raise LatentProbeError("--out and --overwrite-shipped both say where the weights go", "pass only one")
    out = weights_dir() if args.overwrite_shipped else (args.out or f"organisms/{args.name}-seed{args.seed}")
    from pathlib import Path

    if not args.overwrite_shipped and Path(out).resolve() == Path(weights_dir()).resolve():
        raise LatentProbeError(f"--out {out} is the package's shipped weights folder",
                               "pass --overwrite-shipped to replace the shipped organism on purpose")
    if not args.overwrite_shipped and (Path(out) / f"{args.name}.safetensors").exists():
        raise LatentProbeError(f"{out} already holds weights of organism-{args.name}",
                               "choose another --out (or --seed), or delete the folder first")
    from .organisms.text_recipes import text_recipe

    if text_recipe(args.name) is not None:
        from .organisms.text import train_text_organism

        result = train_text_organism(args.name.removeprefix("organism-"), out_dir=out, seed=args.seed)
    else:
        result = train_organism(args.name, out_dir=out, seed=args.seed)
    metrics = result.metrics
    lines = [f"{key:<22} {metrics[key]}" for key in ("test_accuracy", "chance", "steps", "call_seconds", "seed")
             if key in metrics]
    lines.append(f"weights                {result.folder}")
    print_block(f"latentprobe organisms train: organism-{args.name}", lines)


def _cmd_check(args):
    from .runs.conformance import run_check

    report = run_check(args.subject, args.checkpoint, device=args.device, dtype=args.dtype,
                       max_new_tokens=args.max_new_tokens, decoding=args.decoding,
                       mediator_markers=args.mediator_markers, latent_steps=args.latent_steps)
    print_block(f"latentprobe check: {args.subject} at {report.checkpoint or 'its default checkpoint'}",
                report.table().splitlines())
    return 0 if report.ok else 1


def _cmd_subjects(args):
    from .model.subjects import SUBJECTS, _register_builtin_families

    _register_builtin_families()
    if args.show:
        from .model.subjects import did_you_mean

        if args.show not in SUBJECTS:
            raise LatentProbeError(f"unknown subject {args.show!r}{did_you_mean(args.show)}",
                                   f"choose one of {', '.join(sorted(SUBJECTS))}")
        print_block(f"latentprobe subjects --show {args.show}", subject_facts(SUBJECTS[args.show]))
        return
    from .model.protocol import PROTOCOLS

    width = max(len(name) for name in SUBJECTS) + 2
    print(f"{'subject':<{width}} {'protocol':<10} {'checkpoint':<11} summary")
    for name, spec in sorted(SUBJECTS.items()):
        protocol = getattr(spec, "protocol_name", None) or "-"
        hub_id = getattr(spec, "hub_id", "")
        needs = ("required" if not hub_id else "hub default") if spec.needs_checkpoint else "built in"
        print(f"{name:<{width}} {protocol:<10} {needs:<11} {spec.summary}")
    print()
    print("protocols: (the facts each one runs, and the authors' files they come from)")
    for name, proto in sorted(PROTOCOLS.items()):
        facts = [f"exit {proto.exit_rule}", f"layout {proto.latent_layout}",
                 "pad ids written" if proto.write_pad_ids else "sampled ids kept"]
        if proto.head_module:
            facts.append(f"head {proto.head_module}" + (" (z_0 too)" if proto.head_maps_first else ""))
        if proto.never_in_text:
            facts.append(f"never in text: {', '.join(proto.never_in_text)}")
        print(f"  {name:<8} start {proto.start_token}  end {proto.end_token}  rule {proto.stop_rule} "
              f"({'K' if proto.stop_rule == 'fixed' else 'cap'}={proto.num_steps}); {'; '.join(facts)}")
        if proto.source:
            print(f"  {'':<8} source: {proto.source}")


def _cmd_cache(args):
    """Where latentprobe's data cache is, how big, what it holds; --clear empties it."""
    import os
    import shutil

    from .data.instances import cache_dir, cache_entries

    root = cache_dir()
    where = "LATENTPROBE_CACHE" if os.environ.get("LATENTPROBE_CACHE") else "default; set LATENTPROBE_CACHE to move it"
    lines = [f"folder    {root} ({where})"]
    entries = cache_entries()
    if not entries:
        lines.append("empty     (generated data is written here the first time a command needs it)")
    total = 0
    for entry in entries:
        size, count = _folder_size(entry)
        total += size
        lines.append(f"  {entry.name:<28} {_human_bytes(size):>9}  {count} files")
    if entries:
        lines.append(f"size      {_human_bytes(total)} in all")
    if args.clear and entries:
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        lines.append(f"cleared   {len(entries)} entries ({_human_bytes(total)}); they are regenerated on demand, "
                     "identically (every generator is seeded)")
    print_block("latentprobe cache: generated data", lines)


def _folder_size(path) -> tuple[int, int]:
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _human_bytes(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def subject_facts(spec) -> list[str]:
    """What `subjects --show` prints: the subject's own description, and for an organism its recipe and protocol
    (read from the registry and the recipe; no model is loaded)."""
    from .organisms.recipes import organism_recipe

    facts = dict(spec.describe())
    recipe = organism_recipe(spec.name)
    if recipe is not None:
        from .data.loading import DEFAULT_INSTANCES
        from .organisms.training import DEFAULT_N, IMAGE_SIZE

        facts.update({
            "ground_truth": recipe.ground_truth, "mediator": recipe.mediator or "none",
            "architecture": f"Qwen2.5-VL, {recipe.num_layers} layers, hidden {recipe.hidden_size}, "
                            f"{recipe.num_heads} heads",
            "latent_steps": recipe.latent_steps if recipe.protocol else 0,
            "text_mediator_markers": ",".join(recipe.text_mediator_markers or ()) or None,
            "max_new_tokens": recipe.max_new_tokens,
            "data": f"the {recipe.task} task at {IMAGE_SIZE} x {IMAGE_SIZE} px; own held-out split of "
                    f"{int(DEFAULT_N * 0.25 + 0.5)} instances, the first {DEFAULT_INSTANCES} by default "
                    f"(latentprobe.organism_data('{spec.name.removeprefix('organism-')}', n))",
            "protocol": recipe.protocol.describe() if recipe.protocol else None})
    import textwrap

    pairs = []
    for key, value in facts.items():
        if isinstance(value, dict):
            pairs += [(f"{key}.{inner}", item) for inner, item in value.items() if item not in (None, "", (), [])]
        elif value not in (None, "", (), []):
            pairs.append((key, value))
    lines = []
    for key, value in pairs:  # 100 columns: long values wrap under themselves
        lines += textwrap.wrap(f"{key:<28} {value}", width=100, subsequent_indent=" " * 29, break_on_hyphens=False)
    return lines


# -- where and when: ground, lens ------------------------------------------------------------------------------
def _add_where_parsers(sub):
    for name, help_text in (("ground", "grounding maps: where in the image each latent step looks, scored against "
                                       "the answer region (pointing game, mass inside, random-region chance)"),
                            ("lens", "logit lens at every layer of every latent step, and the nearest input "
                                     "embeddings of the fed-back vectors")):
        p = sub.add_parser(name, help=help_text)
        _add_subject_args(p)
        _add_data_args(p)
        _add_decode_args(p)
        p.add_argument("--out", required=True, type=T.output_folder, help="output folder (must be new unless --resume)")
        p.add_argument("--resume", action="store_true", help=RESUME_HELP)
        p.add_argument("--layers", default="all", type=T.layer_list,
                       help="hidden-state layers: 'all', 'final' or comma-separated (0 = embeddings, N = final norm)")
        if name == "ground":
            p.add_argument("--image-layer", type=T.int_at_least(0), default=None,
                           help="compare every latent layer with the image tokens at this one layer "
                                "(default: the same layer)")
            p.add_argument("--random-regions", type=T.int_at_least(1), default=100,
                           help="random same-size regions for the chance baseline (all placements when fewer)")
            p.add_argument("--overlays", type=T.int_at_least(0), default=4, help="instances drawn as overlay PNGs")
            p.add_argument("--bootstrap", type=T.int_at_least(100), default=2000,
                           help="bootstrap resamples for the 95%% intervals (>= 100)")
        else:
            p.add_argument("--top-tokens", type=T.int_at_least(1), default=5, help="top tokens kept per cell")
            p.add_argument("--neighbours", action="store_true",
                           help="also the nearest-neighbour readout (LatentLens): the contextual token states "
                                "nearest each latent state at the same layer, from the run's own prompts")
            p.add_argument("--reference", default=None, metavar="TEXT_FILE",
                           help="with --neighbours: reference text instead of the prompts (one snippet a line)")


def _where_inputs(args):
    """Subject, instances (the subject's default data unless --data) and decoding settings for ground / lens."""
    from .data.loading import default_limit
    from .where.runs import default_instances

    subject = load_subject_from_args(args)
    if args.data is None:
        instances, source = default_instances(args.subject, limit=default_limit(None, args.limit))
    else:
        from .data.loading import load_instances

        instances, source = load_instances(args.data, limit=args.limit, split=args.split)
    layers = args.layers
    if layers == "all":
        layers = None
    elif layers == "final":
        layers = [subject.num_layers]
    return subject, instances, source, decode_config_from_args(args, subject), layers


def _cmd_ground(args):
    from .where.runs import ground_run

    subject, instances, source, config, layers = _where_inputs(args)
    result = ground_run(subject, instances, args.out, source=source, config=config, layers=layers,
                        image_layer=args.image_layer, n_random=args.random_regions, batch_size=args.batch_size,
                        n_boot=args.bootstrap, seed=args.seed, resume=args.resume)
    from .report.where_figures import draw_grounding_run

    result["figures"] = draw_grounding_run(args.out, instances, subject.name, n_overlays=args.overlays)
    summary = result["summary"]
    lines = [f"{len(instances)} instances from {source}"]
    pooled = summary[summary["latent_step"].isin(["all", "prompt_last"])] if len(summary) else summary
    for row in pooled.itertuples():
        lines.append(f"{row.measure:<8} layer {row.layer:>2} {row.latent_step:<11} hit {row.hit_rate:.3f} "
                     f"[{row.hit_ci_low:.2f}, {row.hit_ci_high:.2f}]  chance {row.chance_hit:.3f}  "
                     f"mass {row.mass_inside:.3f} vs {row.chance_mass:.3f}")
    if not len(summary):
        lines.append("no instance has a known answer region: maps only (see grounding.parquet)")
    lines.append(f"tables and figures in {args.out}")
    print_block(f"latentprobe ground: {subject.name}", lines)


def _cmd_lens(args):
    from .where.runs import lens_run

    subject, instances, source, config, layers = _where_inputs(args)
    if args.top_tokens < 1:
        raise LatentProbeError(f"--top-tokens must be >= 1, got {args.top_tokens}", "pass a positive number")
    if args.reference is not None:
        from .where.latent_lens import read_reference_file

        if not args.neighbours:
            raise LatentProbeError("--reference is read by the nearest-neighbour readout", "add --neighbours")
        read_reference_file(args.reference)  # refused in one line before any model runs
    result = lens_run(subject, instances, args.out, source=source, config=config, layers=layers,
                      top_k=args.top_tokens,
                      batch_size=args.batch_size, seed=args.seed, resume=args.resume)
    from .report.where_figures import draw_lens_run

    result["figures"] = draw_lens_run(args.out)
    summary = result["summary"]
    lines = [f"{len(instances)} instances from {source}"]
    if len(summary):
        for layer, part in summary.groupby("layer"):
            lines.append(f"layer {layer:>2}  median gold rank by step {part['median_gold_rank'].tolist()}  "
                         f"MRR {part['mrr'].mean():.3f}  gold on top {part['gold_top1'].mean():.3f}")
    if args.neighbours:
        lines += _latent_lens_lines(args, subject, instances, config, layers)
    lines.append(f"tables and figures in {args.out}")
    print_block(f"latentprobe lens: {subject.name}", lines)


def _latent_lens_lines(args, subject, instances, config, layers) -> list[str]:
    """The nearest-neighbour readout beside the logit lens: latent_lens.csv, its summary and a figure."""
    from pathlib import Path

    from .fileio import atomic_write
    from .report.contribution_figures import plot_latent_lens
    from .where.latent_lens import latent_lens_summary, latent_lens_table

    table = latent_lens_table(subject, instances, layers=layers, top_k=args.top_tokens,
                              reference_file=args.reference, config=config, batch_size=args.batch_size,
                              seed=args.seed)
    summary = latent_lens_summary(table)
    out = Path(args.out)
    for name, frame in (("latent_lens", table), ("latent_lens_summary", summary)):
        atomic_write(out / f"{name}.csv", lambda tmp, f=frame: f.to_csv(tmp, index=False))
    if len(summary):
        plot_latent_lens(summary, out / "latent-lens")
    lines = [f"nearest neighbours ({'reference file' if args.reference else 'the prompts'}): gold token among the "
             f"{args.top_tokens} nearest / among the lens's top {args.top_tokens}, per layer (mean over steps)"]
    for layer, part in summary.groupby("layer"):
        lines.append(f"layer {layer:>2}  neighbours {part.gold_in_neighbours.mean():.3f}  "
                     f"lens {part.gold_in_lens.mean():.3f}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
