"""The embedded default: a tiny base model pre-trained on countdown, the paper's comparison on it,
and the study over seeds.

  pretrain  the tiny Qwen2 base model and its tokenizer (cached)
  study     `run(config, workdir)`: base model -> RL arms -> evaluation -> paired comparison,
            the paper's analyses -> report (`make demo`, `make study`)
  repro     runs the demo twice from nothing and compares the results (`make demo-check`)

Command line: `python -m explore_jax.demo --config configs/demo.py --workdir runs/demo`.
"""
