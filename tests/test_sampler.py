"""Sampler tests: exact distributions (chi-square), limits, penalty math, validation, tracing.

Expected distributions are computed here with plain `math`, independently of the sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

from attendo.errors import InvalidSettingError
from attendo.generation.sampler import (
    STAGE_NAMES,
    SamplingSettings,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    argmax,
    draw,
    draw_each,
    make_generator,
    mask_tokens,
    min_p_filter,
    next_token,
    process_logits,
    sampling_stages,
    top_k_filter,
    top_p_filter,
)

LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]  # distinct, already sorted: token i has rank i
N_DRAWS = 10_000
SEED = 1234
# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def softmax(values: list[float]) -> list[float]:
    top = max(v for v in values if v != -math.inf)
    weights = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def chi_square(counts: list[int], expected_probs: list[float]) -> tuple[float, int]:
    """Statistic and degrees of freedom over the tokens with non-zero expected probability."""
    n = sum(counts)
    cells = [(c, p * n) for c, p in zip(counts, expected_probs) if p > 0]
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


def draw_counts(logits: torch.Tensor, settings: SamplingSettings) -> list[int]:
    processed = process_logits(logits, settings)
    ids = draw(processed.expand(N_DRAWS, -1), make_generator(SEED))
    return torch.bincount(ids, minlength=logits.shape[-1]).tolist()


def expected_for(settings: SamplingSettings) -> list[float]:
    scaled = [v / settings.temperature for v in LOGITS]
    probs = softmax(scaled)
    keep = [True] * len(LOGITS)
    if settings.top_k:
        keep = [i < settings.top_k for i in range(len(LOGITS))]
    if settings.top_p < 1:
        probs_after_k = softmax([s if k else -math.inf for s, k in zip(scaled, keep)])
        mass_above = 0.0
        for i, p in enumerate(probs_after_k):
            keep[i] = keep[i] and mass_above < settings.top_p
            mass_above += p
    if settings.min_p > 0:
        keep = [k and p >= settings.min_p * max(probs) for k, p in zip(keep, probs)]
    return softmax([s if k else -math.inf for s, k in zip(scaled, keep)])


@pytest.mark.parametrize("settings, n_kept", [
    (SamplingSettings(do_sample=True), 8),
    (SamplingSettings(do_sample=True, temperature=0.5), 8),
    (SamplingSettings(do_sample=True, temperature=2.0), 8),
    (SamplingSettings(do_sample=True, top_k=3), 3),
    (SamplingSettings(do_sample=True, top_p=0.75), 3),  # masses above: 0, .40, .65 | .80
    (SamplingSettings(do_sample=True, top_p=0.9), 5),
    (SamplingSettings(do_sample=True, min_p=0.2), 4),  # keeps logits >= 2 + ln 0.2 = 0.39
    # each filter bites: top-k 8 -> 6, top-p 6 -> 4 (masses above .68 | .81), min-p 4 -> 3
    (SamplingSettings(do_sample=True, temperature=2.0, top_k=6, top_p=0.8, min_p=0.5), 3),
], ids=lambda x: repr(x) if isinstance(x, SamplingSettings) else None)
def test_draws_follow_the_intended_distribution(settings: SamplingSettings, n_kept: int) -> None:
    expected = expected_for(settings)
    counts = draw_counts(torch.tensor(LOGITS), settings)

    assert sum(p > 0 for p in expected) == n_kept  # the hand-made expectation is the intended one
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0), counts
    statistic, dof = chi_square(counts, expected)
    assert statistic < CHI2_CRITICAL_P001[dof], (statistic, counts, expected)


def test_chi_square_check_can_fail() -> None:
    # Draws at temperature 0.5 are clearly distinguishable from temperature 1.
    counts = draw_counts(torch.tensor(LOGITS), SamplingSettings(do_sample=True, temperature=0.5))
    statistic, dof = chi_square(counts, softmax(LOGITS))
    assert statistic > 10 * CHI2_CRITICAL_P001[dof]


# --- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    SamplingSettings(),
    SamplingSettings(do_sample=True, temperature=0.0),
    SamplingSettings(do_sample=True, top_k=1),
    SamplingSettings(do_sample=True, top_p=1e-9),
    SamplingSettings(do_sample=True, min_p=1.0),
])
def test_limits_equal_argmax(settings: SamplingSettings) -> None:
    logits = torch.randn(4, 50, generator=make_generator(0)) * 3
    generator = make_generator(7)
    for _ in range(20):
        assert torch.equal(next_token(logits, settings, None, generator), logits.argmax(-1))


def test_greedy_property() -> None:
    assert SamplingSettings().greedy
    assert SamplingSettings(do_sample=True, temperature=0.0).greedy
    assert SamplingSettings(do_sample=True, top_k=1).greedy
    assert not SamplingSettings(do_sample=True).greedy
    assert not SamplingSettings(do_sample=True, top_k=2, temperature=0.1).greedy


def test_temperature_zero_keeps_only_the_maximum() -> None:
    out = apply_temperature(torch.tensor([1.0, 3.0, -2.0, 3.0]), 0.0)
    assert not out.isnan().any()
    assert out.softmax(-1).tolist() == [0.0, 0.5, 0.0, 0.5]


def test_neutral_settings_leave_logits_unchanged() -> None:
    logits = torch.randn(3, 20, generator=make_generator(1))
    ids = torch.tensor([1, 2, 2])
    for out in [apply_temperature(logits, 1.0), top_k_filter(logits, 0), top_p_filter(logits, 1.0),
                min_p_filter(logits, 0.0), apply_repetition_penalty(logits, ids, 1.0),
                apply_presence_frequency(logits, ids, 0.0, 0.0),
                process_logits(logits, SamplingSettings(do_sample=True), ids)]:
        assert torch.equal(out, logits)
        assert out.data_ptr() != logits.data_ptr()  # a new tensor, so callers may edit it freely


def test_inputs_are_never_mutated() -> None:
    logits = torch.randn(2, 30, generator=make_generator(2))
    ids = torch.tensor([[0, 5, 5], [7, 8, 9]])
    before, ids_before = logits.clone(), ids.clone()
    settings = SamplingSettings(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05,
                                repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)
    apply_repetition_penalty(logits, ids, 1.5)
    apply_presence_frequency(logits, ids, 1.0, 1.0)
    apply_temperature(logits, 0.0)
    apply_temperature(logits, 0.5)
    top_k_filter(logits, 3)
    top_p_filter(logits, 0.5)
    min_p_filter(logits, 0.5)
    sampling_stages(logits, settings, ids, torch.ones(30, dtype=torch.bool))
    next_token(logits, settings, ids, make_generator(0))
    assert torch.equal(logits, before) and torch.equal(ids, ids_before)


# --- the individual stages on hand-made examples ----------------------------------------------

def test_repetition_penalty_math() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # seen twice still penalized once


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.0, 0.0])
    settings = SamplingSettings(repetition_penalty=2.0)
    assert next_token(logits, settings, torch.tensor([0]), None).item() == 1


def test_presence_frequency_math() -> None:
    out = apply_presence_frequency(torch.zeros(5), torch.tensor([1, 1, 3]), 0.5, 0.25)
    assert out.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]


def test_top_k_keeps_exactly_k() -> None:
    out = top_k_filter(torch.tensor([0.1, 5.0, 3.0, 4.0, -1.0]), 2)
    assert out.tolist() == [-math.inf, 5.0, -math.inf, 4.0, -math.inf]


@pytest.mark.parametrize("p, kept", [(0.4, [0]), (0.6, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_set_reaching_p(p: float, kept: list[int]) -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[[2, 0, 3, 1]]  # shuffled: vocab order
    kept_vocab = sorted([2, 0, 3, 1].index(i) for i in kept)
    out = top_p_filter(logits, p)
    assert out.isfinite().nonzero().flatten().tolist() == kept_vocab


def test_min_p_math() -> None:
    out = min_p_filter(torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 0.2)  # threshold 0.1
    assert out.isfinite().tolist() == [True, True, True, False]


# --- seeds, batching, tracing, validation -----------------------------------------------------

def test_same_seed_same_draws() -> None:
    settings = SamplingSettings(do_sample=True, temperature=1.5, seed=99)
    logits = torch.tensor(LOGITS)

    def run(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [next_token(logits, settings, None, generator).item() for _ in range(100)]

    assert run(99) == run(99)
    assert run(99) != run(100)


@pytest.mark.parametrize("settings", [
    SamplingSettings(do_sample=True, temperature=0.7),
    SamplingSettings(do_sample=True, temperature=1.3, top_k=40, top_p=0.9, min_p=0.02),
])  # fmt: skip
def test_rows_drawn_together_get_the_tokens_each_gets_alone(settings: SamplingSettings) -> None:
    """What a batch does with its rows that share settings (the generation loop's _draw_together)."""
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(0)) * 3
    together_generators = [make_generator(seed) for seed in range(6)]
    alone_generators = [make_generator(seed) for seed in range(6)]
    for _ in range(20):  # 20 draws from each row's own generator
        together = draw_each(process_logits(logits, settings), together_generators).tolist()
        alone = [int(draw(process_logits(logits[i], settings), alone_generators[i])) for i in range(6)]
        assert together == alone
        assert len(set(together)) > 1


def test_make_generator_without_seed() -> None:
    first = torch.rand(4, generator=make_generator(None))
    second = torch.rand(4, generator=make_generator(None))
    assert not torch.equal(first, second)


def test_batched_logits_match_row_by_row() -> None:
    logits = torch.randn(2, 40, generator=make_generator(3))
    ids = torch.tensor([[1, 2, 2], [3, 3, 30]])
    settings = SamplingSettings(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02,
                                repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)
    batched = process_logits(logits, settings, ids)
    for row in range(2):
        assert torch.equal(batched[row], process_logits(logits[row], settings, ids[row]))
    assert next_token(logits, settings, ids, make_generator(0)).shape == (2,)
    assert argmax(logits).shape == (2,)


def test_shared_history_broadcasts_over_batch() -> None:
    logits = torch.randn(3, 10, generator=make_generator(4))
    out = apply_repetition_penalty(logits, torch.tensor([0, 4]), 1.5)
    for row in range(3):
        assert torch.equal(out[row], apply_repetition_penalty(logits[row], torch.tensor([0, 4]), 1.5))


def test_stages_are_reported_in_order_and_final_is_what_is_drawn_from() -> None:
    settings = SamplingSettings(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                                repetition_penalty=1.3, frequency_penalty=0.5)
    history = torch.tensor([0, 1])
    stages = sampling_stages(torch.tensor(LOGITS), settings, history)

    assert [name for name, _ in stages] == [n for n in STAGE_NAMES if n != "grammar"]
    assert torch.equal(stages[0][1], torch.tensor(LOGITS))
    assert torch.equal(stages[1][1], apply_presence_frequency(apply_repetition_penalty(
        torch.tensor(LOGITS), history, 1.3), history, 0.0, 0.5))
    assert torch.equal(stages[-1][1], process_logits(torch.tensor(LOGITS), settings, history))
    kept = [int(logits.isfinite().sum()) for _, logits in stages]
    assert kept == sorted(kept, reverse=True) and kept[-1] < len(LOGITS)


def test_stages_whose_setting_is_off_pass_through() -> None:
    stages = dict(sampling_stages(torch.tensor(LOGITS), SamplingSettings(do_sample=True, top_p=0.5)))
    for name in ("penalties", "temperature", "top_k"):
        assert torch.equal(stages[name], torch.tensor(LOGITS))
    assert torch.equal(stages["min_p"], stages["top_p"])
    assert int(stages["top_p"].isfinite().sum()) == 2  # 0.39 + 0.24 reaches 0.5


def test_greedy_final_stage_is_the_argmax_next_token_takes() -> None:
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    settings = SamplingSettings(repetition_penalty=2.0, temperature=0.5)
    final = sampling_stages(logits, settings, torch.tensor([0]))[-1][1]
    assert final.isfinite().nonzero().flatten().tolist() == [1]
    assert next_token(logits, settings, torch.tensor([0])).item() == 1


def test_grammar_mask_is_a_stage_that_greedy_and_sampling_obey() -> None:
    logits = torch.tensor(LOGITS)
    allowed = torch.tensor([False, False, True, False, True, False, False, False])
    sampled = SamplingSettings(do_sample=True, temperature=2.0, seed=5)
    stages = dict(sampling_stages(logits, sampled, allowed=allowed))
    assert list(stages) == list(STAGE_NAMES)
    assert stages["grammar"].isfinite().tolist() == allowed.tolist()
    assert next_token(logits, SamplingSettings(), allowed=allowed).item() == 2
    generator = make_generator(5)
    draws = {next_token(logits, sampled, None, generator, allowed).item() for _ in range(200)}
    assert draws == {2, 4}
    batch_mask = torch.stack([allowed, ~allowed])
    assert next_token(logits.expand(2, -1), SamplingSettings(), allowed=batch_mask).tolist() == [2, 0]
    with pytest.raises(InvalidSettingError, match="mask"):
        mask_tokens(logits, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("presence_penalty", math.nan),
    ("seed", -1),
])
def test_invalid_settings_are_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidSettingError, match=field):
        SamplingSettings(**{field: value})


def test_stage_functions_validate_their_arguments() -> None:
    logits = torch.zeros(4)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, -2)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)
    with pytest.raises(ValueError, match="min_p"):
        min_p_filter(logits, 2.0)
