"""The trained model organisms as subjects: ``organism-<name>`` for every organism shipped in
``latentprobe/organisms/weights`` (see `latentprobe.organisms` for what each one is and how it was trained).

    >>> from latentprobe.subjects import load_subject
    >>> subject = load_subject("organism-bottleneck")
    >>> subject.protocol.answer_mask
    'answer_blind_to_image'
"""

from __future__ import annotations

from ..errors import LatentProbeError
from ..organisms.recipes import ORGANISMS
from ..organisms.shipping import load_organism, shipped_organisms
from . import SubjectSpec, register


def _builder(name: str):
    def build(checkpoint: str | None = None, protocol: str | None = None, **_):
        recipe = ORGANISMS[name]
        own = recipe.protocol.name if recipe.protocol else None
        if protocol is not None and protocol != own:
            raise LatentProbeError(f"organism-{name} was trained with protocol {own!r}, not {protocol!r}",
                                   "leave --protocol out for organisms")
        return load_organism(name, folder=checkpoint)

    return build


for _name in shipped_organisms():
    _recipe = ORGANISMS[_name]
    register(SubjectSpec(_recipe.subject_name, f"trained organism: {_recipe.summary}", _builder(_name),
                         protocol_name=_recipe.protocol.name if _recipe.protocol else None))
