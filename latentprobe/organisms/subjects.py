"""The trained model organisms as subjects: ``organism-<name>`` for every organism shipped in
``latentprobe/organisms/weights`` (see `latentprobe.organisms` for what each one is and how it was trained), the
text organisms (``organism-text-routed``, ``organism-text-bypass``; `latentprobe.organisms.text_recipes`) included.

    >>> from latentprobe.model.subjects import load_subject
    >>> subject = load_subject("organism-bottleneck")
    >>> subject.protocol.answer_mask
    'answer_blind_to_image'
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class TextOrganismSpec(SubjectSpec):
    """A text organism's registry entry: a text-only subject (text data by default, image parts refused)."""

    backbone: str = "text"


def _text_builder(name: str):
    def build(checkpoint: str | None = None, protocol: str | None = None, **_):
        from .text import load_text_organism
        from .text_recipes import TEXT_ORGANISMS

        own = TEXT_ORGANISMS[name].protocol.name
        if protocol is not None and protocol != own:
            raise LatentProbeError(f"organism-{name} was trained with protocol {own!r}, not {protocol!r}",
                                   "leave --protocol out for organisms")
        return load_text_organism(name, folder=checkpoint)

    return build


def _text_default_data(name: str):
    def default_data(limit: int | None = None, split: str = "test"):
        """The text organism's own hops questions, split ``split`` (the held-out split by default)."""
        from .text import N_TEST, text_organism_data
        from .text_recipes import TEXT_ORGANISMS

        recipe = TEXT_ORGANISMS[name]
        n = min(limit, N_TEST) if limit and split == "test" else limit
        instances = text_organism_data(recipe, split, n)
        # builtin-hops reads the same held-out questions back (a report's control types, --data builtin-hops)
        return instances, "builtin-hops" if split == "test" else f"hops task, split {split}"

    return default_data


def _register_text_organisms():
    from .text import shipped_text_organisms
    from .text_recipes import TEXT_ORGANISMS

    for name in shipped_text_organisms():
        recipe = TEXT_ORGANISMS[name]
        register(TextOrganismSpec(recipe.subject_name, f"trained text organism: {recipe.summary}",
                                  _text_builder(name), protocol_name=recipe.protocol.name,
                                  default_data=_text_default_data(name)))


_register_text_organisms()
