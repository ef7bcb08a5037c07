"""The causal-LM surface every family shares: hidden states from a trunk, float32 logits from the head.

A family (Llama, GPT-2) subclasses :class:`CausalLM`, builds its trunk (tokens -> final normed hidden states,
with the cache bookkeeping of :mod:`jaxalign.models.stack`) and its optional untied ``lm_head``, and names the
trunk and the tied embedding table. ``hidden_states`` / ``logits`` / ``__call__`` are written once here, so
trainers that chunk the LM head over the sequence (``hidden_states`` once, ``logits`` per chunk) treat every
family alike.
"""

from __future__ import annotations

from flax import nnx
from jaxtyping import Array, Float, Int

from jaxalign.models.cache import Joining, KVCache
from jaxalign.models.stack import vocab_logits


class CausalLM(nnx.Module):
    """Base of the ``...ForCausalLM`` / ``...LMHeadModel`` classes.

    Subclasses set ``self.config`` (with ``compute_jnp_dtype``) and ``self.lm_head`` (None when the head is
    tied to the embeddings) and implement :attr:`trunk` and :meth:`tied_embedding`.
    """

    config: object
    lm_head: nnx.Module | None

    @property
    def trunk(self) -> nnx.Module:
        """The module mapping ``tokens`` (and the attention keywords) to ``(hidden [B, T, D], cache)``."""
        raise NotImplementedError

    def tied_embedding(self) -> Float[Array, "V D"]:
        """The input embedding table, used as the output projection when ``lm_head`` is None."""
        raise NotImplementedError

    @property
    def supports_joining(self) -> bool:
        """Whether :meth:`decode_joining` runs a prompt inside a decode step (the Llama family; GPT-2 not yet)."""
        return callable(getattr(self.trunk, "decode_joining", None))

    def decode_joining(self, tokens: Int[Array, " B"], real: Array, cache: KVCache, joining: Joining):
        """One decode step that also runs a joining prompt (see ``LlamaModel.decode_joining``)."""
        if not self.supports_joining:
            raise NotImplementedError(f"{type(self).__name__} cannot run a prompt inside a decode step")
        return self.trunk.decode_joining(tokens, real, cache, joining)

    def hidden_states(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        attention_mask: Array | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        branch_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """Final hidden states ``[B, T, D]`` (compute dtype) and the updated cache (None without one);
        arguments as :meth:`CausalLM.__call__`."""
        return self.trunk(tokens, positions=positions, attention_mask=attention_mask, segment_ids=segment_ids,
                          cache=cache, branch_ids=branch_ids)

    def logits(self, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        """Vocabulary logits in float32 (the matmul accumulates in float32 even for bf16 inputs)."""
        dtype = self.config.compute_jnp_dtype
        if self.lm_head is None:
            return vocab_logits(hidden, embedding=self.tied_embedding(), dtype=dtype)
        return vocab_logits(hidden, lm_head=self.lm_head, dtype=dtype)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        attention_mask: Array | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        branch_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T V"], KVCache | None]:
        """Next-token logits.

        Args:
            tokens: ``[B, T]`` token ids.
            positions: ``[B, T]`` positions; derived from ``attention_mask`` (and ``segment_ids`` / the
                cache) when None, so left-padded and right-padded batches both match transformers.
                Families with a learned position table (GPT-2) need them below ``max_position_embeddings``.
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; None means all real.
            segment_ids: ``[B, T]`` packed-sequence ids: tokens attend only within their segment and
                derived positions restart per segment. Not allowed with a cache.
            cache: a :class:`KVCache`; the tokens are written at ``cache.index`` and attend to every
                valid slot before them. Prefill a left-padded prompt, then feed one token per step.
            branch_ids: ``[B, T]`` a shared prefix (0) and continuations (1, 2, ...) that see the prefix and
                themselves, not each other (:mod:`jaxalign.models.masks`); derived positions continue from
                the prefix. Not allowed with a cache or a sliding window.

        Returns:
            ``(logits [B, T, V] float32, new_cache)``; ``new_cache`` is None when ``cache`` is None.
            Rows of padding hold finite values that mean nothing.

        Raises:
            ValueError: only when the inputs are concrete (not traced): a real token id outside
                ``[0, vocab_size)``, a position past a learned table, or a cache write past its
                ``max_length``. Inside ``jit`` the index is clipped instead (finite, wrong for that row),
                and the write offset clamped.
        """
        hidden, cache = self.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                           segment_ids=segment_ids, cache=cache, branch_ids=branch_ids)
        return self.logits(hidden), cache
