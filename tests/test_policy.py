import warnings

import gymnasium as gym
import numpy as np
import pytest
import sb3_contrib
import stable_baselines3 as sb3
import torch as th
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import sb3_textrl
from sb3_textrl.common.buffers import EpisodeRolloutBuffer
from sb3_textrl.common.group_algorithm import GroupOnPolicyAlgorithm
from sb3_textrl.lm.tokens import covering_rows, steps_out_of_order
from sb3_textrl.policies import CausalLMActorCriticPolicy, LMPolicy
from sb3_textrl.registration import register_policy_alias

ENV_ID = "sb3_textrl/TextGeneration-v0"
PROMPTS = ["Write one sentence about rain.", "Hi", "Write a short review of a cafe.", "The sun"]


def make_env(path, max_new_tokens=5, **kwargs):
    def zero(prompts, completions):
        return [0.0] * len(completions)

    return gym.make(ENV_ID, model_name_or_path=path, prompts=PROMPTS, reward_fn=zero, max_new_tokens=max_new_tokens, **kwargs)


def make_policy(env, **kwargs) -> CausalLMActorCriticPolicy:
    return LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, **kwargs)


def collect_episodes(env, n_episodes, seed=0):
    """Observations and (random, non-EOS-biased) actions of ``n_episodes`` episodes: ``[[(obs, action), ...], ...]``."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(n_episodes):
        obs, _ = env.reset(seed=seed + e, options={"prompt_index": e})
        steps, done = [], False
        while not done:
            action = int(rng.integers(3, env.action_space.n))
            steps.append((obs, action))
            obs, _, done, _, _ = env.step(action)
        episodes.append(steps)
    return episodes


def stack(steps):
    obs = {key: th.as_tensor(np.stack([o[key] for o, _ in steps])) for key in ("input_ids", "attention_mask")}
    return obs, th.as_tensor([a for _, a in steps])


def hand_logits(lm, obs_np):
    """Next-token logits of the real tokens only: no padding, default position ids."""
    ids = th.as_tensor(obs_np["input_ids"][obs_np["attention_mask"] == 1])[None]
    with th.no_grad():
        return lm(input_ids=ids).logits[0, -1].float()


def test_alias_registered():
    assert PPO.policy_aliases["LMPolicy"] is LMPolicy
    assert A2C.policy_aliases["LMPolicy"] is LMPolicy
    assert TRPO.policy_aliases["LMPolicy"] is LMPolicy
    for algo in (PPO, A2C, TRPO, sb3_textrl.REINFORCE, sb3_textrl.GRPO, sb3_textrl.RLOO):
        assert algo._get_policy_from_name(algo, "LMPolicy") is CausalLMActorCriticPolicy
        assert "MlpPolicy" in algo.policy_aliases  # the stock aliases are kept
    assert sb3_textrl.LMPolicy is CausalLMActorCriticPolicy


@pytest.mark.parametrize(
    "algo",
    [
        BaseAlgorithm,
        OnPolicyAlgorithm,
        OffPolicyAlgorithm,
        sb3.SAC,
        sb3.TD3,
        sb3.DDPG,
        sb3.DQN,
        sb3_contrib.QRDQN,
        sb3_contrib.TQC,
        sb3_contrib.ARS,
        sb3_contrib.CrossQ,
        sb3_contrib.MaskablePPO,
        sb3_contrib.RecurrentPPO,
        GroupOnPolicyAlgorithm,
    ],
)
def test_alias_not_leaked(algo):
    register_policy_alias()  # registering twice changes nothing
    assert "LMPolicy" not in algo.policy_aliases
    if algo is not BaseAlgorithm:
        with pytest.raises(ValueError, match="LMPolicy"):
            algo._get_policy_from_name(algo, "LMPolicy")


# with gradients: the training path (one forward per episode); without: the rollout path (KV cache)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_log_probs_match_hand_computation(tiny_lm_path, grad):
    env = make_env(tiny_lm_path)
    policy = make_policy(env)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()  # an independent copy
    steps = [step for episode in collect_episodes(env, 4) for step in episode]
    obs, actions = stack(steps)
    with th.set_grad_enabled(grad):
        values, log_prob, entropy = policy.evaluate_actions(obs, actions)
        sampled, _, sampled_log_prob = policy(obs)
    assert log_prob.requires_grad == grad
    assert values.shape == (len(steps), 1) and log_prob.shape == (len(steps),) and entropy.shape == (len(steps),)
    assert sampled.shape == (len(steps),) and sampled.dtype == th.int64
    for i, (o, action) in enumerate(steps):
        logp = th.log_softmax(hand_logits(lm, o), dim=-1)
        assert log_prob[i].item() == pytest.approx(logp[action].item(), abs=1e-5)
        assert sampled_log_prob[i].item() == pytest.approx(logp[sampled[i]].item(), abs=1e-5)
        assert entropy[i].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_batched_equals_one_at_a_time(tiny_lm_path, grad):
    env = make_env(tiny_lm_path, max_new_tokens=4)
    policy = make_policy(env)
    with th.no_grad():  # a non-zero value head, so that the values are compared too
        th.nn.init.normal_(policy.value_head.weight, std=1.0)
        policy.value_head.bias.fill_(0.3)
    episodes = collect_episodes(env, 4, seed=7)
    # two episodes from the same prompt share their prompt tokens but not the completion
    episodes += collect_episodes(env, 1, seed=11)
    steps = [step for episode in episodes for step in episode]
    order = np.random.default_rng(0).permutation(len(steps))
    steps = [steps[i] for i in order]
    obs, actions = stack(steps)
    with th.set_grad_enabled(grad):
        values, log_prob, entropy = policy.evaluate_actions(obs, actions)
        predicted_values = policy.predict_values(obs)
        probs = policy.get_distribution(obs).distribution.probs
        ref_log_prob = policy.reference_log_prob(obs, actions)
        for i in range(len(steps)):
            one = {key: value[i : i + 1] for key, value in obs.items()}
            v, lp, ent = policy.evaluate_actions(one, actions[i : i + 1])
            assert values[i].item() == pytest.approx(v.item(), abs=1e-5)
            assert log_prob[i].item() == pytest.approx(lp.item(), abs=1e-5)
            assert entropy[i].item() == pytest.approx(ent.item(), abs=1e-5)
            assert predicted_values[i].item() == pytest.approx(v.item(), abs=1e-5)
            assert ref_log_prob[i].item() == pytest.approx(lp.item(), abs=1e-5)
            th.testing.assert_close(probs[i : i + 1], policy.get_distribution(one).distribution.probs, atol=1e-6, rtol=0)
    assert values.std() > 0.01  # the value head really is non-trivial here
    # the batch needs one forward pass per episode
    rows, cover = covering_rows(obs["input_ids"], obs["attention_mask"])
    assert len(rows) == len(episodes)
    assert cover.shape == (len(steps),)


def test_covering_rows_by_hand():
    input_ids = th.tensor(
        [
            [0, 5, 6, 7, 0],  # episode A, step 2
            [0, 5, 6, 0, 0],  # episode A, step 1 (covered by row 0)
            [0, 5, 8, 0, 0],  # episode B, step 1 (same prompt, other token)
            [9, 5, 6, 0, 0],  # longer prompt: not a prefix of A
            [0, 5, 6, 0, 0],  # exact duplicate of row 1
        ]
    )
    attention_mask = th.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    rows, cover = covering_rows(input_ids, attention_mask)
    assert rows.tolist() == [0, 2, 3]
    assert rows[cover].tolist() == [0, 0, 2, 3, 0]


def test_steps_out_of_order(tiny_llama_path):
    """Steps whose previous step is in the batch but not right before them, as in a shuffled minibatch."""
    env = make_env(tiny_llama_path)
    episodes = collect_episodes(env, 4)
    assert all(len(episode) == 5 for episode in episodes)

    def out_of_order(steps, continued=None):
        obs, _ = stack(steps)
        ids, mask = obs["input_ids"], obs["attention_mask"]
        if continued is not None:
            other = stack(continued)[0]
            continued = (other["input_ids"], other["attention_mask"])
        return steps_out_of_order(ids, mask, covering_rows(ids, mask)[1], continued)

    assert not out_of_order([step for episode in episodes for step in episode])  # EpisodeRolloutBuffer's order
    assert not out_of_order([episode[t] for episode in episodes for t in (0, 2, 4)])  # in order, steps missing
    shuffled = [step for episode in episodes for step in episode]
    shuffled = [shuffled[i] for i in np.random.default_rng(0).permutation(len(shuffled))]
    assert out_of_order(shuffled)  # SB3's order (LMPolicy checks no minibatch that holds the whole rollout)
    assert out_of_order([episode[t] for episode in episodes[:2] for t in (3, 2)])  # step 3 before step 2, twice
    assert not out_of_order([episode[t] for episode in episodes[:1] for t in (3, 2)])  # once: not enough
    # rows that continue episodes begun before the batch's data may have their previous step anywhere
    continued = [episode[3] for episode in episodes[:2]]
    assert not out_of_order([episode[t] for episode in episodes[:2] for t in (3, 2)], continued)


def learn_and_catch(model, total_timesteps):
    """The shuffled-buffer warnings that ``model.learn(total_timesteps)`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.learn(total_timesteps)
    return [w for w in caught if "EpisodeRolloutBuffer" in str(w.message)]


def test_warns_once_on_a_shuffled_buffer(tiny_llama_path):
    model = PPO("LMPolicy", make_env(tiny_llama_path), n_steps=16, batch_size=4, n_epochs=2, seed=0)
    caught = learn_and_catch(model, 32)
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert "`rollout_buffer_class=EpisodeRolloutBuffer`" in str(caught[0].message)
    assert caught[0].filename.endswith("ppo.py")  # from PPO.train(), not from the rollout
    assert not learn_and_catch(model, 32)  # once per policy


@pytest.mark.parametrize(
    "algo, kwargs",
    [(PPO, dict(batch_size=4, n_epochs=2, rollout_buffer_class=EpisodeRolloutBuffer)), (A2C, {})],
    ids=["ppo_episode_buffer", "a2c_whole_rollout"],
)
def test_no_warning_for_whole_episodes(tiny_llama_path, algo, kwargs):
    model = algo("LMPolicy", make_env(tiny_llama_path), n_steps=16, seed=0, **kwargs)
    assert not learn_and_catch(model, 48)


def test_reference_model_is_separate(tiny_llama_path):
    env = make_env(tiny_llama_path)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, device="cpu")
    policy = model.policy
    reference = policy.reference_model
    assert isinstance(reference, LlamaForCausalLM) and reference is not policy.lm
    ref_params = {id(p) for p in reference.parameters()}
    assert ref_params.isdisjoint(id(p) for p in policy.parameters())
    assert all(not p.requires_grad for p in reference.parameters())
    assert not reference.training
    optimizer_params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    assert ref_params.isdisjoint(id(p) for p in optimizer_params)
    assert {id(p) for p in optimizer_params} == {id(p) for p in policy.parameters()}
    keys = set(policy.state_dict())
    expected = {f"lm.{k}" for k in policy.lm.state_dict()} | {"value_head.weight", "value_head.bias"}
    assert keys == expected
    # the same weights, but not the same tensors
    for (name, p), (ref_name, q) in zip(policy.lm.named_parameters(), reference.named_parameters()):
        assert name == ref_name
        assert th.equal(p, q) and p.data_ptr() != q.data_ptr()
    # .to() moves the reference model too and keeps everything working
    assert policy.to("cpu") is policy
    assert next(reference.parameters()).device == th.device("cpu")
    obs, actions = stack([step for episode in collect_episodes(env, 1) for step in episode])
    _, log_prob, _ = policy.evaluate_actions(obs, actions)
    th.testing.assert_close(policy.reference_log_prob(obs, actions), log_prob.detach(), atol=1e-5, rtol=0)
    policy.set_training_mode(True)
    assert not reference.training


def test_no_reference_model(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env, use_reference_model=False)
    assert policy.reference_model is None
    obs, actions = stack([step for episode in collect_episodes(env, 1) for step in episode])
    with pytest.raises(ValueError, match="reference model"):
        policy.reference_log_prob(obs, actions)
    with pytest.raises(ValueError, match="reference model"):
        PPO("LMPolicy", env, n_steps=8, batch_size=8, policy_kwargs=dict(use_reference_model=False)).learn(
            8, callback=sb3_textrl.KLPenaltyCallback(0.1)
        )


def test_value_head_starts_at_zero(tiny_lm_path):
    env = make_env(tiny_lm_path)
    policy = make_policy(env)
    assert isinstance(policy.value_head, th.nn.Linear) and policy.value_head.out_features == 1
    assert not policy.value_head.weight.any() and not policy.value_head.bias.any()
    obs, actions = stack([step for episode in collect_episodes(env, 2) for step in episode])
    with th.no_grad():
        assert not policy.predict_values(obs).any()
        assert not policy.evaluate_actions(obs, actions)[0].any()


def test_model_from_env_or_policy_kwargs(tiny_llama_path, tiny_gpt2_path, tmp_path):
    env = make_env(tiny_llama_path)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8)
    assert model.policy.model_name_or_path == tiny_llama_path
    assert isinstance(model.policy.lm, LlamaForCausalLM)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    for p, q in zip(model.policy.lm.parameters(), loaded.parameters()):
        assert th.equal(p, q)
    # another LM with the same tokenizer (e.g. a fine-tuned export) overrides the env's
    other = str(tmp_path / "other")
    with th.no_grad():
        for p in loaded.parameters():
            p.add_(0.01)
    loaded.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(other)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, policy_kwargs=dict(model_name_or_path=other))
    assert model.policy.model_name_or_path == other
    assert th.equal(next(model.policy.lm.parameters()), next(loaded.parameters()))
    assert th.equal(next(model.policy.reference_model.parameters()), next(loaded.parameters()))
    model.learn(8)
    # both tiny LMs have 300 logits, but the GPT-2 one has another tokenizer: the same ids would mean other text
    with pytest.raises(ValueError, match=r"model_name_or_path.*tokenizers differ"):
        PPO("LMPolicy", env, n_steps=8, batch_size=8, policy_kwargs=dict(model_name_or_path=tiny_gpt2_path))


def test_no_model_name(tiny_llama_path):
    env = make_env(tiny_llama_path)
    box = gym.spaces.Box(0, 299, (env.unwrapped.max_length,), np.int64)
    with pytest.raises(ValueError, match="model_name_or_path"):
        LMPolicy(box, env.action_space, lambda _: 1e-3)
    # a plain Box of token ids works once the LM is named
    policy = LMPolicy(box, env.action_space, lambda _: 1e-3, model_name_or_path=tiny_llama_path)
    obs, _ = env.reset(seed=0)
    ids = th.as_tensor(obs["input_ids"][obs["attention_mask"] == 1])[None]
    dist = policy.get_distribution(ids)
    expected = th.log_softmax(hand_logits(policy.lm, obs), dim=-1)
    th.testing.assert_close(dist.distribution.logits[0].detach(), expected, atol=1e-5, rtol=0)


def test_vocabulary_mismatch(tiny_llama_path, tiny_llama_320_path):
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match="model_name_or_path"):
        PPO("LMPolicy", env, policy_kwargs=dict(model_name_or_path=tiny_llama_320_path))
    env_320 = make_env(tiny_llama_320_path)
    with pytest.raises(ValueError, match="model_name_or_path"):
        PPO("LMPolicy", env_320, policy_kwargs=dict(model_name_or_path=tiny_llama_path))


def test_no_dropout_in_training_mode(tiny_gpt2_path):
    env = make_env(tiny_gpt2_path)
    policy = make_policy(env)
    assert policy.lm.config.resid_pdrop > 0  # this LM has dropout layers
    obs, actions = stack([step for episode in collect_episodes(env, 2) for step in episode])
    policy.set_training_mode(True)
    assert policy.training and policy.value_head.training
    assert not any(module.training for module in policy.lm.modules())
    th.manual_seed(0)
    _, log_prob_1, _ = policy.evaluate_actions(obs, actions)
    _, log_prob_2, _ = policy.evaluate_actions(obs, actions)
    th.testing.assert_close(log_prob_1, log_prob_2, atol=0, rtol=0)
    policy.set_training_mode(False)
    th.testing.assert_close(policy.evaluate_actions(obs, actions)[1], log_prob_1, atol=1e-6, rtol=0)
    # control: with dropout on, the same forward passes differ
    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).train()
    ids = obs["input_ids"][:1][:, obs["attention_mask"][0] == 1]
    assert not th.equal(lm(input_ids=ids).logits, lm(input_ids=ids).logits)


@pytest.mark.parametrize("n_envs", [1, 3])
def test_predict(tiny_lm_path, n_envs):
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(lambda: make_env(tiny_lm_path), n_envs=n_envs, seed=0)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()
    obs = env.reset()
    for _ in range(3):
        actions, state = model.predict(obs, deterministic=True)
        assert state is None
        assert actions.shape == (n_envs,)
        for i in range(n_envs):
            one = {key: value[i] for key, value in obs.items()}
            assert actions[i] == int(hand_logits(lm, one).argmax())
            # a single (non-vectorised) observation gives a single action
            single, _ = model.predict(one, deterministic=True)
            assert single.shape == () and single == actions[i]
        sampled, _ = model.predict(obs, deterministic=False)
        assert sampled.shape == (n_envs,) and all(0 <= a < 300 for a in sampled)
        obs, *_ = env.step(actions)


def test_sampling_follows_the_distribution(tiny_llama_path):
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    obs, _ = env.reset(seed=0)
    batch = {key: th.as_tensor(np.repeat(value[None], 4000, axis=0)) for key, value in obs.items()}
    th.manual_seed(0)
    with th.no_grad():
        actions, _, _ = policy(batch)
    probs = th.softmax(hand_logits(policy.lm, obs), dim=-1)
    counts = th.bincount(actions, minlength=300).float() / 4000
    # near uniform at init: the empirical frequencies match the softmax
    assert (counts - probs).abs().max() < 0.01
    assert len(actions.unique()) > 200


def test_gradients_released_after_each_step(tiny_llama_path):
    """The optimizer frees the gradients once it has stepped, so they do not sit next to the next forward's activations."""
    env = make_env(tiny_llama_path)
    policy = make_policy(env)
    steps = [step for episode in collect_episodes(env, 2) for step in episode]
    obs, actions = stack(steps)
    before = [p.detach().clone() for p in policy.lm.parameters()]
    _, log_prob, _ = policy.evaluate_actions(obs, actions)
    policy.optimizer.zero_grad()
    (-log_prob.mean()).backward()
    assert all(p.grad is not None for p in policy.lm.parameters())
    policy.optimizer.step()
    assert all(p.grad is None for p in policy.parameters())
    assert any(not th.equal(a, p) for a, p in zip(before, policy.lm.parameters()))  # the step used them first
