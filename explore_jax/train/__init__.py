"""The trainer: one RL step after another, from a config, into a workdir.

  loop      `train(config, workdir)`: set up, restore, the steps, save, export (read it first)
  setup     the step's static config, optimizers, model files, the resume check, the dry run
  collect   a step's experience: rollouts sampled in waves and graded
  step      the jitted steps: score a rollout (old log-probs, values, advantages), mini-batch updates
  state     the one-pytree train state, its optimizers and its orbax checkpoints
  metrics   metrics.jsonl and TensorBoard files, local or gs://
  export    a run's actor as a Hugging Face directory; `python -m explore_jax.convert`

Command line: `python -m explore_jax.train --config configs/X.py --workdir DIR` (`__main__.py`).
"""
