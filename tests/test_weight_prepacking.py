"""oneDNN-prepacked weights (sb3_textrl.lm.weight_prepacking): the packed layers equal the stock ones, and the policy's
rollouts run on them while its updates never do."""

import pytest
import torch as th
from test_kv_cache import fresh_distribution
from test_policy import collect_episodes, make_env, make_policy, stack
from transformers import AutoModelForCausalLM

from sb3_textrl.lm import weight_prepacking
from sb3_textrl.lm.weight_prepacking import PrepackedLinears, packable_linears

pytestmark = pytest.mark.skipif(not packable_linears(th.nn.Linear(2, 2)), reason="this PyTorch has no oneDNN linear ops")


def test_packed_forward_equals_linear(tiny_llama_path, monkeypatch):
    calls = []
    packed_call = weight_prepacking._PackedForward.__call__
    monkeypatch.setattr(weight_prepacking._PackedForward, "__call__", lambda self, x: calls.append(1) or packed_call(self, x))
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    linears = PrepackedLinears(lm.base_model)
    ids = th.randint(3, 300, (3, 7))
    with th.no_grad():
        expected = lm.base_model(input_ids=ids).last_hidden_state
        with linears.applied(rows=3):
            assert all("forward" in m.__dict__ for m in linears.packed)
            out = lm.base_model(input_ids=ids).last_hidden_state
    assert len(linears.packed) == 3 * lm.config.num_hidden_layers  # the MLP's gate, up and down projections
    assert {name.split(".")[-2] for name, m in lm.base_model.named_modules() if m in linears.packed} == {"mlp"}
    assert not any("forward" in m.__dict__ for m in linears.packed)  # the layers are themselves again
    assert len(calls) == len(linears.packed)  # each packed layer ran on its packed weight
    th.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_packed_head_logits_equal_the_head(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    head = lm.get_output_embeddings()
    linears = PrepackedLinears(lm.base_model, head=head)
    hidden = th.randn(5, lm.config.hidden_size)
    assert linears.logits(hidden) is None  # nothing packed yet
    with th.no_grad():
        with linears.applied(rows=5):
            pass
        assert head in linears.packed and len(linears.packed) == 3 * lm.config.num_hidden_layers + 1
        th.testing.assert_close(linears.logits(hidden), head(hidden), atol=1e-5, rtol=1e-5)
        assert linears.logits(hidden.double()) is None  # another dtype: the caller runs the head as it is
    assert linears.logits(hidden) is None  # gradients on: never the copy
    linears.clear()
    with th.no_grad():
        assert linears.logits(hidden) is None


def test_layers_restored_after_an_error(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    linears = PrepackedLinears(lm.base_model)
    with pytest.raises(IndexError), th.no_grad(), linears.applied(rows=1):
        lm.base_model(input_ids=th.tensor([[10**6]]))  # a token id outside the vocabulary
    assert linears.packed and not any("forward" in m.__dict__ for m in linears.packed)


def test_nothing_packed_with_gradients_or_other_dtypes(tiny_llama_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    linears = PrepackedLinears(lm.base_model)
    with linears.applied(rows=1):  # gradients on: training steps use the layers as they are
        assert not linears.packed
    assert not packable_linears(lm.to(th.bfloat16).base_model)
    with th.no_grad(), linears.applied(rows=1):
        pass
    assert linears.packed == {}  # remembered: nothing to pack under these weights


def test_rollout_runs_packed_and_frees_the_copies(tiny_llama_path):
    """A rollout's later steps run on packed weights, equal to a full forward; an update or training mode drops them."""
    env = make_env(tiny_llama_path, max_new_tokens=4)
    policy = make_policy(env)
    policy.set_training_mode(False)
    episodes = collect_episodes(env, 2)
    calls = [stack([episodes[0][t], episodes[1][t]]) for t in (0, 1)]  # two steps of the same two episodes
    head_logits, packed_heads = policy.kv_cache.linears.logits, []  # whether each call's logits came packed

    def counted(hidden):
        logits = head_logits(hidden)
        packed_heads.append(logits is not None)
        return logits

    policy.kv_cache.linears.logits = counted

    def rollout():
        for t, (obs, _) in enumerate(calls):
            with th.no_grad():
                logits = policy.get_distribution(obs).distribution.logits
            linears = policy.kv_cache.linears
            assert bool(linears.packed) == (t == 1)  # the first call runs as is, the second packed
            assert (linears.head in (linears.packed or {})) == (t == 1) == packed_heads[-1]  # the LM head too
            th.testing.assert_close(logits, fresh_distribution(policy, obs)[0], atol=1e-5, rtol=0)

    rollout()
    # an optimizer step changes the weights: the copies go (the gradients they take the place of go too)
    obs, actions = calls[1]
    policy.evaluate_actions(obs, actions)[1].mean().backward()
    policy.optimizer.step()
    assert not policy.kv_cache.linears.packed
    assert all(p.grad is None for p in policy.parameters())
    rollout()  # packed again, from the new weights
    policy.set_training_mode(True)  # training starts: the copies go
    assert not policy.kv_cache.linears.packed


def test_prepacked_weights_off(tiny_llama_path):
    env = make_env(tiny_llama_path, max_new_tokens=4)
    policy = make_policy(env, prepacked_weights=False)
    assert policy._get_constructor_parameters()["prepacked_weights"] is False  # saved with the model
    policy.set_training_mode(False)
    episodes = collect_episodes(env, 1)
    with th.no_grad():
        for t in (0, 1):
            policy.get_distribution(stack([episodes[0][t]])[0])
    assert policy.kv_cache.length > 0 and not policy.kv_cache.linears.packed
