"""Rollouts and teacher scoring: everything that talks to the student and teacher engines.

- :mod:`.client`: async SGLang 0.5.23 client (generate, teacher scoring, weight-update protocol).
- :mod:`.embedded_server` / :mod:`.server` / :mod:`.engine`: a transformers engine speaking SGLang's
  HTTP protocol (``scope-megatron serve``; :func:`~.embedded_server.start_embedded_server`
  in-process); :mod:`.server` holds the routes, :mod:`.engine` the scheduler, sampling and weights.
- :mod:`.weight_transfer`: trainer side of weight pushes (distributed broadcast or disk).
- :mod:`.launcher`: student / teacher servers (+ router) as subprocesses, or external URLs.
- :mod:`.rewards`: math-verify on the last ``\\boxed{}`` in a process pool with timeouts.
- :mod:`.data`: prompt data (jsonl / parquet, chat template, paper suffix, resumable shuffle).
- :mod:`.protocol`, :mod:`.dist_group`: shared protocol pieces and SGLang's group construction.
"""
