"""RL core as pure functions of arrays (no models): advantages, losses, the actor loss.

  advantages   GRPO group normalisation, GAE, whitening, and `entropy_advantage` -- the paper's psi
  losses       entropy / log-probs from logits or hidden states (chunked), PPO surrogate, value
               loss, KL estimators, aggregation modes
  actor_loss   `LossConfig` and `actor_loss(logits, batch, cfg)`: where psi, the entropy
               regulariser and KL are switched on
"""

from explore_jax.rl import actor_loss, advantages, losses

__all__ = ["actor_loss", "advantages", "losses"]
