"""Scale: the mesh and the logical-axis rules, the memory plan, and the TPU compiler's view.

  sharding  mesh (data, fsdp, tensor), logical-to-mesh rules, multi-host helpers
  memory    the analytic per-device memory plan (`python -m explore_jax.tpu.memory`)
  aot       one training step's programs compiled for a TPU topology from shapes
            (`python -m explore_jax.aot`)
"""
