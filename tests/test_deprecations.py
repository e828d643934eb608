"""No deprecated transformers API in sb3_textrl's own calls.

The policy's paths (rollouts on the KV cache with prefix sharing, packed and padded training passes with activation
checkpointing, reference log-probabilities, evaluation with ``generate``) run on the tiny LMs with ``FutureWarning``
and ``DeprecationWarning`` turned into errors (``pyproject.toml`` ignores ``DeprecationWarning`` for the suite: the
marks below override that here), and with the deprecation notes transformers *logs* instead of warning (reading
``output.past_key_values``) recorded and refused. A failure's traceback leads to the call that used the old API.

transformers' own calls into its own code (``generate`` calling the model, a model calling its layers) use its current
API: no filter is needed for them. The one exception found, filtered below by its message, is peft reading
``model.is_gradient_checkpointing`` in ``get_peft_model`` (a LoRA policy): peft's call, not ours, and not caused by
our arguments.
"""

import logging
import warnings

import numpy as np
import pytest
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers.utils import logging as hf_logging

from sb3_textrl import EpisodeRolloutBuffer, KLPenaltyCallback
from sb3_textrl.common.evaluation import evaluate_prompts
from sb3_textrl.lm import kv_cache, packing
from sb3_textrl.lm.loading import load_causal_lm
from sb3_textrl.lm.prefix_sharing import shared_prefix_length
from sb3_textrl.policies import LMPolicy

ENV_ID = "sb3_textrl/TextGeneration-v0"
SYSTEM_PROMPT = "You are a helpful assistant who writes short sentences."
# a long common opening, so that the LM without a chat template (GPT-2) shares a prefix too
PROMPTS = [
    "Please answer in one short sentence: write one sentence about rain.",
    "Please answer in one short sentence: hi",
    "Please answer in one short sentence: the sun",
]

# every test here: deprecation warnings are errors (marks closer to the test than pyproject's "ignore" take precedence)
pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"), pytest.mark.filterwarnings("error::DeprecationWarning")]


def n_chars(prompts, completions):
    return [float(len(c)) for c in completions]


@pytest.fixture
def deprecation_logs():
    """The deprecation notes that transformers logs (``logger.warning_once``) during the test, recorded."""
    records: list[logging.LogRecord] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecat" in record.getMessage().lower():
                records.append(record)

    logger, verbosity, recorder = hf_logging.get_logger(), hf_logging.get_verbosity(), Recorder()
    hf_logging.set_verbosity_warning()
    hf_logging.warning_once.cache_clear()  # notes logged once per process: forget those an earlier test logged
    logger.addHandler(recorder)
    try:
        yield records
    finally:
        logger.removeHandler(recorder)
        hf_logging.set_verbosity(verbosity)


def _assert_none_logged(records: list[logging.LogRecord]) -> None:
    assert not records, "transformers logged deprecations: " + "; ".join(r.getMessage() for r in records)


def test_deprecation_warnings_are_errors_here(tiny_llama_path, deprecation_logs):
    """The marks take effect over pyproject's filter, and each way transformers flags the old cache name is caught."""
    for category in (FutureWarning, DeprecationWarning):
        with pytest.raises(category):
            warnings.warn("probe", category)
    base = load_causal_lm(tiny_llama_path).base_model
    ids = th.tensor([[5, 6, 7]])
    with pytest.raises(FutureWarning, match="past_key_values"):
        base(input_ids=ids, past_key_values=None)
    _ = base(input_ids=ids, use_cache=True).past_key_values
    assert any("past_key_values" in r.getMessage() for r in deprecation_logs)


@pytest.mark.parametrize(
    "paths",
    [
        "packed",  # packed training passes, the prefix leading every packed row; new rows packed in the KV cache
        "prefix_apart",  # packed passes with the prefix run apart (read-only cache); new rows as a padded prefill
        "padded",  # padded training passes after the prefix's read-only cache
    ],
)
def test_policy_paths_use_no_deprecated_api(tiny_lm_path, paths, monkeypatch, deprecation_logs):
    if paths == "prefix_apart":
        monkeypatch.setattr(packing, "prefix_leads", lambda p, max_tokens: False)
        monkeypatch.setattr(kv_cache, "_MAX_PACKED_PREFILL", 0)
    env_kwargs = dict(model_name_or_path=tiny_lm_path, prompts=PROMPTS, reward_fn=n_chars, max_new_tokens=4)
    env = make_vec_env(ENV_ID, n_envs=3, seed=0, env_kwargs={**env_kwargs, "system_prompt": SYSTEM_PROMPT})
    obs = env.reset()
    assert shared_prefix_length(th.as_tensor(obs["input_ids"]), th.as_tensor(obs["attention_mask"])) > 0  # shared
    policy_kwargs = dict(activation_checkpointing=True, packing=paths != "padded")
    model = PPO(
        "LMPolicy",
        env,
        n_steps=8,
        batch_size=8,
        n_epochs=1,
        rollout_buffer_class=EpisodeRolloutBuffer,
        policy_kwargs=policy_kwargs,
        device="cpu",
        seed=0,
    )
    kl = KLPenaltyCallback(kl_coef=0.05)  # reference log-probs of each rollout
    model.learn(16, callback=kl)
    evaluate_prompts(model.policy, PROMPTS[:2], reward_fn=n_chars, max_new_tokens=3, n_samples=1)  # generate, reference pass
    _assert_none_logged(deprecation_logs)


def test_rollout_restarts_and_predict_use_no_deprecated_api(tiny_llama_path, deprecation_logs):
    """KV-cache calls where some envs step and others restart (one packed forward), and predict() without a cache."""
    env_kwargs = dict(model_name_or_path=tiny_llama_path, prompts=PROMPTS, reward_fn=n_chars, max_new_tokens=3)
    env = make_vec_env(ENV_ID, n_envs=3, seed=0, env_kwargs={**env_kwargs, "system_prompt": SYSTEM_PROMPT})
    policy = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    policy.set_training_mode(False)
    rng = np.random.default_rng(0)
    obs, n_restarts = env.reset(), 0
    for _ in range(8):
        actions, _ = policy.predict(obs)
        actions = np.where(rng.random(3) < 0.3, policy.tokenizer.eos_token_id, actions)
        obs, _, dones, _ = env.step(actions)
        n_restarts += int(dones.sum())
    assert n_restarts > 0
    no_cache = LMPolicy(env.observation_space, env.action_space, lambda _: 1e-3, use_kv_cache=False)
    no_cache.predict(obs)
    _assert_none_logged(deprecation_logs)


def test_lora_policy_uses_no_deprecated_api(tiny_llama_path, deprecation_logs):
    """A LoRA policy trains and samples with no deprecated call of ours."""
    pytest.importorskip("peft")
    env_kwargs = dict(model_name_or_path=tiny_llama_path, prompts=PROMPTS, reward_fn=n_chars, max_new_tokens=3)
    env = make_vec_env(ENV_ID, n_envs=2, seed=0, env_kwargs=env_kwargs)
    lora = dict(r=2, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        # peft's PeftModel.__init__ reads `model.is_gradient_checkpointing` (transformers' deprecated alias of
        # `is_activation_checkpointing`): peft's own call, which no argument of ours changes
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PPO("LMPolicy", env, n_steps=4, batch_size=4, n_epochs=1, policy_kwargs=dict(lora_config=lora), device="cpu")
    model.learn(8)
    _assert_none_logged(deprecation_logs)
