"""scope-megatron: SCOPE on-policy distillation on megatron-core.

Modules, one concept each (the same tree as README.md's layout table):

Entry points
- ``cli``: the ``scope-megatron`` console script, one sub-command per job.
- ``train``: a training run (single process, or one process per rank under torchrun).
- ``config``: the one typed config, validated at startup.

Training
- ``trainer``: the SCOPE loop. ``trainer.loop`` (``Trainer``: setup, ``run``, the step),
  ``trainer.state`` (``RunState``, checkpointed whole; ``StopRequest``), ``trainer.learner``
  (model, optimizer, the two passes), ``trainer.rollout_source`` (rank 0 collects, every rank
  receives; generation one batch ahead), ``trainer.engines`` (embedded engines, the controller's
  connections), ``trainer.step_metrics`` (a step's metrics), ``trainer.colocation`` (devices handed between
  colocated engines and the trainer), ``trainer.controller`` (one step's
  rollouts, teacher scores, rewards), ``trainer.batching``, ``trainer.weight_sync``,
  ``trainer.checkpointing``, ``trainer.metrics`` / ``trainer.sinks`` (where metrics go).
- ``objective``: the SCOPE math (routing, group weights, vocab-parallel log-probs, loss).
- ``batch``: the micro-batch types (``MicroBatch``, ``PackedMicroBatch``) and context-parallel splits.
- ``packing``: packed micro-batches by token budget, balanced over data-parallel ranks.
- ``megatron_step``: forward passes and training steps through megatron's pipeline schedule.

Model and parallelism
- ``model``: HF config -> megatron-core GPTModel, HF <-> Megatron weight mapping, checkpoints.
- ``parallel``: torch.distributed + megatron parallel-state setup, the local device.
- ``cpu_shims``: the few monkeypatches megatron-core needs on a machine without CUDA.
- ``device_check``: refuses a silent CPU fallback on a machine whose GPUs torch cannot use.
- ``runtime_env``: the process environment set before torch.distributed / CUDA start.

Rollouts and evaluation
- ``rollout``: SGLang client, launcher, embedded engine, weight transfer, rewards, prompt data;
  ``rollout.types`` holds ``Trajectory`` and ``RolloutBatch``; the embedded engine is
  ``rollout.engine`` (scheduler, sampling, weights) behind ``rollout.server`` (the HTTP routes),
  run by ``rollout.embedded_server``; ``rollout.batch_transport`` sends a step's batch to every
  rank as flat tensors, ``rollout.tensor_transport`` pushes weights in memory to colocated engines,
  ``rollout.readiness`` waits for a server to answer, ``rollout.server_process`` spawns and stops
  every server process (SGLang, its router, the embedded engine).
- ``evaluation``: ``scope-megatron eval``, Avg@k / Pass@k on the math benchmarks.

Support
- ``logs``: the logging set-up every entry point shares.

Examples (``examples``, outside the library: nothing above imports them)
- ``examples.demo``: SCOPE end to end on a CPU in minutes (teacher, student, synthetic task).
- ``examples.parity_demo``: conversion, HF parity and a few training steps on a tiny model.
- ``examples.tiny_models``: tiny HF models and tokenizer built locally, for tests, demos and benches.
- ``examples.tiny``: the tiny student, teacher, toy prompts and toy reward of ``configs/tiny_cpu.yaml``.

Reference notes: ``docs/method.md`` (the objective), ``docs/sglang-protocol.md`` (the engine
protocol), ``docs/megatron-notes.md`` (layouts, checkpoints, CPU).
"""

__version__ = "0.1.0"
