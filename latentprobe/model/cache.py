"""`run_with_cache`: decode a few instances and keep their states in memory, addressed by `Site`.

For notebooks, in the spirit of TransformerLens's ``run_with_cache``: no store on disk, the same names as the
Recorder and the TraceStore (``latent[2].layer[14]``, ``image.layer[3]``, ``prompt_last.layer[28]``,
``answer.layer[5]``), and the same arrays as ``TraceStore.site_array`` (records stacked on the first axis,
NaN where a row has fewer latent steps, answer tokens or image tokens).

    >>> from latentprobe.model.subjects import load_subject
    >>> from latentprobe.data import builtin_instances
    >>> subject = load_subject("tiny")
    >>> result, cache = run_with_cache(subject, builtin_instances()[:2], sites=["latent.layer[0]", "image.layer[1]"])
    >>> cache["latent[3].layer[0]"].shape                     # latent step 3, the fed-back vector, per instance
    torch.Size([2, 64])
    >>> bool((cache["latent.layer[0]"][:, 3] == cache["latent[3].layer[0]"]).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Sequence

import torch

from .decoding import DecodeConfig, DecodeResult, LatentDecoder
from ..errors import LatentProbeError
from .recording import Recorder, RecordSpec, site_tensor
from .sites import Site, as_site, check_sites

CACHE_GROUPS = ("latent", "image", "prompt_last", "answer")
MAX_INSTANCES = 64  # beyond this a TraceStore (`trace`) keeps memory flat; the cache holds everything


class LatentCache(Mapping):
    """Named states of a few decoded instances: ``cache[site]`` -> float32 tensor, first axis = instance.

    Keys are the recorded group sites (``latent.layer[L]`` (B, S, D), ``image.layer[L]`` (B, n_image, D),
    ``prompt_last.layer[L]`` (B, D), ``answer.layer[L]`` (B, n_answer, D)); any finer site of a recorded layer
    (``latent[k].layer[L]`` (B, D), ``answer[j].layer[L]``) can be read too. Strings are read as sites.

    Attributes
    ----------
    instance_ids : list of str
    layer_ids : list of int
        The recorded hidden-state layers (0 = embeddings, N = final norm).
    records : list of dict
        Per instance, the Recorder's record plus ``latent`` (the fed-back vectors), as the store keeps them.
    image_grids : list of list of tuple
        Per instance, per image, its merged image-token grid (t, rows, cols), row-major like the image tokens.
    """

    def __init__(self, records: list[dict[str, torch.Tensor]], layer_ids: Sequence[int], sites: Sequence[Site],
                 instance_ids: Sequence[str], image_grids: list[list[tuple[int, int, int]]]):
        self.records = records
        self.layer_ids = list(layer_ids)
        self.instance_ids = list(instance_ids)
        self.image_grids = image_grids
        self._sites = list(dict.fromkeys(sites))
        self._memo: dict[Site, torch.Tensor] = {}

    def __getitem__(self, site) -> torch.Tensor:
        site = as_site(site)
        if site not in self._memo:
            if site.layer not in self.layer_ids and not (site.group == "latent" and site.layer == 0):
                raise LatentProbeError(f"site {site} is not in this cache (layers cached: {self.layer_ids})",
                                       "pass it in run_with_cache(..., sites=[...])")
            states = self.stack(site)
            if site.group in ("latent", "answer") and site.step is not None and states.numel() == 0:
                ran = max((int(r["latent"].shape[0]) for r in self.records if "latent" in r), default=0)
                what = f"these instances ran {ran} latent steps (0..{ran - 1})" if site.group == "latent" and ran \
                    else "no instance has that position"
                raise LatentProbeError(f"site {site} was not run: {what}",
                                       "read a step that ran, or raise the protocol's steps (--latent-steps)")
            self._memo[site] = states
        return self._memo[site]

    def stack(self, site: Site | str, image: str = "tokens") -> torch.Tensor:
        """``cache[site]`` with a choice for image sites: every token (``"tokens"``) or their mean (``"mean"``)."""
        from .recording import stack_site_states

        site = as_site(site)
        states = [site_tensor(record, self.layer_ids, site, image=image) for record in self.records]
        if site.step is not None and site.group in ("latent", "answer") and all(s is None for s in states):
            # say so, rather than hand back an empty (B, 0) tensor that looks like a result
            reached = [int(r["latent"].shape[0]) if "latent" in r and r["latent"] is not None else 0
                       for r in self.records]
            if site.group == "latent":
                ran = f"at most {max(reached, default=0)} latent step(s)"
            else:
                answers = [int(r["answer_layers"].shape[-2]) for r in self.records if "answer_layers" in r]
                ran = f"at most {max(answers, default=0)} answer token(s)"
            raise LatentProbeError(f"no instance reached {site}: these rows ran {ran}",
                                   f"read a step that was run (cache['{site.group}.layer[{site.layer}]'] holds every "
                                   "step, NaN where a row stopped earlier), or decode with more latent steps")
        return torch.from_numpy(stack_site_states(states))

    def __contains__(self, site) -> bool:
        """A site is in the cache when its group was recorded at its layer (any step of it can be read)."""
        try:
            site = as_site(site)
        except LatentProbeError:
            return False
        return Site(site.group, site.layer) in self._sites or (
            site.group == "latent" and site.layer == 0 and any(s.group == "latent" for s in self._sites))

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __repr__(self) -> str:
        return f"LatentCache({len(self.instance_ids)} instances, sites {[str(s) for s in self._sites]})"


def default_sites(num_layers: int) -> list[Site]:
    """Every layer at the latent steps, the image tokens, the last prompt token and the answer."""
    return [Site(group, layer) for group in CACHE_GROUPS for layer in range(num_layers + 1)]


def run_with_cache(subject, instances, sites: Sequence[Site | str | int] | None = None, *,
                   config: DecodeConfig | None = None, edits=None, images: list[list] | None = None,
                   max_instances: int = MAX_INSTANCES) -> tuple[DecodeResult, LatentCache]:
    """Decode ``instances`` once and return the decoder's outputs and their states by site, in memory.

    Parameters
    ----------
    subject : Subject
    instances : list of Instance
        A few instances (at most ``max_instances``); decoded as one batch.
    sites : sequence of Site, str or int, optional
        What to keep; bare ints are latent-group layers. Default: every layer of every group in
        `CACHE_GROUPS`. Checked against the model and protocol before the model runs.
    config : DecodeConfig, optional
        Decoding settings (default: the subject's budget, greedy).
    edits : LatentEdit or list, optional
        Latent edits, as for `LatentDecoder.run` (bound interventions); the cache holds the edited run.
    images : list of list, optional
        Images to use instead of the instances' own (input interventions).

    Returns
    -------
    result : DecodeResult
        Exactly what `LatentDecoder.run` returns (texts, latent vectors, answer-slot logits...).
    cache : LatentCache
        ``cache[site]`` -> tensor with one entry per instance, the same array `TraceStore.site_array` gives.
    """
    instances = list(instances)
    if not instances:
        raise LatentProbeError("run_with_cache got no instances", "pass a list of one or more instances")
    if len(instances) > max_instances:
        raise LatentProbeError(f"run_with_cache keeps every state in memory; {len(instances)} instances is more "
                               f"than max_instances={max_instances}",
                               "use `trace` (a TraceStore on disk) for many instances, or raise max_instances")
    from .conditions import warn_about_conditions

    warn_about_conditions(subject, instances)  # e.g. an organism given 56-px images: its answers are at chance
    n_layers = subject.num_layers
    protocol = subject.resolved_protocol
    max_steps = None
    if protocol is not None:
        # One rule with the CLI and the decoder: None means the protocol's K (or cap), 0 means no latent step.
        max_steps = protocol.num_steps if config is None or config.latent_steps is None else config.latent_steps
    sites = default_sites(n_layers) if sites is None else sites
    sites = check_sites(sites, n_layers, max_latent_steps=max_steps, groups=CACHE_GROUPS)
    if protocol is None and any(s.group == "latent" for s in sites):
        if sites == default_sites(n_layers):
            sites = [s for s in sites if s.group not in ("latent", "answer")]
        else:
            raise LatentProbeError(f"subject {subject.name!r} has no latent phase, so it has no latent sites",
                                   "ask for image, prompt_last or answer sites")
    decoder = LatentDecoder(subject, config or DecodeConfig(max_new_tokens=subject.max_new_tokens))
    batch = subject.encode(instances, images=images)
    if any(s.group == "image" for s in sites) and batch.image_grid_thw is None:
        raise LatentProbeError("image sites were asked for, but these instances have no images",
                               "drop the image sites or give instances with images")
    with Recorder(decoder, RecordSpec.for_sites(sites)) as recorder:
        result = decoder.run(batch, edits)
        records = recorder.records()
    for record, row in zip(records, result.rows):
        record["latent"] = row.latent_vectors
    return result, LatentCache(records, recorder.layers, sites, batch.instance_ids, image_grids(batch))


def image_grids(batch) -> list[list[tuple[int, int, int]]]:
    """Per row, per image, the merged image-token grid (t, rows, cols) from ``image_grid_thw`` (patch units)."""
    if batch.image_grid_thw is None:
        return [[] for _ in range(batch.batch_size)]
    merge = batch.merge_size
    grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in batch.image_grid_thw.tolist()]
    out, start = [], 0
    for count in batch.image_counts:
        out.append(grids[start:start + count])
        start += count
    return out
