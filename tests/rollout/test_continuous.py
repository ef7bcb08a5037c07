"""``ContinuousEngine``: rows that join and leave between compiled steps get what ``Sampler`` gives them (the same
greedy tokens, base-model log-probabilities to 1e-5, guided mixtures), seeded rows draw the same tokens whatever
runs beside them, the relayouts (batch growth and shrinking, left and right shifts, cache-length changes) change
no token, ``warm_up`` compiles ahead, and every misuse is a clear ValueError.

Most engines here have ``max_model_len`` 40 and ``slack`` 8 (a cache of 48 columns), so the engines of different
tests share their compiled programs and short runs reach the shifts.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import LlamaForCausalLM
from jaxalign.rollout import Sampler, SamplingParams, continuous
from jaxalign.rollout.continuous import ContinuousEngine, RowSettings
from tests.rollout.conftest import PROMPTS as SHORT_PROMPTS
from tests.rollout.conftest import N, V, count_engine_compilations
from tests.rollout.driving import Join, drive, tokens_of

MAX_MODEL_LEN, SLACK = 40, 8
MAX_BATCH = 8
# Prompts of 2 to 35 tokens: length buckets 24, 32 and 48 columns (the last is the whole cache).
LENGTHS = (3, 7, 5, 20, 11, 30, 2, 35)
PROMPTS = [[int(t) for t in np.random.default_rng(10 + i).integers(0, V, size=n)] for i, n in enumerate(LENGTHS)]
N_REF = 30
GREEDY = RowSettings(temperature=0.0)
LOGP_TOL = 1e-5


@pytest.fixture(scope="module")
def model(llama):
    return llama[0]


@pytest.fixture(scope="module")
def reference(sampler):
    """``Sampler.generate`` greedy: ``(tokens [8, N_REF], model_logps [8, N_REF])`` of ``PROMPTS``."""
    out = sampler.generate(PROMPTS, key=jax.random.key(0),
                           params=SamplingParams(max_new_tokens=N_REF, temperature=0.0, stop_token_ids=()))
    return np.asarray(out.tokens), np.asarray(out.model_logps)


def make_engine(model, *, guides=(), max_batch=MAX_BATCH) -> ContinuousEngine:
    return ContinuousEngine(model, guides=guides, max_batch=max_batch, max_model_len=MAX_MODEL_LEN, slack=SLACK)


def assert_greedy_reference(outs: dict, rows: dict, reference) -> None:
    """``rows``: ``{row_id: index into PROMPTS}``; every row's tokens and log-probs are the Sampler's."""
    ref_tokens, ref_logps = reference
    for row_id, index in rows.items():
        got = tokens_of(outs, row_id)
        assert got == list(ref_tokens[index, :len(got)]), f"row {row_id!r} (prompt {index})"
        np.testing.assert_allclose([out.logprob for out in outs[row_id]], ref_logps[index, :len(got)],
                                   atol=LOGP_TOL, err_msg=f"row {row_id!r}")


@dataclasses.dataclass
class Move:
    kind: str  # "grow", "shrink" (the batch), "left", "right" (the columns shift) or "resize"
    columns: tuple[int, int]  # the cache length before and after


class Moves(list):
    @property
    def kinds(self) -> list[str]:
        return [move.kind for move in self]


def record_moves(engine: ContinuousEngine) -> Moves:
    """Wrap the engine's relayout to record each one."""
    moves = Moves()
    move = engine._move

    def recording(sources, *, shift, rows, **options):
        before = engine.batch_bucket
        if rows != before:
            kind = "grow" if rows > before else "shrink"
        else:
            kind = "left" if shift > 0 else "right" if shift < 0 else "resize"
        columns = engine._caches[0].max_length
        moves.append(Move(kind, (columns, options.get("columns") or columns)))
        move(sources, shift=shift, rows=rows, **options)

    engine._move = recording
    return moves


# --- greedy rows are the Sampler's ------------------------------------------------------------------------


def test_staggered_greedy_rows_equal_sampler_generate(model, reference):
    engine = make_engine(model)
    top = RowSettings(temperature=0.0, top_logprobs=3)
    joins = [Join(3 * i, PROMPTS[i], {i: top if i % 2 else GREEDY}, 12) for i in range(5)]
    outs = drive(engine, joins)
    assert_greedy_reference(outs, {i: i for i in range(5)}, reference)
    for i in range(5):
        for out in outs[i]:
            if i % 2:  # the 3 most likely tokens under the base model, the greedy token first
                ids, values = out.top
                assert len(ids) == 3 and ids[0] == out.token and values[0] == pytest.approx(out.logprob, abs=1e-6)
                assert list(values) == sorted(values, reverse=True)
            else:
                assert out.top is None
    assert engine.live == 0


def test_prompts_prefilled_together_equal_prefilled_alone(model, reference):
    engine = make_engine(model)
    together = engine.prefill_many(PROMPTS[:5])  # one call of 8 rows (all in the 24-column bucket)
    for prompt, grouped in zip(PROMPTS[:5], together):
        alone = engine.prefill(prompt)
        assert grouped.length == alone.length == len(prompt)
        np.testing.assert_allclose(np.asarray(grouped.logits), np.asarray(alone.logits), atol=LOGP_TOL)
    outs = drive(engine, [Join(0, PROMPTS[i], {i: GREEDY}, 10) for i in range(5)])
    assert_greedy_reference(outs, {i: i for i in range(5)}, reference)


def test_a_lone_long_prompt_is_prefilled_in_one_row_as_it_is_in_company(model, reference, monkeypatch):
    # 35 tokens, the 48-column bucket: one row already gives products of more than 32 rows, so no padding row
    engine, rows = make_engine(model), []
    prefill = continuous._prefill

    def recording(states, heads, tokens, mask, **kwargs):
        rows.append(tokens.shape[0])
        return prefill(states, heads, tokens, mask, **kwargs)

    monkeypatch.setattr(continuous, "_prefill", recording)
    long, short = PROMPTS[7], PROMPTS[3]
    alone, lone_short = engine.prefill(long), engine.prefill(short)
    grouped = engine.prefill_many([long, SHORT_PROMPTS[0] * 12])[0]  # beside another 48-column prompt
    assert rows == [1, 2, 2], "a lone prompt of 24 columns still gets its padding row"
    assert lone_short.length == len(short) and alone.length == grouped.length == len(long)
    np.testing.assert_allclose(np.asarray(alone.logits), np.asarray(grouped.logits), atol=LOGP_TOL)
    for a, b in zip(jax.tree.leaves(alone.caches), jax.tree.leaves(grouped.caches), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=LOGP_TOL)
    assert_greedy_reference(drive(engine, [Join(0, long, {7: GREEDY}, 3)]), {7: 7}, reference)


def test_smollm2_prompts_prefilled_together_equal_prefilled_alone():
    """What docs/serving.md states for the embedded model: the same first-token logits alone or in a group, bit for
    bit on some CPUs and to about 1e-4 on others (XLA's CPU backend picks kernels by shape and processor: an AMD
    EPYC without AVX-512 gives differences of up to 7e-5 in logits of magnitude ~20), so the same greedy token."""
    import os

    from jaxalign.models import default_model_path, load_gguf

    try:
        path = default_model_path()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    smollm2, _ = load_gguf(path)
    engine = ContinuousEngine(smollm2, max_batch=4, max_model_len=64)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, smollm2.config.vocab_size, size=n)) for n in (17, 22, 24)]
    prompts += [list(rng.integers(0, smollm2.config.vocab_size, size=n)) for n in (33, 40)]  # alone: one row
    for grouped, prompt in zip(engine.prefill_many(prompts), prompts, strict=True):  # calls of 4 and 2 rows
        together, alone = np.asarray(grouped.logits), np.asarray(engine.prefill(prompt).logits)
        np.testing.assert_allclose(together, alone, atol=2e-4, rtol=0)
        assert int(np.argmax(together)) == int(np.argmax(alone))


# --- relayouts ------------------------------------------------------------------------------------------


def test_growing_and_shrinking_the_batch_keeps_the_tokens(model, reference):
    engine = make_engine(model)
    moves = record_moves(engine)
    # Five rows join one per step (2 -> 4 -> 8 slots); three leave after 8 tokens, and the two left fit a
    # quarter of the batch (8 -> 2 slots).
    joins = [Join(i, PROMPTS[i], {i: GREEDY}, 8 if i < 3 else 16) for i in range(5)]
    buckets = []
    step = engine.step

    def watched_step():
        buckets.append(engine.batch_bucket)
        return step()

    engine.step = watched_step
    outs = drive(engine, joins)
    assert_greedy_reference(outs, {i: i for i in range(5)}, reference)
    assert moves.kinds == ["grow", "grow", "shrink"], moves
    assert engine.relayouts == 3
    assert buckets[0] == 2 and max(buckets) == 8 and buckets[-1] == 2, buckets


def test_left_and_right_shifts_keep_the_tokens(model, reference):
    engine = make_engine(model)
    moves = record_moves(engine)
    joins = [
        Join(0, PROMPTS[0], {"a": GREEDY}, 30),  # its index passes the 48 columns: a left shift
        Join(10, PROMPTS[1], {"b": GREEDY}, 25),
        Join(26, PROMPTS[5], {"c": GREEDY}, 10),  # 30 tokens (32 columns) after the shift: a right shift
        Join(30, PROMPTS[7], {"d": GREEDY}, 5),  # 35 tokens (48 columns): right to the end, then left at once
    ]
    outs = drive(engine, joins)
    assert_greedy_reference(outs, {"a": 0, "b": 1, "c": 5, "d": 7}, reference)
    assert [len(outs[r]) for r in "abcd"] == [30, 25, 10, 5], "c and d end at exactly max_model_len tokens"
    assert moves.kinds.count("left") >= 2 and moves.kinds.count("right") >= 2, moves
    assert engine.relayouts == len(moves)


def test_random_arrivals_with_every_relayout_keep_the_tokens(model, reference):
    engine = make_engine(model)
    moves = record_moves(engine)
    rng = np.random.default_rng(0)
    joins, at = [], 0
    for j in range(16):
        index = int(rng.integers(0, len(PROMPTS)))
        at += int(rng.integers(0, 4))
        joins.append(Join(at, PROMPTS[index], {j: GREEDY}, min(N_REF, MAX_MODEL_LEN - LENGTHS[index],
                                                                int(rng.integers(1, 26)))))
    outs = drive(engine, joins)
    assert_greedy_reference(outs, {j: PROMPTS.index(join.prompt) for j, join in enumerate(joins)}, reference)
    assert {"grow", "left", "right"} <= set(moves.kinds), moves


def test_the_cache_length_follows_the_live_rows(model, sampler):
    greedy = SamplingParams(max_new_tokens=90, temperature=0.0, stop_token_ids=())
    first, last = PROMPTS[0], PROMPTS[6]
    long = [int(t) for t in np.random.default_rng(30).integers(0, V, size=60)]
    short_ref = sampler.generate([first, last], key=jax.random.key(0), params=greedy)
    long_ref = sampler.generate([long], key=jax.random.key(0), params=dataclasses.replace(greedy, max_new_tokens=30))
    # Cache lengths 64, 128 and 132: "a" fills 64 columns and the left shift grows the cache to 128; "b" (60
    # tokens) shifts the rows right; once "a" and "b" have left, the shift at the end of the 128 columns keeps
    # only "c" and the cache shrinks back to 64.
    engine = ContinuousEngine(model, max_batch=MAX_BATCH, max_model_len=100, slack=32)
    moves = record_moves(engine)
    outs = drive(engine, [Join(0, first, {"a": GREEDY}, 90), Join(45, long, {"b": GREEDY}, 30),
                          Join(85, last, {"c": GREEDY}, 40)])
    assert tokens_of(outs, "a") == list(np.asarray(short_ref.tokens)[0])
    assert tokens_of(outs, "b") == list(np.asarray(long_ref.tokens)[0])
    assert tokens_of(outs, "c") == list(np.asarray(short_ref.tokens)[1, :40])
    np.testing.assert_allclose([o.logprob for o in outs["b"]], np.asarray(long_ref.model_logps)[0], atol=LOGP_TOL)
    lengths = [moves[0].columns[0]] + [move.columns[1] for move in moves]
    assert lengths[0] == 64 and max(lengths) == 128 and lengths[-1] == 64, moves
    assert {"left", "right"} <= set(moves.kinds), moves


def test_an_admission_into_a_full_cache_shifts_it_rather_than_growing_it(model, reference):
    # Cache lengths 64, 128 and 133. "x" grows the cache to 128 and leaves; "a" joins late, so when the cache is
    # full only its 53 columns are live: "b" joining then drops the columns before "a" (a left shift) and the
    # cache stays at 128, where growing it would make every later step attend over 133 columns.
    engine = ContinuousEngine(model, max_batch=MAX_BATCH, max_model_len=100, slack=33)
    moves = record_moves(engine)
    outs: dict = {}

    def admit(name, index):
        outs[name] = list(engine.admit(engine.prefill(PROMPTS[index]), {name: GREEDY}).values())

    def step(times):
        for _ in range(times):
            for row_id, out in engine.step().items():
                outs[row_id].append(out)

    admit("x", 0)
    step(77)
    assert engine.batch_bucket == 2 and engine._columns == 128
    admit("a", 2)
    step(10)
    engine.release("x")
    step(128 - engine._index)
    assert engine._index == engine._columns == 128
    admit("b", 1)
    assert engine._columns == 128 and moves[-1].kind == "left", moves
    step(N_REF)
    for name, index in (("x", 0), ("a", 2), ("b", 1)):
        assert tokens_of(outs, name)[:N_REF] == list(reference[0][index]), name


def test_warm_up_knows_the_buckets_and_runs_before_any_row(model):
    engine = make_engine(model)
    assert engine.batch_buckets() == [2, 4, 8] and engine.column_buckets() == [MAX_MODEL_LEN + SLACK]
    engine.admit(engine.prefill(PROMPTS[0]), {"a": GREEDY})
    with pytest.raises(ValueError, match=r"warm_up\(\) runs before any row is admitted"):
        engine.warm_up()
    engine.release("a")


def test_warm_up_compiles_every_decode_step_ahead(model):
    # A cache length of its own (49 columns), so no other test has compiled these decode steps.
    engine = ContinuousEngine(model, max_batch=4, max_model_len=MAX_MODEL_LEN, slack=SLACK + 1)
    assert engine.warm_up() >= 0
    with count_engine_compilations("_decode") as compiled:
        drive(engine, [Join(0, PROMPTS[i], {i: GREEDY}, 4) for i in range(3)])
    assert compiled == [], "no decode step compiles after the warm-up"


def test_warm_up_compiles_every_relayout_and_insert_ahead(model, reference):
    # A cache of 64, 128 and 133 columns (max_model_len 100, slack 33), found in no other test: every program a
    # drive needs comes from the warm-up. The drive grows and shrinks the batch and shifts the columns both ways.
    engine = ContinuousEngine(model, max_batch=MAX_BATCH, max_model_len=100, slack=33)
    engine.warm_up()
    moves = record_moves(engine)
    long = [int(t) for t in np.random.default_rng(30).integers(0, V, size=60)]
    joins = [Join(0, PROMPTS[0], {"a": GREEDY}, 90), Join(3, PROMPTS[1], {"b": GREEDY, "c": GREEDY}, 20),
             *[Join(5, PROMPTS[i], {i: GREEDY}, 10) for i in range(2, 8)], Join(45, long, {"d": GREEDY}, 30),
             Join(85, PROMPTS[6], {"e": GREEDY}, 30)]
    with count_engine_compilations("jit(_") as compiled:
        outs = drive(engine, joins)
    assert {"grow", "shrink", "left", "right"} <= set(moves.kinds), moves
    assert len({move.columns for move in moves if move.columns[0] != move.columns[1]}) >= 2, moves
    assert compiled == [], "nothing compiles after the warm-up"
    assert_greedy_reference(outs, {i: i for i in range(2, 8)}, reference)


# --- seeded sampling ----------------------------------------------------------------------------------------


SEEDED = [RowSettings(temperature=1.0, seed=11), RowSettings(temperature=0.8, top_p=0.9, seed=12),
          RowSettings(temperature=1.2, top_k=5, seed=13), RowSettings(temperature=1.0, min_p=0.05, seed=14),
          RowSettings(temperature=1.0, seed=15, top_logprobs=2), GREEDY]


def test_seeded_rows_draw_the_same_tokens_alone_and_in_any_company(model, reference):
    engine = make_engine(model)
    alone = {i: drive(engine, [Join(0, PROMPTS[i], {i: s}, 10)])[i] for i, s in enumerate(SEEDED)}
    forward = drive(engine, [Join(2 * i, PROMPTS[i], {i: s}, 10) for i, s in enumerate(SEEDED)])
    backward = drive(engine, [Join(i // 2, PROMPTS[5 - i], {5 - i: SEEDED[5 - i]}, 10 + i) for i in range(6)])
    for i in range(len(SEEDED)):
        expected = [out.token for out in alone[i]]
        assert tokens_of(forward, i) == expected, f"row {i} in company"
        assert tokens_of(backward, i)[:10] == expected, f"row {i} in the other order"
        np.testing.assert_allclose([o.logprob for o in forward[i]], [o.logprob for o in alone[i]], atol=LOGP_TOL)
    assert tokens_of(forward, 5) == list(reference[0][5, :10]), "the greedy row among sampled ones"
    assert forward[4][0].top is not None and forward[0][0].top is None


def test_a_lone_models_weight_divides_the_temperature(model):
    engine = make_engine(model)
    halved = drive(engine, [Join(0, PROMPTS[1], {"t": RowSettings(temperature=0.5, top_p=0.9, seed=5)}, 10)])
    weighted = drive(engine, [Join(0, PROMPTS[1], {"w": RowSettings(temperature=1.0, top_p=0.9, seed=5,
                                                                     weights=(2.0,))}, 10)])
    assert tokens_of(weighted, "w") == tokens_of(halved, "t")
    # The reported log-probabilities are the model's own, whatever the temperature.
    np.testing.assert_allclose([o.logprob for o in weighted["w"]], [o.logprob for o in halved["t"]], atol=LOGP_TOL)
    for weight in (0.0, 1e-50):  # 1e-50 is 0 in float32
        with pytest.raises(ValueError, match="must be a positive finite float32: it divides the temperature"):
            engine.admit(engine.prefill(PROMPTS[1]), {"z": RowSettings(weights=(weight,))})
    assert engine.live == 0, "a refused row takes no slot"


def test_samples_of_one_prompt_are_their_own_streams(model):
    engine = make_engine(model)
    settings = RowSettings(temperature=1.0, seed=21)
    # Three samples share one prefill (a request's n = 3); sample j is the same row admitted alone.
    together = drive(engine, [Join(0, PROMPTS[2], {j: dataclasses.replace(settings, sample=j) for j in range(3)}, 12)])
    for j in range(3):
        alone = drive(engine, [Join(0, PROMPTS[2], {"x": dataclasses.replace(settings, sample=j)}, 12)])
        assert tokens_of(together, j) == tokens_of(alone, "x")
    samples = {tuple(tokens_of(together, j)) for j in range(3)}
    other_seed = drive(engine, [Join(0, PROMPTS[2], {"y": dataclasses.replace(settings, seed=22)}, 12)])
    assert len(samples) == 3 and tuple(tokens_of(other_seed, "y")) not in samples, "different streams differ"


# --- guided rows ------------------------------------------------------------------------------------------


def test_guided_rows_with_their_own_weights_equal_the_guided_sampler(model, guide):
    engine = make_engine(model, guides=[guide], max_batch=4)  # rows wait for a free slot
    weights = [(1.0, 0.0), (0.7, 1.5), (0.0, 1.0)]
    guided = Sampler(model, guides=[guide])
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
    expected = {w: guided.generate(SHORT_PROMPTS, key=jax.random.key(0), params=greedy, alpha=w[0], betas=[w[1]])
                for w in weights}
    rows = [(w, p) for p in range(len(SHORT_PROMPTS)) for w in weights]
    joins = [Join(k, SHORT_PROMPTS[p], {(w, p): RowSettings(temperature=0.0, weights=w)}, N)
             for k, (w, p) in enumerate(rows)]
    joins.append(Join(1, SHORT_PROMPTS[1], {"base": GREEDY}, N))  # no weights: the base model alone
    outs = drive(engine, joins)
    for w in weights:
        for p in range(len(SHORT_PROMPTS)):
            assert tokens_of(outs, (w, p)) == list(np.asarray(expected[w].tokens)[p]), (w, p)
            # The reported log-probabilities are the base model's, for guided rows too.
            np.testing.assert_allclose([o.logprob for o in outs[w, p]], np.asarray(expected[w].model_logps)[p],
                                       atol=LOGP_TOL)
    assert tokens_of(outs, "base") == tokens_of(outs, ((1.0, 0.0), 1))
    assert tokens_of(outs, ((0.7, 1.5), 0)) != tokens_of(outs, ((1.0, 0.0), 0)), "the guide steers"


# --- cached prompt heads ------------------------------------------------------------------------------------


HEAD = [int(t) for t in np.random.default_rng(40).integers(0, V, size=10)]
# Prompts continuing HEAD by 1 to 20 tokens (the rest prefilled in 24 columns), and two that do not use it:
# one that is HEAD itself (nothing would be left to prefill) and one that begins otherwise.
HEADED = [HEAD + [int(t) for t in np.random.default_rng(50 + i).integers(0, V, size=n)]
          for i, n in enumerate((1, 6, 14, 20))] + [HEAD, HEAD[1:] + [3, 4]]


def headed_engine(model, *, guides=()):
    """Room for the padding inside a row (head and rest): ``slack // 2`` = 24 columns."""
    engine = ContinuousEngine(model, guides=guides, max_batch=MAX_BATCH, max_model_len=64, slack=48)
    engine.add_head(HEAD)
    return engine


def test_prompts_continuing_a_cached_head_equal_sampler_generate(model, sampler):
    count = 40  # long enough for the left shifts, whose spans include the padding between head and rest
    expected = sampler.generate(HEADED, key=jax.random.key(0),
                                params=SamplingParams(max_new_tokens=count, temperature=0.0, stop_token_ids=()))
    engine = headed_engine(model)
    assert [p.reused for p in engine.prefill_many(HEADED)] == [10, 10, 10, 10, 0, 0]
    moves = record_moves(engine)
    joins = [Join(3 * i, prompt, {i: GREEDY}, min(count, 64 - len(prompt))) for i, prompt in enumerate(HEADED)]
    outs = drive(engine, joins)
    assert_greedy_reference(outs, dict(enumerate(range(len(HEADED)))),
                            (np.asarray(expected.tokens), np.asarray(expected.model_logps)))
    assert "left" in moves.kinds, moves


def test_a_head_changes_no_guided_or_seeded_row(model, guide):
    plain = ContinuousEngine(model, guides=[guide], max_batch=MAX_BATCH, max_model_len=64, slack=48)
    engine = headed_engine(model, guides=[guide])
    rows = {0: RowSettings(temperature=0.0, weights=(0.7, 1.5)), 1: RowSettings(temperature=1.0, top_p=0.9, seed=3)}
    for index in rows:
        expected = drive(plain, [Join(0, HEADED[2], {index: rows[index]}, 12)])
        got = drive(engine, [Join(0, HEADED[2], {index: rows[index]}, 12)])
        assert tokens_of(got, index) == tokens_of(expected, index)
        np.testing.assert_allclose([o.logprob for o in got[index]], [o.logprob for o in expected[index]],
                                   atol=LOGP_TOL)


def test_replacing_the_model_prefills_the_heads_again(model, checkpoints):
    from jaxalign.models import load_hf

    other = load_hf(checkpoints("llama", seed=1)[0])
    engine = headed_engine(model)
    engine.replace_model(other)
    plain = ContinuousEngine(other, max_batch=MAX_BATCH, max_model_len=64, slack=48)
    np.testing.assert_allclose(np.asarray(engine.prefill(HEADED[3]).logits),
                               np.asarray(plain.prefill(HEADED[3]).logits), atol=LOGP_TOL)


# --- prompts joining a decode step ------------------------------------------------------------------------


# Prompts continuing HEAD by 1 to JOIN_COLUMNS tokens: every one may join a step of a joining_engine.
JOINERS = [HEAD + [int(t) for t in np.random.default_rng(60 + i).integers(0, V, size=n)]
           for i, n in enumerate((1, 9, 20, continuous.JOIN_COLUMNS))]


def joining_engine(model, *, guides=(), slack=64):
    """A cached head, and room inside a row for the padding of any joining prompt (``slack // 2`` = 32)."""
    engine = ContinuousEngine(model, guides=guides, max_batch=MAX_BATCH, max_model_len=96, slack=slack)
    engine.add_head(HEAD)
    return engine


def busy_rows(tokens: int = N_REF) -> list[Join]:
    """Four greedy rows from the start: with one more the batch bucket is 8 (JOIN_MIN_BATCH), where prompts join."""
    return [Join(0, PROMPTS[i], {f"busy{i}": GREEDY}, tokens) for i in range(4)]


def test_prompts_joining_a_step_equal_sampler_generate(model, sampler, reference):
    count = 30
    expected = sampler.generate(JOINERS, key=jax.random.key(0),
                                params=SamplingParams(max_new_tokens=count, temperature=0.0, stop_token_ids=()))
    engine = joining_engine(model)
    joins = [Join(2 + 3 * i, prompt, {("joined", i): GREEDY}, count) for i, prompt in enumerate(JOINERS)]
    outs = drive(engine, busy_rows() + joins, joining=True)
    assert engine.joined == len(JOINERS)
    assert_greedy_reference(outs, {("joined", i): i for i in range(len(JOINERS))},
                            (np.asarray(expected.tokens), np.asarray(expected.model_logps)))
    assert_greedy_reference(outs, {f"busy{i}": i for i in range(4)}, reference)


def test_joined_seeded_and_guided_rows_equal_admitted_ones(model, guide):
    engine = joining_engine(model, guides=[guide])
    rows = {0: RowSettings(temperature=1.0, top_p=0.9, seed=3), 1: RowSettings(temperature=0.0, weights=(0.7, 1.5)),
            2: RowSettings(temperature=1.0, seed=4, top_logprobs=2)}
    admitted = {i: drive(engine, [Join(0, JOINERS[2], {i: settings}, 12)])[i] for i, settings in rows.items()}
    assert engine.joined == 0
    outs = drive(engine, busy_rows() + [Join(2 + i, JOINERS[2], {i: s}, 12) for i, s in rows.items()], joining=True)
    assert engine.joined == len(rows)
    for i in rows:
        assert tokens_of(outs, i) == tokens_of(admitted, i), f"row {i}"
        np.testing.assert_allclose([o.logprob for o in outs[i]], [o.logprob for o in admitted[i]], atol=LOGP_TOL)
    assert outs[2][0].top is not None and outs[0][0].top is None


def test_which_prompts_may_join_and_bad_joins_change_nothing(model):
    engine = joining_engine(model)
    assert engine.joinable(JOINERS[1]) == 0, "nothing decodes"
    with pytest.raises(ValueError, match="with none live"):
        engine.step((JOINERS[1], {"x": GREEDY}))
    engine.admit(engine.prefill(PROMPTS[0]), {"a": GREEDY})
    assert engine.joinable(JOINERS[1]) == 0, "a batch bucket below JOIN_MIN_BATCH"
    for prefilled, row_id in zip(engine.prefill_many(PROMPTS[1:4]), "bcd", strict=True):
        engine.admit(prefilled, {row_id: GREEDY})
    assert engine.joinable(JOINERS[1]) == len(HEAD)
    assert engine.joinable(JOINERS[1], rows=2) == 0, "a request for two samples"
    assert engine.joinable(HEAD) == 0 and engine.joinable(PROMPTS[1]) == 0, "nothing after the head, or no head"
    assert engine.joinable(HEAD + [5] * (continuous.JOIN_COLUMNS + 1)) == 0, "too much after the head"
    assert joining_engine(model, slack=32).joinable(JOINERS[0]) == 0, "more padding inside the row than slack // 2"
    before = (engine.live, engine._index, engine.batch_bucket, engine._columns)
    for join, message in [((PROMPTS[1], {"x": GREEDY}), "cannot join a step"),
                          ((JOINERS[1], {"a": GREEDY}), "already decoding"),
                          ((JOINERS[1], {"x": GREEDY, "y": GREEDY}), "one row"),
                          ((JOINERS[1], {"x": RowSettings(weights=(1.0, 0.5))}), "guidance weights"),
                          (([V + 3], {"x": GREEDY}), "outside the vocabulary")]:
        with pytest.raises(ValueError, match=message):
            engine.step(join)
        assert (engine.live, engine._index, engine.batch_bucket, engine._columns) == before, message
    assert engine.joined == 0
    for row_id in "abcd":
        engine.release(row_id)


def test_a_long_joined_row_shifts_left_like_an_admitted_one(model, sampler):
    # Little slack (8) and a head with 14 columns of padding before it: the row must count from the head's first
    # token, or its left shifts would keep that padding and the cache would overflow before max_model_len. The row
    # grows to 92 tokens (head 10, prompt JOIN_COLUMNS, the rest generated) of max_model_len 96.
    count = 92 - len(HEAD) - continuous.JOIN_COLUMNS
    expected = sampler.generate([JOINERS[3]], key=jax.random.key(0),
                                params=SamplingParams(max_new_tokens=count, temperature=0.0, stop_token_ids=()))
    engine = joining_engine(model, slack=8)
    moves = record_moves(engine)
    outs = drive(engine, busy_rows(6) + [Join(2, JOINERS[3], {"long": GREEDY}, count)], joining=True)
    assert engine.joined == 1 and "left" in moves.kinds, moves
    assert_greedy_reference(outs, {"long": 0}, (np.asarray(expected.tokens), np.asarray(expected.model_logps)))


def test_a_failed_joining_step_frees_the_row(model, monkeypatch):
    engine = joining_engine(model)
    for prefilled, row_id in zip(engine.prefill_many(PROMPTS[:4]), "abcd", strict=True):
        engine.admit(prefilled, {row_id: GREEDY})

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(continuous, "_decode_joining", broken)
    with pytest.raises(RuntimeError, match="went away"):
        engine.step((JOINERS[1], {"x": GREEDY}))
    assert engine.live == 4 and engine.joinable(JOINERS[1]) and engine.joined == 0
    for row_id in "abcd":
        engine.release(row_id)


def test_warm_up_compiles_the_joining_steps(model):
    # Cache lengths of their own (max_model_len 96, slack 65): no other test compiled these joining steps.
    engine = joining_engine(model, slack=65)
    engine.warm_up()
    with count_engine_compilations("_decode_joining") as compiled:
        drive(engine, busy_rows(12) + [Join(2, JOINERS[1], {"j": GREEDY}, 8)], joining=True)
    assert engine.joined == 1 and compiled == [], "no joining step compiles after the warm-up"


def test_warm_up_compiles_the_prefills_after_a_head(model):
    # A head of 26 tokens (32 columns, where HEAD has 24), so no other test has compiled these prefills.
    head = [int(t) for t in np.random.default_rng(41).integers(0, V, size=26)]
    engine = ContinuousEngine(model, max_batch=4, max_model_len=64, slack=49)
    engine.add_head(head)
    engine.warm_up(prompt_lengths=(24,), head_lengths=(24,))
    with count_engine_compilations("_prefill") as compiled:
        prompts = [head + prompt[len(HEAD):] for prompt in HEADED[:4]]
        prefilled = engine.prefill_many(prompts)  # four prompts continuing the head, one call
    assert [p.reused for p in prefilled] == [len(head)] * 4
    assert compiled == [], "no prefill after the head compiles after the warm-up"


def test_warm_up_compiles_the_one_row_prefill_of_a_lone_long_prompt(model):
    # A prompt bucket of its own (44 columns), so no other test has compiled these prefills.
    engine = ContinuousEngine(model, max_batch=4, max_model_len=64, length_buckets=(24, 44, 64))
    engine.warm_up(prompt_lengths=(40,), head_lengths=())
    with count_engine_compilations("_prefill") as compiled:
        engine.prefill(PROMPTS[7])  # 35 tokens: one row
        engine.prefill_many([PROMPTS[7], PROMPTS[7][1:]])  # two rows
    assert compiled == [], "no prefill of a warmed length compiles, alone or in company"


def test_heads_that_leave_no_room_are_refused(model):
    engine = ContinuousEngine(model, max_batch=MAX_BATCH, max_model_len=MAX_MODEL_LEN, slack=SLACK)
    with pytest.raises(ValueError, match="a head of 30 tokens leaves no room"):
        engine.add_head(list(range(30)))
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        engine.add_head([])


# --- errors ----------------------------------------------------------------------------------------------------


def test_bad_prompts_are_refused(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        engine.prefill([])
    with pytest.raises(ValueError, match="the prompt has 40 tokens; at most 39 fit max_model_len 40"):
        engine.prefill(list(range(40)))
    with pytest.raises(ValueError, match="a token id outside the vocabulary of 97"):
        engine.prefill([1, V])
    with pytest.raises(ValueError, match="a token id outside the vocabulary"):
        engine.prefill_many([[1, 2], [-1]])


def test_bad_admissions_are_refused_and_change_nothing(model, reference):
    engine = make_engine(model)
    prefilled = engine.prefill(PROMPTS[0])
    with pytest.raises(ValueError, match=f"9 rows need slots but only {MAX_BATCH} of {MAX_BATCH} are free"):
        engine.admit(prefilled, {i: GREEDY for i in range(MAX_BATCH + 1)})
    assert engine.live == 0
    first = engine.admit(prefilled, {"a": GREEDY})
    with pytest.raises(ValueError, match="row 'a' is already decoding"):
        engine.admit(engine.prefill(PROMPTS[1]), {"a": GREEDY})
    with pytest.raises(ValueError, match=r"guidance weights \(1.0, 0.5\) need 1 values"):
        engine.admit(engine.prefill(PROMPTS[1]), {"b": RowSettings(temperature=0.0, weights=(1.0, 0.5))})
    assert engine.live == 1 and engine.length_of("a") == len(PROMPTS[0])
    outs = {"a": [first["a"]]}
    for _ in range(7):
        outs["a"].append(engine.step()["a"])
    engine.release("a")
    engine.release("never admitted")  # unknown ids are ignored
    assert engine.live == 0 and engine.step() == {}
    assert_greedy_reference(outs, {"a": 0}, reference)


def test_guided_weights_need_one_value_per_model(model, guide):
    engine = make_engine(model, guides=[guide])
    with pytest.raises(ValueError, match=r"guidance weights \(1.0,\) need 2 values \(the base model's and one per"):
        engine.admit(engine.prefill(PROMPTS[0]), {"a": RowSettings(weights=(1.0,))})
    assert engine.live == 0


def test_stepping_a_row_past_max_model_len_is_refused(model):
    engine = make_engine(model)
    longest = [int(t) for t in np.random.default_rng(5).integers(0, V, size=MAX_MODEL_LEN - 1)]
    first = engine.admit(engine.prefill(longest), {"full": GREEDY})
    logits = np.asarray(model(np.asarray([longest]))[0][0, -1])
    assert first["full"].token == int(np.argmax(logits)), "a prompt of max_model_len - 1 tokens fills the cache"
    with pytest.raises(ValueError, match="row 'full' has reached max_model_len 40: release it"):
        engine.step()
    assert engine.live == 1
    engine.release("full")
    assert engine.live == 0 and engine.step() == {}


def test_bad_engine_settings_are_refused(model):
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        ContinuousEngine(model, max_batch=0)
    with pytest.raises(ValueError, match="max_model_len must be >= 2, got 1"):
        ContinuousEngine(model, max_model_len=1)
    with pytest.raises(ValueError, match="max_model_len 129 exceeds the 128 positions of the model"):
        ContinuousEngine(model, max_model_len=129)
    with pytest.raises(ValueError, match="slack must be >= 1, got 0"):
        ContinuousEngine(model, max_model_len=MAX_MODEL_LEN, slack=0)
    other = LlamaForCausalLM(dataclasses.replace(model.config, vocab_size=101), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="guide 0 has 101 tokens in its vocabulary, the base model 97"):
        ContinuousEngine(model, guides=[other], max_model_len=MAX_MODEL_LEN)
