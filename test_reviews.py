"""
Tests of reviews.py, the embedded task: its reward and grammar by hand, and the task it builds.
"""
import math
import random

import reviews


def test_reward_by_hand_and_garbage():
    """funny +1, "not dull" -> -(-1) = +1: total +2. "very awful" -1, "not
    superb" -1, "boring" -1: -3. Case-insensitive words; "notfunny" is no word
    (0). Garbage scores finitely and is invalid; the grammar examples are valid."""
    assert reviews.reward("p", " funny, and the plot was not dull.") == 2.0
    assert reviews.reward("p", " very awful, but the acting was not superb and the cast was boring.") == -3.0
    assert reviews.reward("", "FUNNY funny notfunny") == 2.0
    for junk in ["", "\x00\ufffd garbage!!", "not not not", "🎬" * 50, " funny funny funny."]:
        assert math.isfinite(reviews.reward("p", junk)) and not reviews.is_valid("", junk)
    assert reviews.is_valid("", " funny, and the plot was not dull.")
    assert reviews.is_valid("", " funny, and the plot was not dull.<|endoftext|>")


def test_corrupted_responses_are_invalid():
    """300 seeded sft responses, each corrupted once. Changing one character to a different one
    always breaks the grammar (every character is fixed by it): 300 of 300 invalid. Dropping a word
    keeps the response valid exactly when the word was an optional "not", "very" or "truly"
    (asserted case by case); with this seed that happens 22 times: 278 of 300 invalid."""
    rng = random.Random(0)
    responses = [r for _, r in reviews.make_task(seed=1, n_sft=300, n_pairs=0, n_val_pairs=0).sft]
    changed = []
    for r in responses:
        i = rng.randrange(len(r))
        changed.append(r[:i] + rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz ,." if c != r[i]]) + r[i + 1:])
    assert sum(not reviews.is_valid("", c) for c in changed) == 300
    invalid = 0
    for r in responses:
        words = r.split(" ")
        i = rng.randrange(1, len(words))
        valid = reviews.is_valid("", " ".join(words[:i] + words[i + 1:]))
        assert valid == (words[i] in ("not", "very", "truly")), (r, words[i])
        invalid += not valid
    assert invalid == 278


def test_make_task_is_deterministic_valid_and_ranked():
    """Same seed -> identical task, other seed -> different. Every generated
    response parses, every pair has chosen reward > rejected reward, counts
    match the arguments, and no val or eval prompt is ever a train or sft prompt."""
    t = reviews.make_task(seed=5, n_sft=500, n_pairs=400, n_val_pairs=100, n_eval_prompts=300)
    keys = ("sft", "pairs", "val_pairs", "prompts")
    assert all(getattr(t, k) == getattr(reviews.make_task(5, 500, 400, 100, 300), k) for k in keys)
    assert reviews.make_task(6, 500, 400, 100, 300).pairs != t.pairs
    assert [len(getattr(t, k)) for k in keys] == [500, 400, 100, 300]
    responses = [r for _, r in t.sft] + [p[s] for p in t.pairs + t.val_pairs for s in ("chosen", "rejected")]
    assert all(t.is_valid("", r) for r in responses)
    assert all(t.reward(p["prompt"], p["chosen"]) > t.reward(p["prompt"], p["rejected"]) for p in t.pairs + t.val_pairs)
    seen = {p["prompt"] for p in t.pairs} | {p for p, _ in t.sft}
    assert not seen & ({p["prompt"] for p in t.val_pairs} | set(t.prompts))
    assert all(p.endswith((" felt", " was", " seemed")) for p in seen)


def test_make_task_defaults_are_varied():
    """With the defaults, latent tones give every reward from -4 to +4 in the sft data (a response
    has 1 + 1..3 adjectives, each +-1, so 2..4 of them: |reward| <= 4, odd values from 3); the
    256 eval prompts cycle through all 16 held-out opener x genre combinations x 3 verbs = 48."""
    t = reviews.make_task()
    assert {reviews.reward(p, r) for p, r in t.sft} == {float(x) for x in range(-4, 5)}
    assert len(t.prompts) == 256 and len(set(t.prompts)) == 48
