"""
The embedded task, "reviews": continue a movie review; the reward counts its sentiment exactly.

After the DPO paper's IMDb experiment (continue a review, preferences by a sentiment classifier),
but with a reward known exactly, so that a CPU run can be judged against the ground truth:
  prompt:   "{opener} the {genre} {felt|was|seemed}"        e.g. "To be fair, the comedy felt"
  response: " " ADJP (JOIN " the" ASPECT "was" ADJP){1,3} "."
            ADJP = ["not " | "very " | "truly "] ADJECTIVE;  JOIN = ", and" | ", but" | " and"
  reward:   +1 per positive adjective, -1 per negative one, the sign flipped by a "not" before it
  is_valid: the response follows the grammar exactly (a byte-level model pushed too far misspells)
16 of the 80 opener-genre combinations are held out: evaluation's prompts never appear in training.
`--data=reviews` (the default) loads make_task, as `--task=reviews:make_task` would.
"""
import random
import re

from task import Task

EOT = "<|endoftext|>"
OPENERS = ["Honestly,", "To be fair,", "In the end,", "I have to say", "Frankly,",
           "Overall,", "For me,", "All in all,", "Truth be told,", "Looking back,"]
GENRES = ["comedy", "thriller", "drama", "sequel", "documentary", "musical", "western", "cartoon"]
VERBS = ["felt", "was", "seemed"]
ASPECTS = ["acting", "plot", "music", "ending", "script", "dialogue", "pacing", "cast"]
POSITIVE = ["superb", "funny", "moving", "clever", "gripping",
            "charming", "brilliant", "delightful", "fresh", "wonderful"]
NEGATIVE = ["dull", "boring", "clumsy", "weak", "flat",
            "tedious", "silly", "awful", "bland", "predictable"]
INTENSIFIERS = ["very", "truly"]
JOINERS = [", and", ", but", " and"]
P_NOT, P_INTENSIFIER = 0.15, 0.2


def _any(words):
    return "(?:" + "|".join(map(re.escape, words)) + ")"


_ADJP = f"(?:{_any(['not'] + INTENSIFIERS)} )?{_any(POSITIVE + NEGATIVE)}"
_CLAUSE = f"{_any(JOINERS)} the {_any(ASPECTS)} was {_ADJP}"
_VALID = re.compile(f" {_ADJP}(?:{_CLAUSE}){{1,3}}\\.")
_SIGN = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


def reward(prompt, response):
    """Lexicon judge: +1 per positive adjective, -1 per negative one, sign
    flipped when the word right before it is "not". Word-level and
    case-insensitive, so any text (even garbage) gets a finite score. The
    prompt is accepted for API generality and ignored."""
    words = re.findall(r"[a-z]+", str(response).lower())
    return float(sum(_SIGN[w] * (-1 if i and words[i - 1] == "not" else 1)
                     for i, w in enumerate(words) if w in _SIGN))


def is_valid(prompt, response):
    """True iff the response (a trailing <|endoftext|> is allowed) follows the grammar exactly. The
    prompt is accepted for the task interface and ignored."""
    if not isinstance(response, str):
        return False
    if response.endswith(EOT):
        response = response[:-len(EOT)]
    return _VALID.fullmatch(response) is not None


def _adjective_phrase(rng, p_positive):
    positive = rng.random() < p_positive  # the sentiment this phrase expresses
    if rng.random() < P_NOT:  # "not" + an adjective of the opposite sign
        return "not " + rng.choice(NEGATIVE if positive else POSITIVE)
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    return f"{rng.choice(INTENSIFIERS)} {word}" if rng.random() < P_INTENSIFIER else word


def sample_response(rng):
    """One response; its latent tone p_positive ~ Uniform(0, 1), so every sentiment occurs."""
    tone = rng.random()
    parts = [" " + _adjective_phrase(rng, tone)]
    for aspect in rng.sample(ASPECTS, rng.randint(1, 3)):
        parts.append(f"{rng.choice(JOINERS)} the {aspect} was {_adjective_phrase(rng, tone)}")
    return "".join(parts) + "."


def make_task(seed=0, n_sft=20000, n_pairs=10000, n_val_pairs=500, n_eval_prompts=256):
    """The reviews task. 16 of the 80 opener x genre combinations (2 per genre,
    each opener at most twice; all 3 verbs -> 48 prompts) are held out: val
    pairs and eval prompts use only those, sft and train pairs never do.
    A pair is two independent responses to one prompt, chosen = higher reward,
    ties dropped. Eval prompts cycle through the shuffled held-out prompts. Batches are not
    length-grouped: with it, the reference wrote less valid text (0.87 against 0.96 of samples)."""
    rng = random.Random(seed)
    shift = rng.randrange(len(OPENERS))
    held = {(OPENERS[(g + shift + k) % len(OPENERS)], genre) for g, genre in enumerate(GENRES) for k in (0, 1)}
    train_prompts, held_prompts = [], []
    for opener in OPENERS:
        for genre in GENRES:
            for verb in VERBS:
                prompt = f"{opener} the {genre} {verb}"
                (held_prompts if (opener, genre) in held else train_prompts).append(prompt)

    def pairs(prompts, n):
        out = []
        while len(out) < n:
            prompt, a, b = rng.choice(prompts), sample_response(rng), sample_response(rng)
            ra, rb = reward(prompt, a), reward(prompt, b)
            if ra != rb:
                chosen, rejected = (a, b) if ra > rb else (b, a)
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    sft = [(rng.choice(train_prompts), sample_response(rng)) for _ in range(n_sft)]
    train, val = pairs(train_prompts, n_pairs), pairs(held_prompts, n_val_pairs)
    rng.shuffle(held_prompts)
    eval_prompts = [held_prompts[i % len(held_prompts)] for i in range(n_eval_prompts)]
    return Task(name="reviews", pairs=train, reward=reward, is_valid=is_valid, val_pairs=val, prompts=eval_prompts,
                sft=sft, length_grouped=False)
