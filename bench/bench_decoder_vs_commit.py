"""The decoder of this checkout against the decoder of an earlier commit and ``generate``, timed side by side in one
process (a regression check: "before" and "after" measured in separate runs differ by more than the change).

The earlier commit's ``latentprobe`` package is extracted with ``git archive`` into a temporary folder and imported
as ``latentprobe_before`` (its modules import each other relatively, so the two packages do not mix); both decoders
run the same subject and batch, and their outputs are checked to be equal before timing.

    python bench/bench_decoder_vs_commit.py --commit 5cfda81                 # CPU, "small"
    python bench/bench_decoder_vs_commit.py --commit 5cfda81 --size tiny --reps 25
"""

from __future__ import annotations

import _common as C  # noqa: I001  (also puts the repository root on sys.path)

import importlib
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch

from latentprobe.model.decoding import DecodeConfig, LatentDecoder
from bench_decoder import image_sizes


def import_commit(commit: str, folder: Path):
    """``latentprobe`` as of ``commit``, importable as ``latentprobe_before``."""
    archive = subprocess.run(["git", "-C", str(C.ROOT), "archive", commit, "latentprobe"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder)
    (folder / "latentprobe").rename(folder / "latentprobe_before")
    sys.path.insert(0, str(folder))
    return importlib.import_module("latentprobe_before.model.decoding")


def main():
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--commit", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    args.reps = args.reps or 15
    C.quiet_transformers()
    subject, shape = C.build_subject(args)
    plain = C.with_protocol(subject, None)
    instances, images = C.instances_with_images(image_sizes(args.batch, args.image_size))
    batch = plain.encode(instances, images=images).to(args.device)
    model = plain.model
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.commit, Path(folder))
        old = before.LatentDecoder(plain, before.DecodeConfig(max_new_tokens=args.max_new_tokens))
        new = LatentDecoder(plain, DecodeConfig(max_new_tokens=args.max_new_tokens))

        def generate():
            return model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                                  mm_token_type_ids=batch.mm_token_type_ids, max_new_tokens=args.max_new_tokens,
                                  do_sample=False, eos_token_id=plain.eos_token_ids, pad_token_id=plain.pad_token_id)

        assert torch.equal(new.run(batch).sequences, old.run(batch).sequences)
        names = {"generate": generate, f"decoder at {args.commit}": lambda: old.run(batch),
                 "decoder (this checkout)": lambda: new.run(batch)}
        times = C.time_interleaved(names, args.reps, args.device, clock=C.resolve_clock(args))
    med = {k: C.median(v) for k, v in times.items()}
    before_name = f"decoder at {args.commit}"
    rows = [{"variant": k, "median_s": v, "x generate (tokens/s)": med["generate"] / v,
             "+-": C.paired_spread(times["generate"], times[k]) if k != "generate" else None} for k, v in med.items()]
    ratio = med["decoder (this checkout)"] / med[before_name]
    C.print_table(f"[decoder vs commit {args.commit}] no latent steps, batch {args.batch}, {args.max_new_tokens} new "
                  f"tokens; outputs equal", rows, ["variant", "median_s", "x generate (tokens/s)", "+-"])
    print(f"this checkout / {args.commit}: {ratio:.3f}x the time "
          f"(+/- {C.paired_spread(times['decoder (this checkout)'], times[before_name]):.3f})")
    C.write_results("bench_decoder_vs_commit", args, shape, {
        "commit": args.commit, "times_s": times, "median_s": med,
        "time_this_over_commit": ratio,
        "tokens_per_s_over_generate": {k: med["generate"] / v for k, v in med.items()},
        "settings": {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "reps": args.reps}})


if __name__ == "__main__":
    main()
