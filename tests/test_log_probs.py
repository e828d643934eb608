import torch as th
from torch.distributions import Categorical

from sb3_textrl.log_probs import log_prob_and_entropy


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
