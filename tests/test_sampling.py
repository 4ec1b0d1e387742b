"""Sampling filters on hand-made distributions, and generate()."""

import math

import pytest
import torch

from scratchformer.model import GPT
from scratchformer.config import ModelConfig
from scratchformer.sampling import Sampling, generate, next_token, penalize_repetition, top_k_filter, top_p_filter


def logits_of(probs):
    return torch.tensor([[math.log(p) for p in probs]])


def kept(logits):
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_most_likely():
    logits = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 1)) == [1]
    assert kept(top_k_filter(logits, 10)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "p, expected",
    [(0.5, [2]), (0.79, [0, 2]), (0.8, [0, 2]), (0.81, [0, 2, 3]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    # sorted: 0.5 (2), 0.3 (0), 0.15 (3), 0.05 (1)
    assert kept(top_p_filter(logits_of([0.3, 0.05, 0.5, 0.15]), p)) == expected


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 50)
    previous = torch.zeros(5, 0, dtype=torch.long)
    assert torch.equal(next_token(logits, Sampling(temperature=0), previous, None), logits.argmax(-1))


def test_low_temperature_concentrates_on_the_mode():
    logits = logits_of([0.3, 0.05, 0.5, 0.15]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    picks = next_token(logits, Sampling(temperature=0.05), torch.zeros(2000, 0, dtype=torch.long), g)
    assert (picks == 2).float().mean() > 0.99
    picks = next_token(logits, Sampling(temperature=1.0), torch.zeros(2000, 0, dtype=torch.long), g)
    assert abs((picks == 2).float().mean().item() - 0.5) < 0.05  # samples the distribution itself


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    out = penalize_repetition(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]


def test_bad_sampling_settings():
    for bad in (Sampling(temperature=-1), Sampling(top_k=0), Sampling(top_p=0), Sampling(top_p=1.5)):
        with pytest.raises(ValueError):
            bad.validate()


def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, context=16, n_layers=1, d_model=16, n_heads=2, d_ff=32))


def test_generate_is_reproducible_with_a_seed_and_matches_greedy_recomputation():
    model = tiny_model()
    a = list(generate(model, [1, 2, 3], 10, Sampling(top_k=5), seed=7))
    b = list(generate(model, [1, 2, 3], 10, Sampling(top_k=5), seed=7))
    assert a == b and len(a) == 10
    greedy = list(generate(model, [1, 2, 3], 8, Sampling(temperature=0)))
    tokens = [1, 2, 3]
    with torch.no_grad():
        for _ in range(8):  # without a cache: the whole sequence each step
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert greedy == tokens[3:]


def test_generate_stops_at_the_stop_token_and_slides_past_the_context():
    model = tiny_model()
    first = list(generate(model, [1], 30, Sampling(temperature=0)))
    assert len(first) == 30  # 31 tokens through a context of 16: the window slid
    stop = first[4]
    out = list(generate(model, [1], 30, Sampling(temperature=0), stop_token=stop))
    assert out == first[: first.index(stop) + 1]


def test_prompt_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="17 tokens, more than the model's context of 16"):
        list(generate(model, list(range(17)), 1))
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate(model, [], 1))
