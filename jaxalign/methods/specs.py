"""Typed per-method options: the ``loss:`` section of a run config, one frozen dataclass per method.

``RunConfig`` (:mod:`jaxalign.methods.recipe`) turns its ``loss`` mapping into the method's spec when it is
built, so a misspelt key, a value of the wrong type or out of range is refused before any work, naming the
key; a key spelt the way TRL spells it (``cliprange``, ``num_ppo_epochs``, GRPO's ``beta``) is refused with
jaxalign's spelling. The YAML and ``key=value`` surface is unchanged: ``loss.beta=0.05``.

- ``sft``: :class:`SFTSpec` (:func:`jaxalign.methods.sft.sft_objective`)
- ``distill``: :class:`DistillSpec` (:func:`jaxalign.methods.distill.distill_objective`)
- ``reward``: :class:`RewardSpec` (:func:`jaxalign.methods.reward.reward_objective` and the reward head)
- ``dpo``: :class:`DPOSpec` (:func:`jaxalign.methods.dpo.dpo_objective`)
- ``kto``: :class:`KTOSpec` (:func:`jaxalign.methods.kto.kto_objective`)
- ``ppo``: :class:`PPOConfig` (:class:`jaxalign.methods.ppo.PPOTrainer`)
- ``grpo``: :class:`GRPOConfig` (:class:`jaxalign.methods.grpo.GRPOTrainer`)
- ``tfpo``: :class:`TFPOSpec` (:func:`jaxalign.methods.tfpo.tfpo_objective`); its ``doctor:`` section is a
  :class:`DoctorSpec`
- ``critique``: :class:`CritiqueSpec` (:mod:`jaxalign.methods.critique`)

A new method adds its spec here and one entry to :data:`LOSS_SPECS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxalign import losses
from jaxalign.models.scoring import DEFAULT_CHUNK

#: PPO's ``loss.critic``: a value model of its own, or a value head on the policy's trunk.
CRITICS = ("separate", "shared")
#: PPO's ``loss.reward_scaling``: scores as given, divided by their running std, or also less their running mean.
REWARD_SCALINGS = ("none", "running_std", "running_norm")
#: SFT's ``loss.average``: every completion token alike (TRL), or every example alike.
SFT_AVERAGES = ("token_mean", "sequence_mean")
#: SFT's ``loss.example_weights``: weigh each example by its record's score (or by nothing: null).
SFT_EXAMPLE_WEIGHTS = ("score",)
#: The reward model's ``loss.loss``: pairwise Bradley–Terry, best of n candidates, or regression on scores.
REWARD_LOSSES = ("bradley_terry", "best_of_n", "regression")
#: The reward model's ``loss.pooling``: the last real token's hidden state, or the mean over the mask.
REWARD_POOLINGS = ("last", "mean")


class MethodSpec:
    """What every spec shares: validation messages naming the field, and building from a config mapping
    (unknown keys refused with the known ones listed; a peer's spelling refused with ours)."""

    label: ClassVar[str] = ""  # the method's name in messages ("PPO")
    renamed: ClassVar[dict[str, str]] = {}  # a peer's (or an earlier) spelling -> this spec's
    # A peer's option that is not a loss option here but another setting of the run: its name -> that setting.
    elsewhere: ClassVar[dict[str, str]] = {}

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"loss.{name} ({type(self).__name__}) must be {what}, got {getattr(self, name)!r}")

    def _require_passes(self) -> None:
        for name in ("epochs", "num_minibatches"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                          "a positive int")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "loss"):
        """The spec of a ``loss:`` section; a renamed key is named with its new name, an unknown key raises
        ``ValueError`` naming it under ``where``."""
        known = [f.name for f in dataclasses.fields(cls)]
        renamed = sorted(name for name in values if name not in known and name in cls.renamed)
        if renamed:
            hints = ", ".join(f"{where}.{name} is {where}.{cls.renamed[name]} here" for name in renamed)
            raise ValueError(f"{where}: {cls.label} option(s) {renamed} renamed: {hints}")
        moved = sorted(name for name in values if name not in known and name in cls.elsewhere)
        if moved:
            hints = ", ".join(f"{where}.{name} is {cls.elsewhere[name]} here" for name in moved)
            raise ValueError(f"{where}: {moved} {'is not a' if len(moved) == 1 else 'are not'} {cls.label} loss "
                             f"option{'' if len(moved) == 1 else 's'}: {hints}")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown {cls.label} option(s) {unknown} (known: {', '.join(known)})")
        return cls(**values)

    def options(self) -> dict[str, Any]:
        """The options given (the fields that are not None), as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclasses.dataclass(frozen=True)
class ContrastiveSpec:
    """The ``loss.contrastive`` term of ``sft``, ``dpo`` and ``reward`` runs: InfoNCE over pooled final hidden
    states, from the step's own forward pass (:mod:`jaxalign.methods.contrastive`,
    :func:`jaxalign.losses.contrastive_loss`).

    Attributes:
        weight: the term's weight beside the method's loss (> 0).
        temperature: τ > 0 of the similarities (0.07).
        pooling: how a sequence becomes one vector: ``last`` (the hidden state of its last token: for a
            response its final token, for the prompt the last prompt token, which reads the whole prompt) or
            ``mean`` (the mean over its tokens).
        in_batch_negatives: the batch's other responses are negatives too (else only the pair's rejected one).
        projection: a trained linear projection head of this width in front of the similarities (SimCLR's
            projection head; dropped from the export); None: the pooled states themselves.
    """

    weight: float = 1.0
    temperature: float = 0.07
    pooling: str = "last"
    in_batch_negatives: bool = True
    projection: int | None = None

    def __post_init__(self):
        def require(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"loss.contrastive.{name} must be {what}, got {getattr(self, name)!r}")

        number = (int, float)
        require(isinstance(self.weight, number) and not isinstance(self.weight, bool) and self.weight > 0,
                "weight", "a number > 0")
        require(isinstance(self.temperature, number) and not isinstance(self.temperature, bool)
                and self.temperature > 0, "temperature", "a number > 0")
        require(self.pooling in losses.POOLINGS, "pooling", f"one of {losses.POOLINGS}")
        require(isinstance(self.in_batch_negatives, bool), "in_batch_negatives", "true or false")
        require(self.projection is None or (isinstance(self.projection, int) and not isinstance(self.projection, bool)
                                            and self.projection >= 1), "projection", "a positive int or null")

    @classmethod
    def from_value(cls, value: Any) -> ContrastiveSpec | None:
        """The spec of a ``loss.contrastive`` value: a mapping, a spec, or None (no term)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"loss.contrastive must be a mapping {{weight, temperature, pooling}} or null, got "
                             f"{value!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"loss.contrastive: unknown option(s) {unknown} (known: {', '.join(known)})")
        return cls(**value)


def _contrastive(spec) -> None:
    object.__setattr__(spec, "contrastive", ContrastiveSpec.from_value(spec.contrastive))


@dataclasses.dataclass(frozen=True)
class SFTSpec(MethodSpec):
    """SFT's options (:func:`jaxalign.methods.sft.sft_objective`).

    Attributes:
        label_smoothing: ε of the smoothed cross-entropy (transformers ``label_smoothing_factor``).
        average: ``token_mean`` (every completion token alike, TRL) or ``sequence_mean`` (every example alike).
        example_weights: ``score``: weigh each example by its record's score (ADLF's ``meta_eval_score``, a
            ``score`` field), the loss a weighted mean (:func:`jaxalign.methods.sft.sft_objective`); None: every
            example alike.
        contrastive: a contrastive term (:class:`ContrastiveSpec`): each prompt's response against the batch's
            other responses; None: none.
    """

    label_smoothing: float = 0.0
    average: str = "token_mean"
    example_weights: str | None = None
    contrastive: ContrastiveSpec | None = None

    label = "SFT"
    renamed = {"label_smoothing_factor": "label_smoothing"}

    def __post_init__(self):
        _contrastive(self)
        self._require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
        self._require(self.average in SFT_AVERAGES, "average", f"one of {SFT_AVERAGES}")
        self._require(self.example_weights is None or self.example_weights in SFT_EXAMPLE_WEIGHTS, "example_weights",
                      f"one of {SFT_EXAMPLE_WEIGHTS} or null")


@dataclasses.dataclass(frozen=True)
class DistillSpec(MethodSpec):
    """Token-level distillation's options (:func:`jaxalign.methods.distill.distill_objective`, TRL's
    ``GKDConfig``); the teacher is the run's top-level ``teacher`` key.

    Attributes:
        beta: β of the generalized JSD in ``[0, 1]`` (:func:`jaxalign.losses.generalized_jsd_loss`): 0 is
            KL(teacher ‖ student), 1 is KL(student ‖ teacher), 0.5 (TRL's default) the Jensen-Shannon divergence.
        temperature: τ > 0 dividing both models' logits inside the loss (TRL's trainer calls the loss at 1;
            its ``GKDConfig.temperature`` is the on-policy *sampling* temperature, which does not apply here).
        lmbda: TRL's fraction of on-policy (student-sampled) batches; only 0 is implemented: the completions
            are the data's.
        chunk_size: completion positions per chunk of the two LM heads (memory: one chunk's ``[N, c, V]``
            logits of each model are alive at once); None: all at once.
    """

    beta: float = 0.5
    temperature: float = 1.0
    lmbda: float = 0.0
    chunk_size: int | None = DEFAULT_CHUNK

    label = "distill"
    elsewhere = {"teacher": "the top-level key teacher", "teacher_model_name_or_path": "the top-level key teacher",
                 "seq_kd": "`jaxalign train sft` on completions the teacher sampled (sequence-level distillation)"}

    def __post_init__(self):
        require = self._require
        require(0.0 <= self.beta <= 1.0, "beta", "in [0, 1] (0: KL(teacher || student), 1: KL(student || teacher))")
        require(self.temperature > 0, "temperature", "> 0")
        require(self.lmbda == 0, "lmbda", "0: on-policy distillation (TRL's lmbda > 0, training on the student's own "
                "samples) is not implemented; distill trains on the data's completions")
        require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", ">= 1 or null")

    def objective_options(self) -> dict[str, Any]:
        """The options :func:`~jaxalign.methods.distill.distill_objective` takes (``lmbda`` is always 0)."""
        options = dataclasses.asdict(self)
        options.pop("lmbda")
        return options


@dataclasses.dataclass(frozen=True)
class RewardSpec(MethodSpec):
    """Reward-model options (:func:`jaxalign.methods.reward.reward_objective` and the reward head).

    Attributes:
        loss: ``bradley_terry`` (pairs, groups), ``best_of_n`` or ``regression`` (scored records: each
            conversation's score, e.g. ADLF's ``meta_eval_score``); None: by the data (best-of-N records train
            ``best_of_n``, pairs ``bradley_terry``, scored records ``regression``).
        regression: ``regression``'s loss: ``mse`` (the default) or ``gaussian_nll`` (the head also predicts each
            score's log-variance: :func:`jaxalign.losses.regression_loss`).
        normalize_scores: ``regression`` fits ``(score − mean) / std`` of the training scores (the default), and
            the saved model maps its output back to the scores' scale; false fits the raw scores.
        use_margin, margin_scale: subtract ``margin_scale × margin`` inside the sigmoid (Llama 2's margin loss).
        center_coef: ``center_coef·(r⁺ + r⁻)²`` (TRL ``center_rewards_coefficient``).
        dimension_weights: grouped data: the weight of each dimension's loss (and the export's default
            combination); None: 1 each.
        num_objectives: heads (one per dimension of grouped data); None: from the data.
        pooling: the sequence state the head reads: ``last`` (TRL) or ``mean``.
        shared_prompt: pairs run each prompt once for both responses (as DPO's ``shared_prompt``; exact, on by
            default; pairs only, and not with ``freeze_backbone``, whose probe pools each sequence on its own).
    """

    loss: str | None = None
    regression: str | None = None
    normalize_scores: bool | None = None
    use_margin: bool = False
    margin_scale: float = 1.0
    center_coef: float = 0.0
    dimension_weights: tuple[float, ...] | None = None
    num_objectives: int | None = None
    pooling: str = "last"
    shared_prompt: bool = True
    contrastive: ContrastiveSpec | None = None

    label = "reward"
    renamed = {"center_rewards_coefficient": "center_coef"}

    def __post_init__(self):
        _contrastive(self)
        if self.dimension_weights is not None:
            object.__setattr__(self, "dimension_weights", tuple(self.dimension_weights))
        self._require(self.loss is None or self.loss in REWARD_LOSSES, "loss", f"one of {REWARD_LOSSES} or null")
        self._require(self.regression is None or self.regression in losses.REGRESSION_LOSSES, "regression",
                      f"one of {losses.REGRESSION_LOSSES} or null")
        self._require(self.normalize_scores is None or isinstance(self.normalize_scores, bool), "normalize_scores",
                      "true, false or null")
        regression_only = [name for name in ("regression", "normalize_scores") if getattr(self, name) is not None]
        pairs_only = [name for name, default in (("use_margin", False), ("margin_scale", 1.0), ("center_coef", 0.0),
                                                 ("dimension_weights", None), ("num_objectives", None))
                      if getattr(self, name) != default]
        if self.loss not in (None, "regression") and regression_only:
            self._require(False, regression_only[0], f"left unset: it applies to loss: regression, not {self.loss}")
        if self.loss == "regression" and pairs_only:
            self._require(False, pairs_only[0], "left at its default: it applies to preference losses, not to "
                          "loss: regression")
        self._require(self.center_coef >= 0, "center_coef", ">= 0")
        self._require(self.num_objectives is None or self.num_objectives >= 1, "num_objectives", ">= 1 or null")
        self._require(self.pooling in REWARD_POOLINGS, "pooling", f"one of {REWARD_POOLINGS}")
        self._require(isinstance(self.shared_prompt, bool), "shared_prompt", "true or false")

    def objective_options(self) -> dict[str, Any]:
        """The options :func:`~jaxalign.methods.reward.reward_objective` takes (not the head's, the layout's or
        the score normalisation's, which the method fits on the data)."""
        return {name: value for name, value in self.options().items()
                if name not in ("num_objectives", "pooling", "shared_prompt", "normalize_scores", "contrastive")}


@dataclasses.dataclass(frozen=True)
class DPOSpec(MethodSpec):
    """DPO-family options (:func:`jaxalign.methods.dpo.dpo_objective`). None leaves an option to the loss's
    default (``beta`` 0.1 for DPO/ORPO, 2.0 for SimPO); an option the chosen loss does not take is refused
    when the objective is built, naming the loss.

    Attributes:
        loss_type: one of :data:`jaxalign.losses.DPO_LOSS_TYPES`, ``simpo``, ``orpo``, ``genarm`` (GenARM's
            autoregressive reward model: :func:`jaxalign.losses.genarm_loss`, with ``reference: none``), or a list
            (a weighted mixture with ``loss_weights``; ``sft`` in the list adds the chosen NLL, TRL's RPO spelling).
        beta, label_smoothing, loss_weights, discopop_tau, f_divergence, f_alpha, rpo_alpha: DPO's
            (:func:`jaxalign.losses.dpo_loss`).
        gamma, gamma_beta_ratio, alpha, sft_weight: SimPO's (:func:`jaxalign.losses.simpo_loss`).
        chunk_size: positions per LM-head chunk; None: the default.
        shared_prompt: run each pair's prompt once for both completions (one row ``[prompt, chosen, rejected]``,
            the completions blind to each other: :mod:`jaxalign.data.layouts`), for the policy and the
            reference alike. Exact (same log-probs, loss and gradients), so on by default; false batches each
            side with its own copy of the prompt, as TRL does. Models with a sliding window never share.
        contrastive: a contrastive term (:class:`ContrastiveSpec`): each prompt's chosen response against its
            rejected one and the batch's other responses; None: none.
    """

    loss_type: str | tuple[str, ...] = "sigmoid"
    beta: float | None = None
    label_smoothing: float | None = None
    loss_weights: tuple[float, ...] | None = None
    discopop_tau: float | None = None
    f_divergence: str | None = None
    f_alpha: float | None = None
    rpo_alpha: float | None = None
    gamma: float | None = None
    gamma_beta_ratio: float | None = None
    alpha: float | None = None
    sft_weight: float | None = None
    chunk_size: int | None = None
    shared_prompt: bool = True
    contrastive: ContrastiveSpec | None = None

    label = "DPO"
    renamed = {"loss_types": "loss_type", "simpo_gamma": "gamma", "cpo_alpha": "alpha"}

    def __post_init__(self):
        _contrastive(self)
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        self._require(self.beta is None or self.beta > 0, "beta", "> 0 or null")
        self._require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", ">= 1 or null")
        self._require(isinstance(self.shared_prompt, bool), "shared_prompt", "true or false")

    def objective_options(self) -> dict[str, Any]:
        """The options :func:`~jaxalign.methods.dpo.dpo_objective` takes (not the batch layout's)."""
        options = self.options()
        options.pop("shared_prompt")
        options.pop("contrastive", None)
        return options

    def options(self) -> dict[str, Any]:
        options = super().options()
        for name in ("loss_type", "loss_weights"):
            if isinstance(options.get(name), tuple):
                options[name] = list(options[name])
        return options


@dataclasses.dataclass(frozen=True)
class KTOSpec(MethodSpec):
    """KTO's options (:func:`jaxalign.methods.kto.kto_objective`, :func:`jaxalign.losses.kto_loss`); the
    defaults and names are TRL 1.16 ``KTOConfig``'s.

    Attributes:
        loss_type: ``kto`` (the paper's loss, with the KL reference point z₀ estimated on mismatched pairs of
            the batch) or ``apo_zero_unpaired`` (no reference point): :data:`jaxalign.losses.KTO_LOSS_TYPES`.
        beta: β > 0, the scale of the implied reward ``β·(log π − log π_ref)``.
        desirable_weight, undesirable_weight: λ_D and λ_U, the weights of the desirable and undesirable
            examples' losses (>= 0, not both 0); the paper's Eq. 8 keeps ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3].
        chunk_size: positions per LM-head chunk; None: the whole sequence at once.
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    chunk_size: int | None = DEFAULT_CHUNK

    label = "KTO"
    renamed = {"loss_types": "loss_type"}
    elsewhere = {"precompute_ref_log_probs": "the run setting reference=precomputed",
                 "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length",
                 "truncation_mode": "data.truncation", "learning_rate": "train.optimizer.learning_rate",
                 "per_device_train_batch_size": "data.batch_size"}

    def __post_init__(self):
        require = self._require
        require(isinstance(self.loss_type, str) and self.loss_type in losses.KTO_LOSS_TYPES, "loss_type",
                f"one of {losses.KTO_LOSS_TYPES}")
        require(self.beta > 0, "beta", "> 0")
        require(self.desirable_weight >= 0, "desirable_weight", ">= 0")
        require(self.undesirable_weight >= 0, "undesirable_weight", ">= 0")
        require(self.desirable_weight + self.undesirable_weight > 0, "undesirable_weight",
                "> 0 when desirable_weight is 0 (both 0 train nothing)")
        require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", ">= 1 or null")


@dataclasses.dataclass(frozen=True)
class PPOConfig(MethodSpec):
    """PPO's hyperparameters (defaults: ``trl.experimental.ppo.PPOConfig`` where it has the option).

    Attributes:
        epochs: passes over each iteration's rollouts (TRL ``num_ppo_epochs``, 4).
        num_minibatches: minibatches per pass (TRL ``num_mini_batches``, 1).
        clip_eps: policy ratio clip ε (TRL ``cliprange``); ``clip_eps_high`` an asymmetric upper ε;
            ``dual_clip`` the dual-clip bound c > 1.
        value_clip_eps: value clip (TRL ``cliprange_value``); None disables it.
        vf_coef: weight of the value loss (TRL 0.1).
        gamma, lam: GAE discount and λ (TRL 1.0, 0.95).
        kl_coef: β of the per-token KL penalty (TRL 0.05); the initial β when ``kl_target`` is set.
        kl_estimator: ``k1``, ``k2``, ``k3`` or ``abs`` (:func:`jaxalign.losses.kl_estimate`; TRL "k1").
        kl_target, kl_horizon: the adaptive controller (Ziegler et al. 2019, TRL 0.11 ``target``/
            ``horizon``: 6, 10000 there); None keeps β fixed.
        missing_eos_penalty: subtracted from the score of responses without an EOS (TRL option).
        reward_clip: clip the sequence score to ``[−c, c]`` (TRL 0.11 ``score_clip``).
        reward_scaling: ``none``; ``running_std`` divides scores by the running std of all scores so far
            (TRL 0.11 ``use_score_scaling``); ``running_norm`` also subtracts the running mean
            (``use_score_norm``).
        whiten_rewards: whiten the shaped per-token rewards before GAE (TRL ``whiten_rewards``).
        whiten_advantages: whiten the advantages over the batch (TRL always does).
        target_kl: stop an iteration's passes when the approximate KL ``mean(old − new)`` exceeds
            ``1.5 × target_kl`` (TRL 0.11 ``early_stopping``); None never stops early.
        critic: ``separate`` (its own trunk, initialised from the policy) or ``shared`` (a value head on the
            policy's trunk).
        critic_lr_scale: the critic's learning rate (value head and separate critic) as a multiple of the
            policy's (OpenRLHF's separate ``critic_learning_rate``; TRL uses one rate). A fresh value head on a
            pretrained policy often needs a higher one.
        chunk_size: positions per LM-head chunk (memory; see ``jaxalign.models.scoring.head_logps``).
    """

    epochs: int = 4
    num_minibatches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    missing_eos_penalty: float | None = None
    reward_clip: float | None = None
    reward_scaling: str = "none"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    target_kl: float | None = None
    critic: str = "separate"
    critic_lr_scale: float = 1.0
    chunk_size: int | None = DEFAULT_CHUNK

    label = "PPO"
    renamed = {"num_ppo_epochs": "epochs", "ppo_epochs": "epochs", "num_mini_batches": "num_minibatches",
               "cliprange": "clip_eps", "cliprange_value": "value_clip_eps", "init_kl_coef": "kl_coef",
               "kl_penalty": "kl_estimator", "target": "kl_target", "horizon": "kl_horizon",
               "score_clip": "reward_clip", "early_stopping": "target_kl"}

    def __post_init__(self):
        require = self._require
        self._require_passes()
        require(self.clip_eps > 0, "clip_eps", "> 0")
        require(self.vf_coef >= 0, "vf_coef", ">= 0")
        require(0 <= self.gamma <= 1, "gamma", "in [0, 1]")
        require(0 <= self.lam <= 1, "lam", "in [0, 1]")
        require(self.kl_coef >= 0, "kl_coef", ">= 0")
        require(self.kl_estimator in losses.KL_ESTIMATORS, "kl_estimator", f"one of {losses.KL_ESTIMATORS}")
        require(self.kl_target is None or self.kl_target > 0, "kl_target", "> 0 or null")
        require(self.kl_horizon > 0, "kl_horizon", "> 0")
        require(self.reward_clip is None or self.reward_clip > 0, "reward_clip", "> 0 or null")
        require(self.reward_scaling in REWARD_SCALINGS, "reward_scaling", f"one of {REWARD_SCALINGS}")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "> 0 or null")
        require(self.critic in CRITICS, "critic", f"one of {CRITICS}")
        require(self.critic_lr_scale >= 0, "critic_lr_scale", ">= 0")
        require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "> 1 or null")
        require(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", "> 0 or null")
        require(self.value_clip_eps is None or self.value_clip_eps > 0, "value_clip_eps", "> 0 or null")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(MethodSpec):
    """GRPO's hyperparameters (defaults: TRL 1.16 ``GRPOConfig``).

    Attributes:
        epochs: passes over each generation batch (GRPO's μ, TRL ``num_iterations``, 1).
        num_minibatches: minibatches per pass (TRL ``steps_per_generation``). Rows are shuffled one by one
            (as TRL), so a group's responses may land in different minibatches; their advantages were computed
            over the whole group before, so the loss does not depend on it.
        minibatch_groups: shuffle whole groups instead (each minibatch holds all ``G`` responses of
            ``prompts / num_minibatches`` prompts), so that ``shared_prompt`` applies with ``num_minibatches > 1``.
            A deviation from TRL, off by default: a minibatch then holds fewer prompts (with all their responses)
            than a row-shuffled one. With one minibatch a pass it changes nothing.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (TRL's default), see the module docstring.
        scale: advantage scaling ``group``, ``batch`` or ``none`` (TRL ``scale_rewards``).
        clip_eps: ε (TRL ``epsilon``, 0.2); ``clip_eps_high`` DAPO's upper ε (0.28 in the paper).
        delta: two-sided GRPO's upper bound on the ratio (TRL ``delta``).
        kl_coef: β of the k3 KL to the reference (TRL ``beta``, 0).
        importance_sampling_level: ``token`` or ``sequence`` (GSPO).
        eps: added to the std of the advantage scaling (TRL 1e-4).
        chunk_size: positions per LM-head chunk.
        shared_prompt: run each group's prompt once for its ``G`` responses (one row ``[prompt, response 1,
            ..., response G]``, :mod:`jaxalign.methods.groups`) in the scoring pass and the update; exact, on by
            default (TRL runs the prompt once per response). Only where exact and in whole groups: with
            ``num_minibatches > 1`` only under ``minibatch_groups`` (rows are otherwise shuffled one by one), and
            not for a model with a sliding window.
    """

    epochs: int = 1
    num_minibatches: int = 1
    loss_type: str = "dapo"
    scale: str = "group"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    delta: float | None = None
    kl_coef: float = 0.0
    importance_sampling_level: str = "token"
    eps: float = 1e-4
    chunk_size: int | None = DEFAULT_CHUNK
    shared_prompt: bool = True
    minibatch_groups: bool = False

    label = "GRPO"
    renamed = {"num_iterations": "epochs", "steps_per_generation": "num_minibatches", "epsilon": "clip_eps",
               "epsilon_high": "clip_eps_high", "beta": "kl_coef", "scale_rewards": "scale"}

    def __post_init__(self):
        require = self._require
        self._require_passes()
        require(self.loss_type in losses.TRL_LOSS_TYPES, "loss_type", f"one of {tuple(losses.TRL_LOSS_TYPES)}")
        require(self.scale in losses.ADVANTAGE_SCALES, "scale", f"one of {losses.ADVANTAGE_SCALES}")
        require(self.clip_eps > 0, "clip_eps", "> 0")
        require(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", "> 0 or null")
        require(self.kl_coef >= 0, "kl_coef", ">= 0")
        require(self.delta is None or self.delta > 1, "delta", "> 1 or null")
        require(self.eps >= 0, "eps", ">= 0")
        require(self.importance_sampling_level in losses.IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
                f"one of {losses.IMPORTANCE_SAMPLING_LEVELS}")
        require(isinstance(self.shared_prompt, bool), "shared_prompt", "true or false")
        require(isinstance(self.minibatch_groups, bool), "minibatch_groups", "true or false")


#: TFPO's ``loss.value_states``: compare the two responses' values after the first token where they differ, or
#: after each response's first token.
VALUE_STATES = ("divergence", "first")


@dataclasses.dataclass(frozen=True)
class TFPOSpec(MethodSpec):
    """TFPO's options (:func:`jaxalign.methods.tfpo.tfpo_objective`, :func:`jaxalign.losses.tfpo_loss`).

    Attributes:
        lam: SubTB(λ) weight of a subtrajectory of length k (``λ^k``); None: the plain mean over all pairs of
            states (the paper's sum, normalised per trajectory).
        lam_value: λ of the value-discrimination term (the paper's λ).
        gamma: its margin γ.
        value_states: where ``V(s_t, y_w)`` and ``V(s_t, y_l)`` are compared: ``divergence`` (the state after
            the first token where the two responses differ, the paper's common prefix) or ``first`` (after each
            response's first token).
        anchor_terminal: pin ``V = 1`` at each response's last state, so the flow into a complete response is
            its reward (see :func:`jaxalign.losses.log_flows`).
        reward_scale: the token rewards are multiplied by this before ``Q(s_t) = exp(Σ r)``: the temperature of
            the reward the doctor learns to sample in proportion to.
        value_hinge: ``value`` (the paper's hinge on ``V``) or ``log_value`` (on ``log V``: needed once the
            value head is started at balance, ``doctor.value_init: fit``, where ``V`` overflows float32).
        prior: ``none`` (the paper: the doctor learns ``π̂ ∝ exp(Σ r)``) or ``start`` (our option: the doctor's
            starting model, frozen, is a prior ``π₀`` and the doctor learns ``π̂ ∝ π₀·exp(Σ r)``; its log-probs
            of the training responses are computed once before training; see
            :func:`jaxalign.losses.tfpo_loss`).
        chunk_size: positions per LM-head chunk.
    """

    lam: float | None = None
    lam_value: float = 1.0
    gamma: float = 0.1
    value_states: str = "divergence"
    anchor_terminal: bool = True
    reward_scale: float = 1.0
    value_hinge: str = "value"
    prior: str = "none"
    chunk_size: int | None = DEFAULT_CHUNK

    label = "TFPO"
    renamed = {"lambda": "lam_value", "margin": "gamma"}

    def __post_init__(self):
        require = self._require
        require(self.lam is None or self.lam > 0, "lam", "> 0 or null")
        require(self.lam_value >= 0, "lam_value", ">= 0")
        require(self.gamma >= 0, "gamma", ">= 0")
        require(self.value_states in VALUE_STATES, "value_states", f"one of {VALUE_STATES}")
        require(self.reward_scale > 0, "reward_scale", "> 0")
        require(self.value_hinge in ("value", "log_value"), "value_hinge", "one of ('value', 'log_value')")
        require(self.prior in ("none", "start"), "prior", "one of ('none', 'start')")
        require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", ">= 1 or null")


@dataclasses.dataclass(frozen=True)
class DoctorSpec:
    """The ``doctor:`` section of a ``tfpo`` run: the patient, the dimensions and how their token rewards are made.

    The run's ``model`` is the doctor's starting point (one doctor per dimension, each trained from it).

    Attributes:
        patient: the frozen patient (a checkpoint directory or ``.gguf``; None: the embedded SmolLM2-135M-Instruct).
            It must share the doctor's tokenizer.
        dimensions: the preference dimensions, one doctor each. With grouped data (PKU-SafeRLHF) each dimension
            trains on its own pairs (``data.dimension``); with plain pairs every dimension reads the same pairs
            through its own faces.
        faces: per-dimension ``{positive: TEXT, negative: TEXT}`` system prompts; dimensions not given use the
            defaults of :data:`jaxalign.methods.faces.DEFAULT_FACES`.
        face_format: ``auto``, ``chat`` (a system turn of the chat template) or ``text`` (a plain line).
        eps, tau, threshold: the token importance's ε and τ and the sparse reward's θ (the paper's θ = 0.1).
        init_layers: start the doctor from the first ``init_layers`` layers of ``model`` (with its embeddings,
            norm and head: :func:`jaxalign.models.first_layers`), a doctor several times cheaper per token;
            None: the whole model.
        rewards_batch_size: pairs per batch of the token-reward pass (None: ``data.batch_size``).
        value_lr_scale: the value head's learning rate as a multiple of the doctor's (PPO's ``critic_lr_scale``).
            The head starts at ``log V = 0`` while subtrajectory balance asks ``log V(s_t)`` for the rest of the
            response's ``Σ (r − log π̂)``, tens of nats; at the policy's rate it barely moves in a short run and
            the balance residual is left to the policy, which then raises the log-probability of every training
            token, chosen or rejected, instead of following the rewards.
        value_init: the value head's start: ``zero`` (``log V = 0`` everywhere) or ``fit`` (least squares of the
            head on the starting doctor's hidden states against the log values that balance each training
            response under the starting policy, :func:`jaxalign.methods.tfpo.fit_value_head`; one forward pass
            over the pairs). With ``fit`` set ``loss.value_hinge: log_value``.
    """

    patient: str | None = None
    dimensions: tuple[str, ...] = ("helpfulness",)
    faces: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    face_format: str = "auto"
    eps: float = 1e-8
    tau: float = 1.0
    threshold: float = 0.1
    init_layers: int | None = None
    rewards_batch_size: int | None = None
    value_lr_scale: float = 1.0
    value_init: str = "zero"

    def __post_init__(self):
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        object.__setattr__(self, "faces", {name: dict(face) if isinstance(face, Mapping) else face
                                           for name, face in dict(self.faces).items()})
        if not self.dimensions or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"doctor.dimensions must name one or more distinct dimensions, got "
                             f"{list(self.dimensions)}")
        if self.init_layers is not None and (isinstance(self.init_layers, bool) or self.init_layers < 1):
            raise ValueError(f"doctor.init_layers must be a positive int or null, got {self.init_layers!r}")
        if self.rewards_batch_size is not None and self.rewards_batch_size < 1:
            raise ValueError(f"doctor.rewards_batch_size must be >= 1 or null, got {self.rewards_batch_size!r}")
        if isinstance(self.value_lr_scale, bool) or not self.value_lr_scale >= 0:
            raise ValueError(f"doctor.value_lr_scale must be a number >= 0, got {self.value_lr_scale!r}")
        if self.value_init not in ("zero", "fit"):
            raise ValueError(f"doctor.value_init must be 'zero' or 'fit', got {self.value_init!r}")
        from jaxalign.methods.faces import FACE_FORMATS

        if self.face_format not in FACE_FORMATS:
            raise ValueError(f"doctor.face_format must be one of {FACE_FORMATS}, got {self.face_format!r}")
        self.settings()  # ε, τ, θ checked now
        self.resolved_faces()  # every dimension has a face

    def settings(self):
        """The token-reward settings (ε, τ, θ) as :class:`jaxalign.methods.token_rewards.RewardSettings`."""
        from jaxalign.methods.token_rewards import RewardSettings

        return RewardSettings(eps=self.eps, tau=self.tau, threshold=self.threshold)

    def resolved_faces(self):
        """The positive and negative face of every dimension: ``faces`` where given, else the built-in ones."""
        from jaxalign.methods.faces import resolve_faces

        return resolve_faces(self.dimensions, self.faces)


_REVISION_TARGETS = ("preferred", "all")


@dataclasses.dataclass(frozen=True)
class CritiqueSpec(MethodSpec):
    """Self-critique training's options (:mod:`jaxalign.methods.critique`): answer, critique against principles,
    revise; the revisions train SFT, (revision, answer) pairs the judge decides train DPO.

    Attributes:
        principles: what a critique checks the answer against (Constitutional AI's constitution), one string each.
        use_score_reason: a record's ``score_reason`` (ADLF), where it has one, is what its critique checks
            instead of ``principles``.
        critique_weight: the weight of the critiques' own SFT loss (teaching the model to write the critique)
            beside the revisions' (weight 1); 0 trains no critique.
        max_answer_tokens: the most tokens of an answer and of a revision.
        max_critique_tokens: the most tokens of a critique; one that has not ended by then is capped, counted,
            and neither trained on nor revised from.
        temperature: sampling temperature of the three generations (0: greedy).
        generation_batch_size: prompts per generation batch.
        revision_target: ``preferred`` (a revision becomes an SFT target only when the judge scores it above the
            first answer) or ``all`` (every finished revision, as Constitutional AI's supervised stage).
        preference_pairs: after SFT, DPO on the (revision, answer) pairs where the judge prefers the revision.
        beta: that DPO stage's β.
        shown_rows: rows printed at the end of generation (all are written to ``critique_rows.jsonl``).
    """

    principles: tuple[str, ...] = ()
    use_score_reason: bool = True
    critique_weight: float = 0.5
    max_answer_tokens: int = 64
    max_critique_tokens: int = 96
    temperature: float = 0.7
    generation_batch_size: int = 16
    revision_target: str = "preferred"
    preference_pairs: bool = True
    beta: float = 0.1
    shown_rows: int = 3

    label = "critique"
    renamed = {"constitution": "principles"}

    def __post_init__(self):
        require = self._require
        if isinstance(self.principles, str):
            require(False, "principles", "a list of strings (one principle each)")
        object.__setattr__(self, "principles", tuple(self.principles))
        require(all(isinstance(p, str) and p.strip() for p in self.principles), "principles",
                "a list of non-empty strings")
        require(bool(self.principles) or self.use_score_reason is True, "principles",
                "a non-empty list when loss.use_score_reason is false (the critique needs something to check)")
        require(isinstance(self.use_score_reason, bool), "use_score_reason", "true or false")
        require(self.critique_weight >= 0, "critique_weight", ">= 0")
        for name in ("max_answer_tokens", "max_critique_tokens", "generation_batch_size", "shown_rows"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= (name != "shown_rows"),
                    name, "a positive int" if name != "shown_rows" else "an int >= 0")
        require(self.temperature >= 0, "temperature", ">= 0")
        require(self.revision_target in _REVISION_TARGETS, "revision_target", f"one of {_REVISION_TARGETS}")
        require(isinstance(self.preference_pairs, bool), "preference_pairs", "true or false")
        require(self.beta > 0, "beta", "> 0")


#: The spec of each method's ``loss:`` section.
LOSS_SPECS: dict[str, type[MethodSpec]] = {"sft": SFTSpec, "distill": DistillSpec, "reward": RewardSpec,
                                           "dpo": DPOSpec, "kto": KTOSpec, "ppo": PPOConfig, "grpo": GRPOConfig,
                                           "tfpo": TFPOSpec, "critique": CritiqueSpec}
