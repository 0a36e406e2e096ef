"""
Data for DPO: preference pairs from files, tokenization, padding, splits and
resumable batches. (The embedded task with an exact reward is reviews.py.)

A pair is a dict {"prompt": str, "chosen": str, "rejected": str}. Responses
keep their leading space (" Sure, ...") because BPE tokens carry it.
"""

import base64
import binascii
import gzip
import hashlib
import json
import math
import os
import random
import zlib
from collections import Counter

import tiktoken
import torch


ASSISTANT = "\n\nAssistant:"
ROLE_TAGS = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


# -----------------------------------------------------------------------------
# loading preference pairs

def load_pairs(path, verbose=True):
    """Load preference pairs from .jsonl, .jsonl.gz, .json (a list) or .json.gz.

    The format is detected per record:
      explicit       {"prompt", "chosen", "rejected"} strings, used verbatim.
      implicit (HH)  {"chosen", "rejected"} whole dialogues. The prompt is the
                     part both share, up to and including the last "\\n\\nAssistant:"
                     inside that shared part; the responses are what follows.
                     (Taking the prompt from each side's own last Assistant turn
                     goes wrong when a response itself holds a later
                     "\\n\\nAssistant:" turn: 5 pairs in harmless-base-test. The
                     shared prefix gives both sides the same, true prompt, so
                     those pairs are kept and counted in the summary.) If the
                     dialogues differ before any shared Assistant turn, the pair
                     is skipped as "prompt_mismatch".
      conversational "prompt" (optional), "chosen", "rejected" as lists of
                     {"role", "content"} messages. prompt + chosen and prompt +
                     rejected must each end with an assistant message and agree
                     on everything before it (else "prompt_mismatch"). Template:
                     each message renders as "\\n\\nHuman: {content}" (user/human),
                     "\\n\\nAssistant: {content}" or "\\n\\nSystem: {content}"; the
                     prompt ends with "\\n\\nAssistant:"; a response is " " + the
                     final assistant content.
    Pairs with an empty (whitespace-only) response or chosen == rejected are
    skipped and counted. Bad input raises ValueError naming file, line (or
    record index for .json) and field; a missing file raises FileNotFoundError.
    """
    path = str(path)
    return parse_pairs(_read_records(path), path, verbose)


def parse_pairs(records, source, verbose=True):
    """(where, record) pairs in any of load_pairs' formats -> explicit pairs, with the same skips and
    checks; `source` (a file, or a task) and `where` name a bad record."""
    pairs, skipped, later_turns = [], Counter(), 0
    for where, record in records:
        try:
            prompt, chosen, rejected = _parse_record(record)
        except _Skip as skip:
            skipped[skip.args[0]] += 1
            continue
        except ValueError as e:
            raise ValueError(f"{source}: {where}: {e}") from None
        if not chosen.strip() or not rejected.strip():
            skipped["empty_response"] += 1
        elif chosen == rejected:
            skipped["identical"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            later_turns += ASSISTANT in chosen or ASSISTANT in rejected
    counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    summary = f"loaded {len(pairs)} pairs from {os.path.basename(source) if os.path.isfile(source) else source} " \
              f"(skipped {sum(skipped.values())}{': ' + counts if counts else ''})"
    if later_turns:
        summary += f"; {later_turns} kept with a later Assistant turn inside a response"
    if not pairs:
        raise ValueError(f"{source}: no usable pairs ({summary})")
    if verbose:
        print(summary)
    return pairs


class _Skip(Exception):  # a record to count and drop; args[0] is the reason
    pass


def _read_records(path):
    """-> list of (where, record); where is 'line N' (1-based) or 'record N' (0-based index)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    base = path[:-3] if path.endswith(".gz") else path
    if not base.endswith((".jsonl", ".json")):
        raise ValueError(f"{path}: unknown file type (expected .jsonl, .jsonl.gz, .json or .json.gz)")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({type(e).__name__}: {e})") from None
    if base.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [(f"record {i}", r) for i, r in enumerate(data)]
    else:
        records = []
        # split on "\n" only: str.splitlines would also break on U+2028 inside strings
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not records:
        raise ValueError(f"{path}: empty file (no records)")
    return records


def _parse_record(rec):
    """One record -> (prompt, chosen, rejected). ValueError names the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "chosen" not in rec and "rejected" not in rec:
        raise ValueError(f"unknown record format: no fields 'chosen' and 'rejected' (fields: {sorted(rec)})")
    for field in ("chosen", "rejected"):
        if field not in rec:
            raise ValueError(f"missing field '{field}'")
        if not isinstance(rec[field], (str, list)):
            raise ValueError(f"field '{field}': expected a string or a list of messages, "
                             f"got {type(rec[field]).__name__}")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if type(chosen) is not type(rejected):
        raise ValueError(f"field 'rejected': got {type(rejected).__name__} but 'chosen' is {type(chosen).__name__}")
    if isinstance(chosen, list):
        prompt = rec.get("prompt", [])
        if not isinstance(prompt, list):
            raise ValueError(f"field 'prompt': expected a list of messages, got {type(prompt).__name__}")
        return _render_conversation(prompt, chosen, rejected)
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError(f"field 'prompt': expected a string, got {type(rec['prompt']).__name__}")
        return rec["prompt"], chosen, rejected
    return _split_dialogues(chosen, rejected)


def _split_dialogues(chosen, rejected):
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            if ASSISTANT not in text:
                raise ValueError(f"field '{field}': no '\\n\\nAssistant:' turn in a dialogue")
        raise _Skip("prompt_mismatch")
    n = cut + len(ASSISTANT)
    return chosen[:n], chosen[n:], rejected[n:]


def _render_conversation(prompt, chosen, rejected):
    head = _messages(prompt, "prompt")
    full_c, full_r = head + _messages(chosen, "chosen"), head + _messages(rejected, "rejected")
    for field, full in (("chosen", full_c), ("rejected", full_r)):
        if not full or full[-1][0] != "Assistant":
            raise ValueError(f"field '{field}': the conversation must end with an assistant message")
    if full_c[:-1] != full_r[:-1]:
        raise _Skip("prompt_mismatch")
    text = "".join(f"\n\n{tag}: {content}" for tag, content in full_c[:-1])
    return text + ASSISTANT, " " + full_c[-1][1], " " + full_r[-1][1]


def _messages(msgs, field):
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"field '{field}[{i}]': expected a message object, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"field '{field}[{i}].{key}': expected a string, got {type(m.get(key)).__name__}")
        if m["role"] not in ROLE_TAGS:
            raise ValueError(f"field '{field}[{i}].role': unknown role {m['role']!r} (expected {sorted(ROLE_TAGS)})")
        out.append((ROLE_TAGS[m["role"]], m["content"]))
    return out


# -----------------------------------------------------------------------------
# tokenization and padding

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split (tiktoken's r50k_base pattern)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name):
    """'bytes' (UTF-8 bytes, eot = 256), a path to a .tiktoken file (GPT-2 split,
    eot = number of ranks), or a tiktoken encoding name (needs network once)."""
    name = str(name)
    if name == "bytes":
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: 256}, explicit_n_vocab=257)
    if name.endswith(".tiktoken"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such .tiktoken file")
        ranks = read_tiktoken_ranks(name)
        return tiktoken.Encoding(os.path.basename(name)[:-len(".tiktoken")], pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"cannot load tiktoken encoding {name!r} ({type(e).__name__}: {e}). "
                         f"Offline, pass 'bytes' or a .tiktoken file, "
                         f"e.g. a local copy of GPT-2's ranks, gpt2.tiktoken") from e


def read_tiktoken_ranks(path):
    """A .tiktoken file: one 'base64(token bytes) rank' per line. Read here, not by tiktoken's
    loader, so the file on disk now is the vocabulary used (a replaced file is a new vocabulary)."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}: line {n}: expected 'base64-token rank', got {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{path}: empty .tiktoken file (no tokens)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE encodes any text only if every single byte is a token
        raise ValueError(f"{path}: {len(missing)} of the 256 single bytes have no rank (byte {missing[0]} first)")
    return ranks


def file_digest(path):
    """sha256 of a file's bytes: what a resumed run checks its data and tokenizer files against."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenize_pairs(pairs, enc, block_size, min_prompt_tokens=8, verbose=True):
    """Pairs -> list of (prompt_ids, chosen_ids, rejected_ids).

    Prompt and responses are encoded separately (no merge across the boundary)
    and each response gets an appended eot, so the model learns to stop. An
    empty prompt becomes [eot]: the first response token needs something to
    condition on. If prompt + the longer response exceeds block_size, the
    prompt is cut from its start (its end is what the response continues) but
    kept to at least min_prompt_tokens (at least 1); if still too long, both
    responses are cut from their end, which may drop the eot.
    """
    eot, out, cuts, skipped = enc.eot_token, [], Counter(), Counter()
    prompts, chosen, rejected = (encode(enc, [x[k] for x in pairs]) for k in ("prompt", "chosen", "rejected"))
    for p, c, r in zip(prompts, chosen, rejected):
        fitted = _fit(p or [eot], [c + [eot], r + [eot]], block_size, min_prompt_tokens, cuts)
        if fitted is None:
            skipped["no_room"] += 1
        elif fitted[1][0] == fitted[1][1]:
            skipped["identical"] += 1
        else:
            out.append((fitted[0], *fitted[1]))
    if verbose:
        _report("pairs", out, block_size, cuts, skipped)
    return out


def tokenize_sft(items, enc, block_size, min_prompt_tokens=8, verbose=True):
    """(prompt, response) strings -> list of (prompt_ids, response_ids), with the
    same encoding, appended eot and truncation as tokenize_pairs."""
    eot, out, cuts, skipped = enc.eot_token, [], Counter(), Counter()
    prompts, responses = encode(enc, [p for p, _ in items]), encode(enc, [r for _, r in items])
    for p, r in zip(prompts, responses):
        fitted = _fit(p or [eot], [r + [eot]], block_size, min_prompt_tokens, cuts)
        if fitted is None:
            skipped["no_room"] += 1
        else:
            out.append((fitted[0], fitted[1][0]))
    if verbose:
        _report("sequences", out, block_size, cuts, skipped)
    return out


def encode(enc, texts):
    """Token ids of many texts, each distinct text encoded once (pairs often share a prompt). One
    at a time: tiktoken's threaded batch encoder measured slower here (bench.py --real)."""
    ids = {}
    return [ids[t] if t in ids else ids.setdefault(t, enc.encode_ordinary(t)) for t in texts]


def _fit(p, responses, block_size, min_prompt_tokens, cuts):
    """Make prompt + each response fit block_size: cut the prompt from its start
    down to min_prompt_tokens (at least 1), then the responses from their end.
    Counts the cuts in `cuts`; returns None when no response token fits."""
    longest = max(map(len, responses))
    if len(p) + longest > block_size:
        keep = max(block_size - longest, min(max(1, min_prompt_tokens), len(p)))
        if keep < len(p):
            p, cuts["prompt"] = p[len(p) - keep:], cuts["prompt"] + 1
    room = block_size - len(p)
    if room < 1:
        return None
    if longest > room:
        responses, cuts["response"] = [x[:room] for x in responses], cuts["response"] + 1
    return p, responses


def _report(what, out, block_size, cuts, skipped):
    counts = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    print(f"tokenized {len(out)} {what} (block_size {block_size}): prompt cut in {cuts['prompt']}, "
          f"responses cut in {cuts['response']}, skipped {sum(skipped.values())}"
          + (f" ({counts})" if counts else ""))


def collate(examples, pad_id):
    """B (prompt, chosen, rejected) triples -> ids (2B, T) long, mask (2B, T) bool.
    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded;
    mask is True exactly on response tokens (incl. the eot)."""
    rows = [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples]
    return _pad(rows, pad_id)


def collate_sft(examples, pad_id):
    """B (prompt_ids, response_ids) pairs -> ids (B, T), mask (B, T) as in collate."""
    return _pad(list(examples), pad_id)


def _pad(rows, pad_id):
    if not rows:
        raise ValueError("cannot collate an empty batch")
    T = max(len(p) + len(r) for p, r in rows)
    ids = [p + r + [pad_id] * (T - len(p) - len(r)) for p, r in rows]
    mask = [[False] * len(p) + [True] * len(r) + [False] * (T - len(p) - len(r)) for p, r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


# -----------------------------------------------------------------------------
# splits and batches

def split_by_prompt(items, val_fraction, seed, key=lambda x: x["prompt"]):
    """-> (train, val), each keeping the input order. Whole prompts go to one
    side: sorted unique prompts are shuffled with Random(seed) and the first
    ceil(val_fraction * n) go to val (at least 1, at most n-1, when n >= 2)."""
    prompts = sorted({key(x) for x in items})
    random.Random(seed).shuffle(prompts)
    n = len(prompts)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, math.ceil(val_fraction * n - 1e-9)), n - 1)
    val_prompts = set(prompts[:n_val])
    train = [x for x in items if key(x) not in val_prompts]
    val = [x for x in items if key(x) in val_prompts]
    return train, val


class Batches:
    """Deterministic shuffled mini-batches, resumable and sharded for DDP.

    Epoch e uses the permutation Random(seed + e) on every rank; each global
    batch of batch_size * world_size items is cut into contiguous slices, rank r
    taking the r-th, so one process with the global batch size sees the same
    items in the same order. The items after the last whole step are dropped. The
    state "pos" is the item offset into the epoch's permutation, the same on
    every rank and independent of how the global batch is sharded.

    With `lengths` (one per example) and group > 1, the epoch's permutation is
    then cut into runs of `group` steps, each run sorted by length and cut into
    steps, each step shuffled within itself and the steps shuffled: a batch
    holds examples of similar length (little padding) and still comes at a
    random point. A step is `step_items`
    examples (default one global batch; with gradient accumulation, all the
    micro-batches of an optimizer step), so one process accumulating k batches
    sees exactly what k processes see in one.
    """

    def __init__(self, examples, batch_size, seed, rank=0, world_size=1, lengths=None, group=0, step_items=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.examples, self.batch_size, self.seed, self.lengths, self.group = examples, batch_size, seed, lengths, group
        self.rank, self.global_size = rank, batch_size * world_size
        self.step_items = step_items or self.global_size
        if batch_size < 1 or self.step_items % self.global_size or len(examples) < self.step_items:
            raise ValueError(f"{len(examples)} examples cannot fill one step of {self.step_items // self.global_size} "
                             f"global batches of {batch_size} x {world_size} ranks = {self.step_items}")
        self.epoch_items = len(examples) // self.step_items * self.step_items  # an epoch is whole steps
        self.steps_per_epoch = self.epoch_items // self.global_size
        self.epoch, self.pos, self._perm = 0, 0, None

    def next(self):
        if self.pos + self.global_size > self.epoch_items:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, self._order(self.epoch))
        start = self.pos + self.rank * self.batch_size
        self.pos += self.global_size
        return [self.examples[i] for i in self._perm[1][start:start + self.batch_size]]

    def _order(self, epoch):
        order, rng = list(range(len(self.examples))), random.Random(self.seed + epoch)
        rng.shuffle(order)
        if self.lengths is None or self.group < 2:
            return order
        unit = self.step_items
        n, run = self.epoch_items, self.group * unit  # the tail stays last
        order[:n] = [i for a in range(0, n, run) for i in sorted(order[a:min(a + run, n)], key=self.lengths.__getitem__)]
        steps = [order[a:a + unit] for a in range(0, n, unit)]
        for step in steps:  # no rank or micro-batch always gets a step's shortest rows
            rng.shuffle(step)
        rng.shuffle(steps)
        return [i for b in steps for i in b] + order[n:]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d):
        if d["pos"] < 0 or d["pos"] % self.global_size:
            raise ValueError(f"pos {d['pos']} is not a multiple of the global batch {self.global_size}")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
