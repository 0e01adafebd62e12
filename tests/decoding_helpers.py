"""Shared test helpers: scripted choices, instances with images of given sizes."""

import numpy as np
from PIL import Image

from latentprobe.data import Instance
from latentprobe.model.decoding import LatentDecoder


class ScriptedDecoder(LatentDecoder):
    """Overrides the model's choice at chosen (row, generated offset) pairs, e.g. to open latent mode at a
    given step in a random-weight model; every other choice is the model's own."""

    def __init__(self, subject, config, script):
        super().__init__(subject, config)
        self.script = script

    def _decide(self, state, hidden, *args):
        self._state = state
        return super()._decide(state, hidden, *args)

    def _select(self, logits, rows, generators):
        picks = super()._select(logits, rows, generators)
        for i, r in enumerate(rows.tolist()):
            key = (r, int(self._state.n_generated[r]))
            if key in self.script:
                picks[i] = self.script[key]
        return picks


def make_instances(tmp_path, sizes, seed=0, question="What colour is the square?"):
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"img_{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
        out.append(Instance(id=f"i{i}", question=question + " " * i, answer="red", images=[str(path)],
                            options=["red", "green", "blue", "yellow"]))
    return out


def with_protocol(subject, protocol, force_start):
    from latentprobe.model.subject import PromptStyle, Subject

    return Subject(name=subject.name, model=subject.model, tokenizer=subject.tokenizer,
                   image_processor=subject.image_processor, protocol=protocol,
                   prompt_style=PromptStyle(force_latent_start=force_start), max_new_tokens=16)


def count_live_images(monkeypatch, modules) -> list:
    """Make each module's ``load_images`` return trackable lists and count, at every prompt prefill, how many of
    them are still alive; returns a one-element list holding the largest count seen (issue 22: a run holds only
    the images of the batch it is decoding, never the dataset's)."""
    import gc
    import weakref

    alive, most = weakref.WeakSet(), [0]

    class Images(list):  # a list that a WeakSet can hold (by identity)
        __hash__ = object.__hash__

    def tracked(real):
        def load(instance, *args, **kwargs):
            images = Images(real(instance, *args, **kwargs))
            alive.add(images)
            return images
        return load

    real_prefill = LatentDecoder.prefill

    def counting_prefill(self, *args, **kwargs):
        gc.collect()
        most[0] = max(most[0], len(alive))
        return real_prefill(self, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "load_images", tracked(module.load_images))
    monkeypatch.setattr(LatentDecoder, "prefill", counting_prefill)
    return most
