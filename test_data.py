"""
Tests of data.py, in the order of its code: preference files, tokenizers, tokenization and
truncation, collation, splits and batches. Expected values are derived in each docstring.
"""
import base64
import gzip
import json
import os
import random

import pytest
import tiktoken
import torch

import data


HERE = os.path.dirname(os.path.abspath(__file__))
HH_PATH = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
GPT2_PATH = os.path.join(HERE, "..", "shared", "data", "gpt2-bpe", "gpt2.tiktoken")


# ------------------------------------------------------------------------------------------------
# loading preference pairs

EXPECTED = [
    {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " Go away."},
    {"prompt": "\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:",
     "chosen": " 6", "rejected": " 7"},
]


def _write(path, text):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def test_three_formats_load_to_the_same_pairs(tmp_path):
    """The same two pairs in explicit (.jsonl), implicit HH (.jsonl.gz) and
    conversational (.json, once with a separate prompt, once as whole
    conversations using role "human") form. The HH prompt runs up to and
    including the last "\\n\\nAssistant:", so the responses keep their leading
    space; the template renders "system" as "\\n\\nSystem: ..." and a response as
    " " + the final assistant content. All four files give EXPECTED exactly."""
    explicit = _write(tmp_path / "a.jsonl", _jsonl(EXPECTED))
    implicit = _write(tmp_path / "b.jsonl.gz", _jsonl(
        [{"chosen": e["prompt"] + e["chosen"], "rejected": e["prompt"] + e["rejected"]} for e in EXPECTED]))
    head = [_msgs(("user", "Hi there")),
            _msgs(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("human", "And 3+3?"))]
    answers = [("Hello! How can I help?", "Go away."), ("6", "7")]
    conv = [{"prompt": h, "chosen": _msgs(("assistant", c)), "rejected": _msgs(("assistant", r))}
            for h, (c, r) in zip(head, answers)]
    whole = [{"chosen": h + _msgs(("assistant", c)), "rejected": h + _msgs(("assistant", r))}
             for h, (c, r) in zip(head, answers)]
    conv_path = _write(tmp_path / "c.json", json.dumps(conv))
    whole_path = _write(tmp_path / "d.json", json.dumps(whole))
    for path in (explicit, implicit, conv_path, whole_path):
        assert data.load_pairs(path, verbose=False) == EXPECTED, path


def test_hh_file_loads_with_counted_skips(capsys):
    """harmless-base-test has 2,312 pairs. 4 have an empty chosen response (just
    " ") and are skipped as empty_response, so 2,308 load. In 5 pairs one
    response holds a later "\\n\\nAssistant:" turn of its own (4 chosen, 1
    rejected); the prompt is the shared prefix, so they load and are counted.
    E.g. the pair about drag kings: the shared prompt ends "Isn't that drag
    kings?\\n\\nAssistant:" and the chosen response goes on past another turn."""
    if not os.path.exists(HH_PATH):
        pytest.skip(f"real HH data not found at {HH_PATH} (fresh clone without ../shared)")
    pairs = data.load_pairs(HH_PATH)
    summary = capsys.readouterr().out.strip()
    assert summary == ("loaded 2308 pairs from harmless-base-test.jsonl.gz (skipped 4: empty_response=4); "
                       "5 kept with a later Assistant turn inside a response")
    assert len(pairs) + 4 == 2312
    assert all(p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    assert all(p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"] for p in pairs)
    with_turn = [p for p in pairs if "\n\nAssistant:" in p["chosen"] + p["rejected"]]
    assert len(with_turn) == 5
    drag = [p for p in with_turn if p["prompt"].endswith("Isn't that drag kings?\n\nAssistant:")]
    assert len(drag) == 1 and drag[0]["chosen"].startswith(" No. Men who impersonate")
    assert drag[0]["rejected"].startswith(" A drag king is the opposite")


BAD_INPUTS = [  # (file name, content, substrings the error must contain)
    ("bad.jsonl", '{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": oops}\n',
     ["bad.jsonl", "line 2", "invalid JSON"]),
    ("missing.jsonl", '\n{"prompt": "a", "chosen": " b"}\n', ["missing.jsonl", "line 2", "'rejected'"]),
    ("nonstr.jsonl", '{"prompt": "a", "chosen": 5, "rejected": " c"}\n', ["nonstr.jsonl", "line 1", "'chosen'"]),
    ("prompt.jsonl", '{"prompt": 1, "chosen": " b", "rejected": " c"}\n', ["prompt.jsonl", "line 1", "'prompt'"]),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n', ["unknown.jsonl", "line 1", "unknown record format"]),
    ("noturn.jsonl", '{"chosen": "Human: hi", "rejected": "Human: yo"}\n', ["noturn.jsonl", "line 1", "'chosen'"]),
    ("role.json", json.dumps([{"chosen": _msgs(("user", "a"), ("assistant", "b")),
                               "rejected": _msgs(("user", "a"), ("robot", "c"))}]),
     ["role.json", "record 0", "'rejected[1].role'"]),
    ("last.json", json.dumps([EXPECTED[0], {"chosen": _msgs(("user", "a")), "rejected": _msgs(("user", "a"))}]),
     ["last.json", "record 1", "'chosen'"]),
    ("notlist.json", '{"chosen": " b"}', ["notlist.json", "JSON list"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "empty file"]),
    ("empty.json", "[]", ["empty.json", "empty file"]),
    ("pairs.csv", "prompt,chosen,rejected\n", ["pairs.csv", "unknown file type"]),
]


@pytest.mark.parametrize("name,content,needles", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_file_line_and_field(tmp_path, name, content, needles):
    """Each malformed file raises ValueError whose message names the file, the
    1-based line (or 0-based record index for a .json list) and the field, as
    listed per case in BAD_INPUTS (blank lines still count as lines)."""
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError) as err:
        data.load_pairs(path, verbose=False)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    """A path that does not exist raises FileNotFoundError with the path in the message."""
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_pairs(tmp_path / "nope.jsonl")


def test_empty_and_identical_responses_are_skipped_and_counted(tmp_path, capsys):
    """4 records: one good, one with a whitespace-only response, one with chosen
    == rejected, one HH pair whose dialogues differ in the first Human turn (no
    shared Assistant turn). 1 loads; the summary counts each skip by reason."""
    path = _write(tmp_path / "s.jsonl", _jsonl([
        EXPECTED[0],
        {"prompt": "p", "chosen": "  \n", "rejected": " no"},
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    ]))
    assert data.load_pairs(path) == [EXPECTED[0]]
    assert capsys.readouterr().out.strip() == (
        "loaded 1 pairs from s.jsonl (skipped 3: empty_response=1, identical=1, prompt_mismatch=1)")


# ------------------------------------------------------------------------------------------------
# tokenization and padding

def test_get_tokenizer_bytes_and_offline_gpt2():
    """"bytes": ids are UTF-8 bytes ("hé" -> 104, 0xC3, 0xA9), eot 256, n_vocab
    257, and "<|endoftext|>" in text stays plain bytes. The offline GPT-2 file
    gives the known ids "Hello world" -> [15496, 995] and eot 50256. An unknown
    name fails with a hint at the offline .tiktoken path."""
    enc = data.get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    assert enc.encode_ordinary("hé") == [104, 0xC3, 0xA9]
    assert enc.encode_ordinary("<|endoftext|>") == list(b"<|endoftext|>")
    with pytest.raises(ValueError, match=r"\.tiktoken"):
        data.get_tokenizer("no-such-encoding")
    if not os.path.exists(GPT2_PATH):
        pytest.skip(f"offline GPT-2 BPE not found at {GPT2_PATH}")
    gpt2 = data.get_tokenizer(GPT2_PATH)
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert (gpt2.eot_token, gpt2.n_vocab) == (50256, 50257)


def test_tokenizer_file_is_read_each_time(tmp_path):
    """A .tiktoken file is 'base64(token) rank' per line: 256 byte tokens + 1 merge -> 257 ranks,
    eot 257, 258 ids. Rewritten at the same path with 2 merges: 259 ids (no stale cache). An empty
    file and a bad line are refused naming the file (and the line)."""
    path = tmp_path / "toy.tiktoken"
    write = lambda toks: path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))
    byte_tokens = [bytes([i]) for i in range(256)]
    write(byte_tokens + [b"th"])
    assert data.get_tokenizer(str(path)).n_vocab == 258
    write(byte_tokens + [b"th", b"the"])
    assert data.get_tokenizer(str(path)).n_vocab == 259
    path.write_text("")
    with pytest.raises(ValueError, match="toy.tiktoken: empty .tiktoken file"):
        data.get_tokenizer(str(path))
    path.write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="toy.tiktoken: line 2: expected 'base64-token rank'"):
        data.get_tokenizer(str(path))


def _toy_bpe():
    """256 byte ranks, then merges he=256, ll=257, hell=258, hello=259; eot=260."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"he": 256, b"ll": 257, b"hell": 258, b"hello": 259})
    return tiktoken.Encoding("toy", pat_str=data.GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 260})


def test_toy_bpe_ids_separate_encoding_and_appended_eot():
    """With the toy BPE, "hello" -> h,e,l,l,o -> he,l,l,o -> he,ll,o -> hell,o ->
    [259]; " hello" is one pre-token and -> [32, 259]. Pair prompt "hel",
    response "lo": encoded together "hello" would be [259], but separately
    "hel" -> [he, l] = [256, 108] and "lo" -> [108, 111], plus eot 260.
    An empty prompt becomes [eot]."""
    enc = _toy_bpe()
    assert enc.encode_ordinary("hello") == [259] and enc.encode_ordinary(" hello") == [32, 259]
    pairs = [{"prompt": "hel", "chosen": "lo", "rejected": "l"},
             {"prompt": "", "chosen": " hello", "rejected": "he"}]
    out = data.tokenize_pairs(pairs, enc, block_size=64, verbose=False)
    assert out == [([256, 108], [108, 111, 260], [108, 260]),
                   ([260], [32, 259, 260], [256, 260])]


def test_tokenize_sft_appends_eot_and_cuts_like_pairs(capsys):
    """tokenize_sft encodes prompt and response separately and appends eot 260 to the response:
    ("hel", "lo") -> ([he, l], [l, o, eot]) = ([256, 108], [108, 111, 260]); an empty prompt
    becomes [eot]. Truncation is tokenize_pairs': prompt "hell he hello hello" -> [258, 32,256,
    32,259, 32,259] (7 ids), response " hello hello" -> [32,259,32,259] + eot (5); block 7, min 3:
    keep max(7-5, 3) = 3 prompt ids, the LAST three [259, 32, 259] (the first three would be
    [258, 32, 256]); room 4 cuts the response's eot."""
    enc = _toy_bpe()
    assert data.tokenize_sft([("hel", "lo"), ("", " hello")], enc, 64, verbose=False) == [
        ([256, 108], [108, 111, 260]), ([260], [32, 259, 260])]
    assert data.tokenize_sft([("hell he hello hello", " hello hello")], enc, 7, min_prompt_tokens=3) == [
        ([259, 32, 259], [32, 259, 32, 259])]
    assert capsys.readouterr().out.strip() == \
        "tokenized 1 sequences (block_size 7): prompt cut in 1, responses cut in 1, skipped 0"


def test_truncation_cuts_prompt_start_then_response_end(capsys):
    """Prompt "hell he hello hello" -> [258, 32,256, 32,259, 32,259] (7 ids; its start and its end
    differ, so a cut from the wrong side shows); chosen " hello hello" -> [32,259,32,259,260] (5);
    rejected " hell" -> [32,258,260] (3). block 10, min 3: keep max(10-5, 3) = 5 prompt ids, the
    last five [256, 32, 259, 32, 259] (not the first five [258, 32, 256, 32, 259]); responses fit.
    block 7: keep max(2, 3) = 3 prompt ids [259, 32, 259], room 4 -> the chosen loses its eot,
    the rejected fits. Then a pair that becomes identical after the cut (" hello hello" vs
    " hello hell", block 5: room 2 -> both [32, 259]) and, with min_prompt_tokens 4 = block 4,
    one with no room left."""
    enc = _toy_bpe()
    prompt = "hell he hello hello"
    pair = {"prompt": prompt, "chosen": " hello hello", "rejected": " hell"}
    assert data.tokenize_pairs([pair], enc, 10, min_prompt_tokens=3) == [
        ([256, 32, 259, 32, 259], [32, 259, 32, 259, 260], [32, 258, 260])]
    assert capsys.readouterr().out.strip() == \
        "tokenized 1 pairs (block_size 10): prompt cut in 1, responses cut in 0, skipped 0"
    assert data.tokenize_pairs([pair], enc, 7, min_prompt_tokens=3) == [
        ([259, 32, 259], [32, 259, 32, 259], [32, 258, 260])]
    assert capsys.readouterr().out.strip() == \
        "tokenized 1 pairs (block_size 7): prompt cut in 1, responses cut in 1, skipped 0"
    same = {"prompt": prompt, "chosen": " hello hello", "rejected": " hello hell"}
    assert data.tokenize_pairs([same], enc, 5, min_prompt_tokens=3) == []
    assert data.tokenize_pairs([pair], enc, 4, min_prompt_tokens=4) == []
    out = capsys.readouterr().out.strip().split("\n")
    assert out == ["tokenized 0 pairs (block_size 5): prompt cut in 1, responses cut in 1, skipped 1 (identical=1)",
                   "tokenized 0 pairs (block_size 4): prompt cut in 1, responses cut in 0, skipped 1 (no_room=1)"]


def test_collate_exact_ids_and_mask():
    """The two triples of the toy BPE test, pad_id 0: rows are [p+c for each] then
    [p+r for each]; lengths 5, 4, 4, 3 -> T = 5. Mask is True on response
    positions (incl. eot) only: row 0 = prompt 2 + response 3, row 1 = prompt
    1 + response 3, row 2 = prompt 2 + response 2, row 3 = prompt 1 + response 2.
    collate_sft pads (prompt, response) rows the same way: lengths 3 and 4 -> T = 4,
    pad 9 at the end of the short row, mask on the response tokens."""
    ex = [([256, 108], [108, 111, 260], [108, 260]), ([260], [32, 259, 260], [256, 260])]
    ids, mask = data.collate(ex, pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[256, 108, 108, 111, 260],
                            [260, 32, 259, 260, 0],
                            [256, 108, 108, 260, 0],
                            [260, 256, 260, 0, 0]]
    F, T = False, True
    assert mask.tolist() == [[F, F, T, T, T], [F, T, T, T, F], [F, F, T, T, F], [F, T, T, F, F]]
    ids, mask = data.collate_sft([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]]
    assert mask.tolist() == [[F, F, T, F], [F, T, T, T]]


# ------------------------------------------------------------------------------------------------
# splits and batches

def test_split_by_prompt_keeps_prompts_whole_and_is_deterministic():
    """40 items over 10 prompts: ceil(0.25 * 10) = 3 prompts (12 items) go to
    val, the other 7 prompts to train; no prompt on both sides; same seed ->
    same split; with 2 prompts and a tiny fraction val still gets 1 prompt."""
    items = [{"prompt": f"p{i % 10}", "k": i} for i in range(40)]
    train, val = data.split_by_prompt(items, 0.25, seed=3)
    assert len({x["prompt"] for x in val}) == 3 and len(val) == 12 and len(train) == 28
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in val}
    assert (train, val) == data.split_by_prompt(items, 0.25, seed=3)
    assert data.split_by_prompt(items, 0.25, seed=4) != (train, val)
    two = [{"prompt": "a"}, {"prompt": "b"}]
    assert [len(s) for s in data.split_by_prompt(two, 0.01, seed=0)] == [1, 1]
    assert data.split_by_prompt(two, 0.0, seed=0) == (two, [])


def test_batches_determinism_resume_and_rank_sharding():
    """10 examples, global batch 4 -> 2 steps an epoch, the last 2 dropped;
    each epoch reshuffles. Same seed -> same stream; a new Batches loaded with
    a state_dict continues exactly; ranks 0 and 1 with batch 2 concatenated
    (rank 0 first) equal one process with batch 4, batch by batch."""
    ex = list(range(10))
    def stream(b, n):
        return [b.next() for _ in range(n)]
    a = stream(data.Batches(ex, 4, seed=1), 6)
    assert a == stream(data.Batches(ex, 4, seed=1), 6) and a != stream(data.Batches(ex, 4, seed=2), 6)
    assert all(len(set(x)) == 4 for x in a) and a[:2] != a[2:4]
    assert len(set(a[0] + a[1])) == 8  # an epoch never repeats an example
    b = data.Batches(ex, 4, seed=1)
    stream(b, 3)
    state = b.state_dict()
    assert state == {"epoch": 1, "pos": 4}
    c = data.Batches(ex, 4, seed=1)
    c.load_state_dict(state)
    assert stream(c, 3) == a[3:]
    r0, r1 = (data.Batches(ex, 2, seed=1, rank=r, world_size=2) for r in (0, 1))
    assert [x + y for x, y in zip(stream(r0, 6), stream(r1, 6))] == a
    with pytest.raises(ValueError, match="global batch"):
        data.Batches(ex, 4, seed=0, world_size=3)


def test_length_grouped_batches_pad_little_and_stay_exact():
    """103 examples of random lengths 1..400, global batch 8 (12 batches an epoch, the last 7 examples
    dropped), runs of 3 batches sorted by length. Each epoch still visits 96 distinct examples; the
    stream is deterministic, continues exactly from a state_dict, and 2 ranks of 4 concatenated equal
    one process of 8. The padded length summed over batches (8 x the longest of each) falls below 0.8
    of a plain shuffle's. A step is shuffled within itself: rank 0's half is not always the shorter
    (it would be in all 24 steps if steps were left sorted)."""
    rng = random.Random(0)
    lengths = [rng.randint(1, 400) for _ in range(103)]
    ex = list(range(103))
    make = lambda **kw: data.Batches(ex, kw.pop("b", 8), seed=5, lengths=lengths, group=3, **kw)
    stream = lambda b, n: [b.next() for _ in range(n)]
    a = stream(make(), 24)
    assert a == stream(make(), 24)
    assert len(set(i for b in a[:12] for i in b)) == 96 and len(set(i for b in a[12:] for i in b)) == 96
    assert 6 <= sum(sum(lengths[i] for i in b[:4]) < sum(lengths[i] for i in b[4:]) for b in a) <= 18
    g, h = make(), make()
    stream(g, 17)
    h.load_state_dict(g.state_dict())
    assert stream(h, 7) == a[17:]
    r0, r1 = (make(b=4, rank=r, world_size=2) for r in (0, 1))
    assert [x + y for x, y in zip(stream(r0, 24), stream(r1, 24))] == a
    # 2 micro-batches of 4 per optimizer step: one process, and 2 processes of one, see the same 8
    acc = data.Batches(ex, 4, seed=5, lengths=lengths, group=3, step_items=8)
    ddp = [data.Batches(ex, 4, seed=5, rank=r, world_size=2, lengths=lengths, group=3, step_items=8) for r in (0, 1)]
    assert [x + y for x, y in zip(*(stream(b, 24) for b in ddp))] == [a + b for a, b in zip(*[iter(stream(acc, 48))] * 2)]
    padded = lambda batches: sum(8 * max(lengths[i] for i in b) for b in batches)
    assert padded(a[:12]) < 0.8 * padded(stream(data.Batches(ex, 8, seed=5), 12))


def test_encoding_each_distinct_text_once_equals_one_at_a_time():
    """tokenize_pairs encodes each distinct text once (HH pairs share prompts); the ids equal
    encoding every pair alone (the GPT-2 BPE, on the HH file when present)."""
    if not os.path.isfile(GPT2_PATH) or not os.path.isfile(HH_PATH):
        pytest.skip("offline GPT-2 BPE or HH file not found (fresh clone without ../shared)")
    enc = data.get_tokenizer(GPT2_PATH)
    pairs = data.load_pairs(HH_PATH, verbose=False)[:300]
    out = data.tokenize_pairs(pairs, enc, 10**6, verbose=False)
    alone = [(enc.encode_ordinary(p["prompt"]), enc.encode_ordinary(p["chosen"]) + [enc.eot_token],
              enc.encode_ordinary(p["rejected"]) + [enc.eot_token]) for p in pairs]
    assert out == [x for x in alone if x[1] != x[2]]
