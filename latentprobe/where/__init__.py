"""Where and when: exact activation patching and its gradient estimate (`patching`, `attribution`, sharing
`hooks`), grounding maps of latent steps over the image (`grounding`), the logit lens (`lens`), and the drivers
that run the last two and write their tables (`runs`).

Sits above `latentprobe.runs` (its drivers reuse the runs' data defaults, progress and manifests) and below the
report; it computes and writes tables, never draws (`latentprobe.report` draws from the tables).
"""
