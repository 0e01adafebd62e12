"""latentprobe: causal mediation, collapse and probing analyses of latent reasoning tokens in multimodal LLMs.

The public nouns, importable from the package itself (loaded on first use, so ``import latentprobe`` and the CLI
stay fast):

>>> import latentprobe as lp
>>> str(lp.Site("latent", layer=14, step=2))
'latent[2].layer[14]'
>>> sorted(lp.__all__)[:4]
['DecodeConfig', 'Instance', 'LatentDecoder', 'LatentProbeError']

A whole run in four lines (``tiny`` is a random-weight model built offline; it answers at chance)::

    subject = lp.load_subject("tiny")
    instances = lp.builtin_instances()[:4]
    lp.trace(subject, instances, "runs/t", spec=lp.RecordSpec(layers="all"))
    lp.TraceStore("runs/t").site_array(lp.TraceStore("runs/t").index().record_id, "latent[0].layer[1]")
"""

from importlib import import_module

from . import _moved

_moved.install()  # old module paths (latentprobe.model.decoding, latentprobe.where.patching, ...) keep working for one release

__version__ = "0.1.0"

# name -> module that defines it (one place per noun; see the README's architecture section)
_EXPORTS = {
    "LatentProbeError": "errors",
    "Instance": "data.instances",
    "builtin_instances": "data.instances",
    "organism_data": "organisms.held_out",
    "load_instances": "data.loading",
    "LatentProtocol": "model.protocol",
    "Subject": "model.subject",
    "PromptStyle": "model.subject",
    "load_subject": "model.subjects",
    "LatentDecoder": "model.decoding",
    "DecodeConfig": "model.decoding",
    "StepContext": "model.decoding",
    "Site": "model.sites",
    "StepKind": "model.sites",
    "Recorder": "model.recording",
    "RecordSpec": "model.recording",
    "TraceStore": "runs.store",
    "trace": "runs.trace",
    "intervene": "runs.intervene",
    "make_interventions": "interventions",
    "run_with_cache": "model.cache",
    "Verdict": "verdicts",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: the next access is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
