"""python -m explore_jax.convert {hf-to-orbax,orbax-to-hf,run-to-hf,restack} ...: checkpoint
conversion (`explore_jax.train.export`; --help lists the options)."""

from explore_jax.train import export

if __name__ == "__main__":
  export.main()
