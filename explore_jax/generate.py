"""python -m explore_jax.generate --model DIR --prompt TEXT ...: sample from a model
(`explore_jax.rollout.cli`; --help lists the options)."""

from explore_jax.rollout import cli

if __name__ == "__main__":
  cli.main()
