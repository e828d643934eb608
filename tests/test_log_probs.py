import pytest
import torch as th
from torch.distributions import Categorical

from sb3_textrl.lm.log_probs import lm_head_logits, log_prob_and_entropy, sample_categorical


def test_equals_categorical_with_gradients():
    generator = th.Generator().manual_seed(0)
    logits = (3 * th.randn(6, 50, generator=generator, dtype=th.float64)).requires_grad_()
    actions = th.randint(0, 50, (6,), generator=generator)
    weights = th.randn(2, 6, generator=generator, dtype=th.float64)
    log_prob, entropy = log_prob_and_entropy(logits, actions)
    (weights[0] @ log_prob + weights[1] @ entropy).backward()
    grad, logits.grad = logits.grad, None
    distribution = Categorical(logits=logits)
    expected_log_prob, expected_entropy = distribution.log_prob(actions), distribution.entropy()
    (weights[0] @ expected_log_prob + weights[1] @ expected_entropy).backward()
    th.testing.assert_close(log_prob, expected_log_prob)
    th.testing.assert_close(entropy, expected_entropy)
    th.testing.assert_close(grad, logits.grad)


def test_gradcheck_each_output_alone():
    logits = th.randn(3, 7, dtype=th.float64, requires_grad=True)
    actions = th.tensor([0, 6, 3])
    assert th.autograd.gradcheck(lambda z: log_prob_and_entropy(z, actions)[0], (logits,))
    assert th.autograd.gradcheck(lambda z: log_prob_and_entropy(z, actions)[1], (logits,))


def test_sample_categorical_follows_the_probabilities():
    probs = th.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0]])
    th.manual_seed(0)
    draws = th.stack([sample_categorical(probs) for _ in range(20_000)])  # (20000, 2)
    frequencies = th.bincount(draws[:, 0], minlength=5).double() / len(draws)
    assert frequencies[0] == 0 and frequencies[2] == 0  # probability 0: never drawn
    th.testing.assert_close(frequencies, probs[0].double(), atol=0.015, rtol=0)
    assert (draws[:, 1] == 0).all()
    assert draws.dtype == th.int64


@pytest.mark.parametrize("with_bias", [False, True])
def test_lm_head_logits_equal_linear_with_gradients(with_bias):
    generator = th.Generator().manual_seed(0)
    hidden = th.randn(5, 12, generator=generator, dtype=th.float64, requires_grad=True)
    weight = th.randn(40, 12, generator=generator, dtype=th.float64, requires_grad=True)
    bias = th.randn(40, generator=generator, dtype=th.float64, requires_grad=True) if with_bias else None
    upstream = th.randn(5, 40, generator=generator, dtype=th.float64)
    logits = lm_head_logits(hidden, weight, bias)
    assert logits.shape == (5, 40) and logits.is_contiguous()
    grads = th.autograd.grad((logits * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    expected = th.nn.functional.linear(hidden, weight, bias)
    expected_grads = th.autograd.grad((expected * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    th.testing.assert_close(logits, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        th.testing.assert_close(grad, expected_grad)
