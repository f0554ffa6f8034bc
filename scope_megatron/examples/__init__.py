"""Examples built on the library, kept out of it: demos to run and the tiny fixtures they share.

- :mod:`.demo`: ``scope-megatron demo``, SCOPE end to end on a CPU in minutes (teacher, student,
  synthetic task, before/after table).
- :mod:`.parity_demo`: ``scope-megatron parity-demo``, conversion, Megatron-vs-HF parity and a few
  training steps on a tiny model.
- :mod:`.tiny_models`: tiny HF models and tokenizer built locally (no hub access), for tests,
  demos and benches.
- :mod:`.tiny`: ``python -m scope_megatron.examples.tiny DIR``, the tiny student, teacher and toy
  prompts ``configs/tiny_cpu.yaml`` trains on, and its toy reward.

Nothing in the library imports this package.
"""
