"""LoRA through policy_kwargs: only adapters and the value head train, the reference is the same model with adapters off."""

import os
import zipfile

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from transformers import AutoModelForCausalLM

from sb3_textrl import KLPenaltyCallback
from sb3_textrl.common.buffers import EpisodeRolloutBuffer

peft = pytest.importorskip("peft")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _make_env(path):
    import gymnasium as gym

    return gym.make(
        "sb3_textrl/TextGeneration-v0",
        model_name_or_path=path,
        prompts=["the sun is good", "rain"],
        reward_fn=lambda p, c: [float(len(x)) / 10 for x in c],
        max_new_tokens=4,
    )


def _model(path, **policy_kwargs):
    return PPO(
        "LMPolicy",
        _make_env(path),
        n_steps=16,
        batch_size=16,
        n_epochs=2,
        learning_rate=1e-2,
        seed=0,
        rollout_buffer_class=EpisodeRolloutBuffer,
        policy_kwargs=policy_kwargs,
    )


def test_only_adapters_and_value_head_train(tiny_llama_path):
    model = _model(tiny_llama_path, lora_config=peft.LoraConfig(**LORA))
    policy = model.policy
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("value_head") for name in trainable)
    in_optimizer = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in policy.parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    model.learn(64, callback=KLPenaltyCallback(0.1))
    for name, p in policy.named_parameters():
        if name in base_before:
            assert th.equal(p, base_before[name]), name
    assert any(not th.equal(p, lora_before[n]) for n, p in policy.named_parameters() if n in lora_before)


def test_reference_is_the_base_model(tiny_llama_path):
    """With adapters off the policy's LM gives the base model's log-probs; with adapters on (trained), it differs."""
    model = _model(tiny_llama_path, lora_config=LORA)
    policy = model.policy
    assert policy.reference_model is policy.lm  # no second copy in memory
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    model.learn(64)
    env = _make_env(tiny_llama_path)
    obs, _ = env.reset(seed=0)
    obs_t, _ = policy.obs_to_tensor(obs)
    actions = th.arange(3)
    obs3 = {k: v.repeat(3, 1) for k, v in obs_t.items()}
    ref = policy.reference_log_prob(obs3, actions)
    ids = obs_t["input_ids"][obs_t["attention_mask"].bool()][None]
    expected = th.log_softmax(base(ids).logits[0, -1], dim=-1)[:3]
    th.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    with th.no_grad():
        _, log_prob, _ = policy.evaluate_actions(obs3, actions)
    assert not th.allclose(log_prob, ref, atol=1e-4)  # the adapters changed the policy


def test_lora_save_load_holds_only_trained_tensors(tiny_llama_path, tmp_path):
    model = _model(tiny_llama_path, lora_config=LORA)
    model.learn(32)
    model.save(tmp_path / "lora.zip")
    full = _model(tiny_llama_path)
    full.save(tmp_path / "full.zip")
    with zipfile.ZipFile(tmp_path / "lora.zip") as z:
        lora_policy = z.getinfo("policy.pth").file_size
    with zipfile.ZipFile(tmp_path / "full.zip") as z:
        full_policy = z.getinfo("policy.pth").file_size
    assert lora_policy < full_policy / 4
    loaded = PPO.load(tmp_path / "lora.zip")
    env = _make_env(tiny_llama_path)
    obs, _ = env.reset(seed=1)
    for _ in range(4):
        a1, _ = model.predict(obs, deterministic=True)
        a2, _ = loaded.predict(obs, deterministic=True)
        assert a1 == a2
        obs, _, done, _, _ = env.step(a1)
        if done:
            break
    original = {n: p for n, p in model.policy.state_dict().items()}
    for name, value in loaded.policy.state_dict().items():
        th.testing.assert_close(value, original[name])


def test_lora_save_pretrained_merges(tiny_llama_path, tmp_path):
    model = _model(tiny_llama_path, lora_config=LORA)
    model.learn(32)
    out = tmp_path / "export"
    model.policy.save_pretrained(str(out))
    assert os.path.isfile(out / "value_head.pt")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = th.tensor([[1, 20, 30, 40]])
    with th.no_grad():
        np.testing.assert_allclose(exported(ids).logits.numpy(), model.policy.lm(ids).logits.numpy(), atol=1e-5)


def test_bad_lora_config(tiny_llama_path):
    with pytest.raises(ValueError, match="lora_config"):
        _model(tiny_llama_path, lora_config="rank 4")
