"""The alignment methods, each a training run built on the core (:mod:`jaxalign.train`): a typed config, the
method's objective, its data checks, its epilogue (normalisation, export), and ``jaxalign train <method>``.

- :mod:`~jaxalign.methods.recipe`: ``RunConfig`` (presets, YAML and ``key=value`` overrides), the presets.
- :mod:`~jaxalign.methods.pipeline`: ``run(config)``, one run end to end (load, data, train, evaluate, export).
- :mod:`~jaxalign.methods.sft`, :mod:`~jaxalign.methods.distill`, :mod:`~jaxalign.methods.reward` (with
  :mod:`~jaxalign.methods.probe`), :mod:`~jaxalign.methods.dpo`, :mod:`~jaxalign.methods.kto`: the offline
  methods' objectives and builders.
- :mod:`~jaxalign.methods.ppo`, :mod:`~jaxalign.methods.grpo` on :mod:`~jaxalign.methods.online` (rollouts,
  scoring, minibatch epochs) with rewards from :mod:`~jaxalign.methods.rewards`; :mod:`~jaxalign.methods.rl`
  runs them from a config.
- :mod:`~jaxalign.methods.common`: what the methods share (loading, batching, LoRA, output directory).
- :mod:`~jaxalign.methods.command`: the ``jaxalign train`` command.

The core never imports this package; see docs/architecture.md.
"""

from jaxalign.methods.common import RunResult
from jaxalign.methods.pipeline import run
from jaxalign.methods.recipe import RunConfig, load_run_config, preset_names

__all__ = ["RunConfig", "RunResult", "load_run_config", "preset_names", "run"]
