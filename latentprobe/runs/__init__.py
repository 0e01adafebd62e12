"""The runs stage: the drivers that decode a subject over instances and write a TraceStore, and the store itself.

* `common`: what every run shares (index rows, failure isolation, manifests, out-of-memory handling, progress);
* `trace`: clean runs that record latent states (`latentprobe.runs.trace.trace`);
* `intervene`: clean runs plus interventions, and their causal effects (`latentprobe.runs.intervene.intervene`);
* `store`: the append-only TraceStore; `distributed`: sharding under torchrun; `conformance`: `latentprobe check`.

Imports the model, data, interventions and statistics stages; never the where-and-when, organisms, report or CLI.

The submodules are imported on use, so ``import latentprobe.runs`` loads no model code.
"""
