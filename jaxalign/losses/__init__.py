"""Pure, jittable alignment objectives: arrays in, (unreduced values, metrics) out.

Everything public in the submodules is re-exported here, so ``from jaxalign import losses`` then
``losses.dpo_loss(...)`` works; the submodules group the families:

- :mod:`~jaxalign.losses.core`: ``token_logps``, ``sequence_logps``, ``entropy``, masked (sum, count) reductions.
- :mod:`~jaxalign.losses.sft`: ``sft_loss``; :mod:`~jaxalign.losses.distill`: ``generalized_jsd_loss`` (GKD).
- :mod:`~jaxalign.losses.reward`: ``bradley_terry_loss``, ``best_of_n_loss``, ``preference_accuracy``.
- :mod:`~jaxalign.losses.ppo`: ``gae``, ``whiten``, ``kl_estimate``, ``shape_rewards``, ``ppo_policy_loss``,
  ``ppo_value_loss``, the adaptive KL controller.
- :mod:`~jaxalign.losses.grpo`: ``group_advantages``, ``grpo_loss``, ``grpo_objective``.
- :mod:`~jaxalign.losses.dpo`: ``dpo_loss`` and its variants, ``kto_loss``;
  :mod:`~jaxalign.losses.reference_free`: ``simpo_loss``, ``orpo_loss``, ``genarm_loss``.
- :mod:`~jaxalign.losses.contrastive`: ``contrastive_loss`` (InfoNCE over pooled sequence states), ``pool_states``.
- :mod:`~jaxalign.losses.token_level` and :mod:`~jaxalign.losses.tfpo`: LLMDoctor's token-level rewards
  and TFPO flow balance.

See docs/losses.md for every formula, reference and deviation from the papers or TRL.
"""

from jaxalign.losses import contrastive, core, distill, dpo, grpo, ppo, reference_free, reward, sft, tfpo, token_level
from jaxalign.losses.contrastive import *  # noqa: F403
from jaxalign.losses.core import *  # noqa: F403
from jaxalign.losses.distill import *  # noqa: F403
from jaxalign.losses.dpo import *  # noqa: F403
from jaxalign.losses.grpo import *  # noqa: F403
from jaxalign.losses.ppo import *  # noqa: F403
from jaxalign.losses.reference_free import *  # noqa: F403
from jaxalign.losses.reward import *  # noqa: F403
from jaxalign.losses.sft import *  # noqa: F403
from jaxalign.losses.tfpo import *  # noqa: F403
from jaxalign.losses.token_level import *  # noqa: F403

__all__ = sorted(
    {
        *contrastive.__all__,
        *core.__all__,
        *distill.__all__,
        *dpo.__all__,
        *grpo.__all__,
        *ppo.__all__,
        *reference_free.__all__,
        *reward.__all__,
        *sft.__all__,
        *tfpo.__all__,
        *token_level.__all__,
    }
)
