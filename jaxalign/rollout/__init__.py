"""Sampling with a KV cache inside one compiled loop, and guided (base + guide models) decoding.

Quick path::

    import jax
    from jaxalign import models, rollout

    model, tokenizer = models.load_gguf(models.default_model_path())
    sampler = rollout.Sampler(model)
    out = sampler.generate([tokenizer("Hello")["input_ids"]], key=jax.random.key(0),
                           params=rollout.SamplingParams(max_new_tokens=32, top_p=0.9))
    print(tokenizer.decode(out.tokens[0][out.response_mask[0]]))

- :mod:`~jaxalign.rollout.engine`: :class:`Sampler` (prefill + decode loop, guidance, meshes) and
  :class:`Rollout` (tokens, masks, lengths, sampling and model log-probs).
- :mod:`~jaxalign.rollout.guided`: :class:`GuidedSampler`, LLMDoctor's patient steered by one doctor per
  preference dimension (``β_i = β · w_i`` from named preference weights; loads doctor directories).
- :mod:`~jaxalign.rollout.args`: :class:`ArgsSampler`, ARGS decoding (the patient's top-k tokens re-ranked by
  a reward model, arXiv 2402.01694).
- :mod:`~jaxalign.rollout.continuous`: :class:`ContinuousEngine`, decode slots that requests join and leave
  between compiled steps (continuous batching; what ``jaxalign serve`` runs).
- :mod:`~jaxalign.rollout.params`: :class:`SamplingParams`.
- :mod:`~jaxalign.rollout.filters`, :mod:`~jaxalign.rollout.sampling`: top-k / top-p / min-p thresholds
  without a vocabulary sort, inverse-CDF draws, :func:`filtered_logprobs`.
- :mod:`~jaxalign.rollout.batching`: left padding and the length / batch buckets.
- :mod:`~jaxalign.rollout.text`: incremental detokenisation for streaming.

See docs/rollout.md.
"""

from jaxalign.rollout.args import ArgsSampler
from jaxalign.rollout.batching import bucket, check_left_padded, left_pad
from jaxalign.rollout.continuous import ContinuousEngine, RowSettings, TokenOut
from jaxalign.rollout.engine import Rollout, Sampler
from jaxalign.rollout.filters import DEFAULT_CANDIDATES, filtered_logprobs, keep_thresholds, order_keys
from jaxalign.rollout.guided import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    GuidedSampler,
    guidance_betas,
    read_dimensions,
    resolve_weights,
)
from jaxalign.rollout.params import Filters, SamplingParams
from jaxalign.rollout.sampling import inverse_cdf, next_token
from jaxalign.rollout.text import TextStream

__all__ = [
    "ArgsSampler",
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_CANDIDATES",
    "ContinuousEngine",
    "Filters",
    "GuidedSampler",
    "Rollout",
    "RowSettings",
    "Sampler",
    "SamplingParams",
    "TextStream",
    "TokenOut",
    "bucket",
    "check_left_padded",
    "filtered_logprobs",
    "guidance_betas",
    "inverse_cdf",
    "keep_thresholds",
    "left_pad",
    "next_token",
    "order_keys",
    "read_dimensions",
    "resolve_weights",
]
