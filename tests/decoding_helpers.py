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
