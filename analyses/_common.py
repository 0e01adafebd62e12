"""Shared arguments of the studies: which subject, which data, where the runs and figures go."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--subject", default="organism-bottleneck", help="any latentprobe subject name or checkpoint folder")
    p.add_argument("--checkpoint", default=None, help="for a model family: local folder or hub id")
    p.add_argument("--data", default=None, help="JSONL or BENCH:FOLDER (default: a held-out transform task set)")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--runs", default="runs/analyses", help="where traces and intervention runs go")
    p.add_argument("--figures", default="runs/analyses/figures",
                   help="where figures go (the tracked figures/ folder is regenerated only on purpose: "
                        "pass --figures figures, see the README)")
    p.add_argument("--seed", type=int, default=0)
    return p


def load(args):
    """The subject and instances the study runs on (default data: the organisms' held-out split)."""
    from latentprobe.data import load_instances, load_jsonl
    from latentprobe.study.demo import demo_data
    from latentprobe.model.subjects import load_subject

    kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    subject = load_subject(args.subject, **kwargs)
    if args.data is None:
        instances = load_jsonl(demo_data(args.limit), split="test")[: args.limit]
    else:
        instances, _ = load_instances(args.data, limit=args.limit)
    return subject, instances


def run_dir(args, subject, what: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject.name)
    path = Path(args.runs) / f"{safe}-{what}"
    return path
