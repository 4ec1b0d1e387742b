"""Sampling filters on hand-made distributions, and GPT.generate()."""

import argparse
import math

import pytest
import torch

from scratchformer.model import GPT
from scratchformer.config import ModelConfig
from scratchformer.sampling import Sampling, next_token, penalize_repetition, top_k_filter, top_p_filter


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
    nan, inf = float("nan"), float("inf")
    for bad in (Sampling(temperature=-1), Sampling(temperature=nan), Sampling(temperature=inf), Sampling(top_k=0),
                Sampling(top_p=0), Sampling(top_p=1.5), Sampling(top_p=nan), Sampling(repetition_penalty=0),
                Sampling(repetition_penalty=nan), Sampling(repetition_penalty=inf)):
        with pytest.raises(ValueError):
            bad.validate()
    Sampling(temperature=0, top_k=1, top_p=1.0, repetition_penalty=1.3).validate()  # the edges that are fine


def tiny_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, context=16, n_layers=1, d_model=16, n_heads=2, d_ff=32))


def greedy_without_cache(model, tokens, steps):
    """The independent expectation: the whole sequence through the model at every step."""
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens[-model.config.context:]]))[0, -1].argmax()))
    return tokens


def test_generate_is_reproducible_with_a_seed_and_matches_greedy_recomputation():
    model = tiny_model()
    a = model.generate([1, 2, 3], 10, top_k=5, seed=7)
    b = model.generate(torch.tensor([1, 2, 3]), 10, top_k=5, seed=7)
    assert torch.equal(a, b) and a.shape == (13,) and a[:3].tolist() == [1, 2, 3]
    assert model.generate([1, 2, 3], 8, temperature=0).tolist() == greedy_without_cache(model, [1, 2, 3], 8)


def test_generate_a_batch_of_prompts_each_as_alone():
    model = tiny_model()
    prompts = [[1, 2, 3], [7, 7, 9], [30, 2, 5]]
    out = model.generate(prompts, 6, temperature=0)
    assert out.shape == (3, 9)
    for prompt, row in zip(prompts, out.tolist()):
        assert row == greedy_without_cache(model, prompt, 6)
    sampled = model.generate(prompts, 6, top_p=0.9, seed=3)
    assert torch.equal(sampled, model.generate(prompts, 6, top_p=0.9, seed=3))


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary", "learned"])
@pytest.mark.parametrize("document_token", [None, 7])
def test_prompts_of_different_lengths_each_as_alone(positions, document_token):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, context=16, n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32,
                            positions=positions, document_token=document_token))
    prompts = [[3, 9, 7, 1, 12, 5, 7, 30, 2], [7, 4], [11, 2, 5, 7, 8]]
    out = model.generate(prompts, 6, temperature=0)
    assert out.shape == (3, 15)
    for prompt, row in zip(prompts, out.tolist()):
        filler = 9 - len(prompt)
        assert row[:filler] == [prompt[0]] * filler
        assert row[filler:] == greedy_without_cache(model, prompt, 6)
    # The logits themselves: each prompt's positions as the prompt alone gives them.
    padded = torch.tensor([[p[0]] * (9 - len(p)) + p for p in prompts])
    with torch.no_grad():
        logits = model(padded, padding=torch.tensor([9 - len(p) for p in prompts]))
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(logits[row, 9 - len(prompt) :], model(torch.tensor([prompt]))[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        model.generate([[1, 2], []], 1)


def test_generate_stops_at_eos_and_slides_past_the_context():
    model = tiny_model()
    first = model.generate([1], 30, temperature=0)[1:].tolist()
    assert len(first) == 30  # 31 tokens through a context of 16: the window slid
    stop = first[4]
    out = model.generate([1], 30, temperature=0, eos=stop)[1:].tolist()
    assert out == first[: first.index(stop) + 1]
    # In a batch, a sequence that ended repeats eos while the others go on.
    both = model.generate([[1], [first[0]]], 8, temperature=0, eos=stop)
    assert both[0, 1:].tolist() == first[: first.index(stop) + 1] + [stop] * (7 - first.index(stop))
    alone = greedy_without_cache(model, [first[0]], 8)[1:]
    if stop in alone:
        alone = alone[: alone.index(stop) + 1] + [stop] * (7 - alone.index(stop))
    assert both[1, 1:].tolist() == alone


def test_streamer_sees_each_step():
    model = tiny_model()
    seen = []
    out = model.generate([[1, 2], [3, 4]], 5, temperature=0, streamer=lambda t: seen.append(t.tolist()))
    assert [list(step) for step in zip(*seen)] == out[:, 2:].tolist()


def test_a_prompt_longer_than_the_context_keeps_its_end():
    model = tiny_model()
    prompt = list(range(1, 21))  # 20 tokens, context 16
    with pytest.warns(UserWarning, match="20 tokens, more than the model's context of 16: generating from its last 16"):
        out = model.generate(prompt, 4, temperature=0)
    assert out[:20].tolist() == prompt
    # The first new token sees exactly the last 16 prompt tokens (then the window slides).
    assert out[20] == greedy_without_cache(model, prompt[-16:], 1)[16]


def test_prompt_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="T >= 1"):
        model.generate([], 1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model.generate([1, 40], 1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate([1], -3)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate([1], 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        model.generate([1], 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="token ids must be integers, got torch.float32"):
        model.generate([1.7, 2.2], 1)  # would have run as [1, 2]
    with pytest.raises(ValueError, match=r"eos must be a token id in \[0, 40\), got 99999"):
        model.generate([1], 2, eos=99999)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\^63, 2\^64\)"):
        model.generate([1], 2, seed=10**30)
    with pytest.raises(ValueError, match=r"integer token ids of shape \[batch, time\].*one sequence: idx\[None\]"):
        model(torch.tensor([1, 2]))


def test_a_model_on_the_meta_device_refuses_to_generate():
    with torch.device("meta"):
        model = GPT(ModelConfig(vocab_size=40, context=16, n_layers=1, d_model=16, n_heads=2, d_ff=32))
    assert model(torch.zeros(2, 5, dtype=torch.long, device="meta")).shape == (2, 5, 40)  # shapes still flow
    with pytest.raises(ValueError, match="on the meta device .*to_empty"):
        model.generate([1, 2], 3)


def test_generate_and_the_cli_sample_at_one_default_temperature():
    import inspect

    from scratchformer import cli

    default = inspect.signature(GPT.generate).parameters["temperature"].default
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert default == Sampling().temperature == commands["generate"].get_default("temperature") == 0.8
