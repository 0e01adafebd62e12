"""The trained model organisms as subjects: ``organism-<name>`` for every organism shipped in
``latentprobe/organisms/weights`` (see `latentprobe.organisms` for what each one is and how it was trained).

    >>> from latentprobe.model.subjects import load_subject
    >>> subject = load_subject("organism-bottleneck")
    >>> subject.protocol.answer_mask
    'answer_blind_to_image'
"""

from __future__ import annotations

from ..errors import LatentProbeError
from .recipes import ORGANISMS
from .shipping import load_organism, shipped_organisms
from ..model.subjects import SubjectSpec, register


def _builder(name: str):
    def build(checkpoint: str | None = None, protocol: str | None = None, **_):
        recipe = ORGANISMS[name]
        own = recipe.protocol.name if recipe.protocol else None
        if protocol is not None and protocol != own:
            raise LatentProbeError(f"organism-{name} was trained with protocol {own!r}, not {protocol!r}",
                                   "leave --protocol out for organisms")
        return load_organism(name, folder=checkpoint)

    return build


def _default_data(name: str):
    def default_data(limit: int | None = None, split: str = "test"):
        """The organism's own task data, split ``split`` (the held-out test split by default: never trained on)."""
        from ..data.instances import load_jsonl
        from .training import organism_data, organism_held_out_data

        # the held-out split alone is written without the 1800 training images (the same instances and pixels)
        path = organism_held_out_data(ORGANISMS[name], limit) if split == "test" and limit and limit <= 600 \
            else organism_data(ORGANISMS[name])
        instances = load_jsonl(path, split=split)
        return (instances[:limit] if limit else instances), f"{path} (split {split})"

    return default_data


for _name in shipped_organisms():
    _recipe = ORGANISMS[_name]
    register(SubjectSpec(_recipe.subject_name, f"trained organism: {_recipe.summary}", _builder(_name),
                         protocol_name=_recipe.protocol.name if _recipe.protocol else None,
                         default_data=_default_data(_name)))
