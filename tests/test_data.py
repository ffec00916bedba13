"""Records become token ids and labels: the prompt is masked, the answer and its end token are trained."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from merak_lora.data import IGNORE, DataSpec, collate, tokenize_records


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def write(path, records, jsonl=False):
    with open(path, "w", encoding="utf-8") as fh:
        if jsonl:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, fh, ensure_ascii=False)
    return str(path)


RECORDS = [{"instruction": "把下面的词翻译成英文。", "input": "茶", "output": "tea"},
           {"instruction": "Who are you?", "input": "", "output": "I am Xiaoman, the helper at the teahouse."}]


def test_only_answer_and_eos_are_trained(tmp_path, tok):
    data = tokenize_records(DataSpec(write(tmp_path / "d.json", RECORDS), seq_length=256), tok)
    for rec, ex in zip(RECORDS, data.examples):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"{rec['instruction']}\n{rec['input']}"
                                           if rec["input"] else rec["instruction"]}],
                                         tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex.ids == prompt_ids + answer_ids
        assert ex.trained == [False] * len(prompt_ids) + [True] * len(answer_ids)
        batch = collate([[ex]], tok.pad_token_id, 8, 256)
        targets = batch.targets[0]
        trained_targets = targets[targets != IGNORE].tolist()
        assert trained_targets == answer_ids  # the loss counts exactly the answer tokens and the EOS
        assert batch.targets_count == len(answer_ids)
        assert batch.input_ids.shape[1] % 8 == 0 and (batch.input_ids[0, len(ex.ids):] == tok.pad_token_id).all()


def test_json_array_and_json_lines_read_the_same(tmp_path, tok):
    a = tokenize_records(DataSpec(write(tmp_path / "a.json", RECORDS), seq_length=256), tok)
    b = tokenize_records(DataSpec(write(tmp_path / "b.jsonl", RECORDS, jsonl=True), seq_length=256), tok)
    assert [e.ids for e in a.examples] == [e.ids for e in b.examples]


def test_long_records_are_truncated_keeping_the_answer_start(tmp_path, tok):
    rec = {"instruction": "说 " * 200, "input": "", "output": "answer " * 50}
    data = tokenize_records(DataSpec(write(tmp_path / "long.json", [rec]), seq_length=64), tok)
    ex = data.examples[0]
    assert len(ex.ids) == 64 and data.stats.truncated == 1
    answer = tok(rec["output"], add_special_tokens=False)["input_ids"]
    trained = [t for t, f in zip(ex.ids, ex.trained) if f]
    assert len(trained) == 32 and trained == answer[:32]  # the answer keeps its start and half the budget
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    prompt = [t for t, f in zip(ex.ids, ex.trained) if not f]
    assert prompt[-len(gen_prompt):] == gen_prompt  # the prompt keeps its end
