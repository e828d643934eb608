import torch as th
from torch.distributions import Categorical

from sb3_textrl.log_probs import log_prob_and_entropy, sample_categorical


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
