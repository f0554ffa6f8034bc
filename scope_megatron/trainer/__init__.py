"""The SCOPE training loop: one ``torchrun`` world of Megatron ranks that trains the student.

- :mod:`.loop`: :class:`~.loop.Trainer`, one step = rollouts -> old log-probs -> plan ->
  megatron train step -> weight sync -> metrics / checkpoint.
- :mod:`.controller`: rank 0's rollout + overlapped teacher scoring + rewards.
- :mod:`.batching`: the broadcast batch -> global tensors and this DP rank's micro-batches.
- :mod:`.weight_sync`: export_hf_tensors -> WeightTransfer, with the probe check.
- :mod:`.checkpointing`: atomic model + optimizer + scheduler + data + RNG checkpoints, resume.
- :mod:`.metrics`: TensorBoard, metrics.jsonl, tqdm, log line, MFU.
"""
