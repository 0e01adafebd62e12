"""Runs: the drivers that decode a subject over instances and write a TraceStore.

* `common`: what every run shares (index rows, failure isolation, manifests, out-of-memory handling, progress);
* `trace`: clean runs that record latent states (`latentprobe.runs.trace.trace`);
* `intervene`: clean runs plus interventions, and their causal effects (`latentprobe.runs.intervene.intervene`).

The submodules are imported on use, so ``import latentprobe.runs`` loads no model code.
"""
