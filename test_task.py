"""
Tests of task.py: a task of your own, defined here, through the whole recipe (its pairs, its reward
as PPO's score, Best-of-N's pick and the judge, its validity), the defaults a task may leave out,
bad task specs, and the prompt ids a sample continues.
"""
import random
import re
import sys

import pytest

import data
import rlhf
import train
from conftest import read_metrics, run_train, stage_inputs
from model import ScalarGPT
from task import Task, load_task, prompt_ids

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon",
         "Kim", "Lou", "Max", "Ned", "Oli", "Pam", "Quy", "Rex", "Sue", "Tom"]


def excitement(prompt, response):
    """The toy task's exact reward: the number of '!' in the response."""
    return float(response.count("!"))


def polite(prompt, response):
    """The toy task's validity: the response greets the name the prompt asks for."""
    return response.startswith(" hi " + prompt.split()[-1])


def exclaim(seed):
    """A toy task of one's own: 'Say hi to NAME' -> ' hi NAME!!', better with more '!'. Three pairs
    per name, chosen with k+1 exclamation marks against k; no held-out pairs, SFT texts or prompts
    of its own, so the recipe fills them in."""
    rng = random.Random(seed)
    pairs = [{"prompt": f"Say hi to {n}", "chosen": f" hi {n}" + "!" * (k + 1), "rejected": f" hi {n}" + "!" * k}
             for n in NAMES for k in rng.sample(range(4), 3)]
    return Task(name="exclaim", pairs=pairs, reward=excitement, is_valid=polite)


def not_a_task(seed):
    return {"pairs": []}


def test_a_task_of_your_own_gets_the_defaults_it_leaves_out(tmp_path, monkeypatch):
    """exclaim gives only pairs, a reward and a validity check. 20 names x 3 pairs = 60 pairs; the
    held-out split takes ceil(0.05 x 20) = 1 whole prompt (3 pairs) and leaves 57; SFT trains on the
    57 chosen responses; the held-out prompts are that one prompt; the judge is its reward (the
    response with more '!' wins, equal counts tie)."""
    cfg, run, d = stage_inputs(tmp_path, "--task=test_task:exclaim")
    t = d.task
    assert (len(t.pairs), len(t.val_pairs)) == (57, 3) and len({p["prompt"] for p in t.val_pairs}) == 1
    assert t.sft == [(p["prompt"], p["chosen"]) for p in t.pairs] and t.prompts == [t.val_pairs[0]["prompt"]]
    assert not {p["prompt"] for p in t.pairs} & set(t.prompts)
    assert d.judge_name == "exclaim.reward" and d.eval_prompts == t.prompts * 8  # cycled to --eval_samples=8
    assert [d.judge("p", " hi!!", " hi!"), d.judge("p", " hi", " hi!"), d.judge("p", "!", "!")] == [0, 1, None]
    fixed = exclaim(cfg.seed)  # a task function may hand out the same object twice: it is never changed
    monkeypatch.setattr(sys.modules[__name__], "exclaim", lambda seed: fixed)
    assert load_task(cfg).pairs == t.pairs and fixed.val_pairs is None and len(fixed.pairs) == 60


def test_ppo_best_of_n_and_the_metrics_run_on_a_task_of_your_own(tmp_path):
    """With --task=test_task:exclaim every method that needs a reward runs on the task's: a rollout
    scores each response by excitement() (minus no_eos_penalty = 1 where cut without an end token),
    PPO-GT trains on it, Best-of-N picks by it, and the final evaluation reports the mean reward of
    policy and reference, their share of polite() responses, and the win rate by the task's judge."""
    common = ["--task=test_task:exclaim", "--sft_iters=10", "--max_new_tokens=16", "--eval_samples=4"]
    cfg, run, d = stage_inputs(tmp_path / "unit", *common)
    policy = train.build_policy(cfg, run, d.enc, None)
    prompts = [p for p, _, _ in d.train[:4]]
    ep = rlhf.rollout(cfg, run, d, policy, policy, ScalarGPT.from_model(policy), None, prompts, 0, 1.0)
    texts = [d.enc.decode(ids[m].tolist()) for ids, m in zip(ep.ids, ep.mask)]
    cut = [not t.endswith("<|endoftext|>") for t in texts]
    assert ep.scores.tolist() == [excitement("", t) - c for t, c in zip(texts, cut)]
    ppo = run_train(tmp_path / "ppo", *common, "--method=ppo", "--ppo_iters=2", "--rollout_batch=8", "--ppo_minibatch=4")
    assert {"policy_reward", "reference_reward", "valid_fraction", "reference_valid_fraction", "win_rate", "kl"} <= set(ppo)
    assert [r["step"] for r in read_metrics(tmp_path / "ppo") if r["stage"] == "ppo"] == [1, 2]
    bon = run_train(tmp_path / "bon", *common, "--method=best_of_n", "--best_of=4")
    assert {"policy_reward", "valid_fraction", "win_rate", "kl_bound"} <= set(bon)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "--task=no_such_module_xyz:make: cannot load it"),
    ("test_task:no_such_function", "--task=test_task:no_such_function: cannot load it"),
    ("test_task:not_a_task", "--task=test_task:not_a_task: returned dict, not a task.Task"),
    ("test_task", "bad value for --task: 'test_task' (must be module:name)"),
])
def test_bad_tasks_name_themselves(tmp_path, spec, message):
    """A task that cannot be imported, does not exist, returns something else, or is not module:name
    stops the run with one line naming it."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_train(tmp_path, f"--task={spec}")


def test_prompt_ids_keep_the_end_of_a_long_prompt():
    """Byte tokens: 'abcdef' with room for 4 tokens keeps 'cdef' (a response continues the end of
    its prompt); a short prompt is kept whole; an empty one becomes [eot] = [256]."""
    enc = data.get_tokenizer("bytes")
    assert prompt_ids(enc, "abcdef", 4) == list(b"cdef")
    assert prompt_ids(enc, "ab", 4) == list(b"ab")
    assert prompt_ids(enc, "", 4) == [256]
