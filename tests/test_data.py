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


# --- every shape the users bring ---------------------------------------------------------------------------

from merak_lora.config import ConfigError  # noqa: E402
from merak_lora.data import DataError, ReadStats, list_files, parse_field_map  # noqa: E402
from merak_lora.data.records import plan_pieces, read_piece, to_conversation  # noqa: E402
from merak_lora.templates import Formatter  # noqa: E402


def conversations(path, fmt="auto", field_map="", system="", per_piece=50_000):
    stats = ReadStats()
    return [to_conversation(rec, where, fmt, parse_field_map(field_map), system)
            for piece in plan_pieces(list_files(str(path)), per_piece)
            for rec, where in read_piece(piece, False, stats)]


U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_chat_huanhuan_json_array_with_chinese(tmp_path):
    recs = [{"instruction": "小姐，别的秀女都在求中选，唯有咱们小姐想被撂牌子，菩萨一定记得真真儿的——",
             "input": "", "output": "嘘——都说许愿说破是不灵的。"}]
    assert conversations(write(tmp_path / "huanhuan.json", recs)) == [
        msgs((U, recs[0]["instruction"]), (A, "嘘——都说许愿说破是不灵的。"))]


def test_emollm_objects_written_one_after_another_without_commas(tmp_path):
    text = ('{"instruction": "你是谁", "input": "", "output": "我是心理健康助手。"}\n'
            '{"instruction": "你能做什么", "input": "", "output": "陪你聊聊。"}'
            '{"instruction": "再见", "output": "再见！"}\n')
    (tmp_path / "self_cognition.json").write_text(text, encoding="utf-8")
    convs = conversations(tmp_path / "self_cognition.json")
    assert [c[-1]["content"] for c in convs] == ["我是心理健康助手。", "陪你聊聊。", "再见！"]


def test_utf8_bom_and_a_folder_of_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text("\ufeff" + json.dumps(RECORDS[:1], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps(RECORDS[1], ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    convs = conversations(tmp_path / "d")
    assert [c[-1]["content"] for c in convs] == ["tea", RECORDS[1]["output"]]
    assert convs[0][0]["content"] == "把下面的词翻译成英文。\n茶"


def test_language_prefixed_keys_through_field_map(tmp_path):
    recs = [{"en_instruction": "Translate", "en_input": "茶", "en_output": "tea", "instruction": "翻译"}]
    convs = conversations(write(tmp_path / "alpaca_zh_en.json", recs),
                          field_map="instruction=en_instruction,input=en_input,output=en_output")
    assert convs == [msgs((U, "Translate\n茶"), (A, "tea"))]


def test_sharegpt_conversations_with_system(tmp_path):
    recs = [{"system": "你是甄嬛。", "conversations": [
        {"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "家父是大理寺少卿甄远道。"},
        {"from": "human", "value": "几岁了？"}, {"from": "gpt", "value": "十七。"}]}]
    assert conversations(write(tmp_path / "sg.json", recs)) == [
        msgs((S, "你是甄嬛。"), (U, "你是谁？"), (A, "家父是大理寺少卿甄远道。"), (U, "几岁了？"), (A, "十七。"))]


def test_openai_messages_with_system_turn(tmp_path):
    recs = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}]
    assert conversations(write(tmp_path / "m.jsonl", recs, jsonl=True)) == [
        msgs((S, "Be brief."), (U, "Hi"), (A, "Hello."))]


def test_alpaca_history_and_default_system(tmp_path):
    recs = [{"instruction": "第三问", "output": "第三答", "history": [["第一问", "第一答"], ["第二问", "第二答"]]}]
    assert conversations(write(tmp_path / "h.json", recs), system="你是助手。") == [
        msgs((S, "你是助手。"), (U, "第一问"), (A, "第一答"), (U, "第二问"), (A, "第二答"), (U, "第三问"), (A, "第三答"))]


def test_multi_turn_trains_every_answer_and_nothing_else(tmp_path, tok):
    recs = [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "first answer"},
                               {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "second answer"}]}]
    ex = tokenize_records(DataSpec(write(tmp_path / "mt.json", recs), seq_length=256), tok).examples[0]
    trained = [t for t, f in zip(ex.ids, ex.trained) if f]
    eos = [tok.eos_token_id]
    assert trained == tok("first answer", add_special_tokens=False)["input_ids"] + eos + \
        tok("second answer", add_special_tokens=False)["input_ids"] + eos
    full = tok.apply_chat_template(msgs((U, "Q1"), (A, "first answer"), (U, "Q2"), (A, "second answer")),
                                   tokenize=False)
    assert tok.decode(ex.ids) == full.rstrip("\n")  # the whole conversation, with only the trailing newline dropped


def test_multi_turn_truncation_drops_the_earliest_exchange_first(tmp_path, tok):
    recs = [{"system": "SYS", "conversations": [
        {"from": "human", "value": "old " * 40}, {"from": "gpt", "value": "old answer " * 20},
        {"from": "human", "value": "new question"}, {"from": "gpt", "value": "new answer"}]}]
    data = tokenize_records(DataSpec(write(tmp_path / "t.json", recs), seq_length=48), tok)
    text = tok.decode(data.examples[0].ids)
    assert "SYS" in text and "new question" in text and "old" not in text
    assert data.stats.truncated == 1


def test_named_templates_render_incrementally_and_as_documented(tok):
    conv = msgs((S, "SYS"), (U, "Q1"), (A, "A1"), (U, "Q2"), (A, "A2"))

    class Tok:
        bos_token, eos_token, chat_template = "<s>", "</s>", None

    ends = {"deepseek": "A1</s>", "llama2": " A1 </s>", "llama3": "A1<|eot_id|>", "qwen": "A1<|im_end|>\n",
            "index": "A1</s>", "plain": "A1</s>\n\n"}
    for name, end in ends.items():
        f = Formatter(Tok(), name)
        texts = [f.render(conv[:k], add_generation_prompt=False) for k in range(1, len(conv) + 1)]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), name
        prompt = f.render(conv[:2], add_generation_prompt=True)  # what generation sees before answer A1
        assert texts[2].startswith(prompt) and texts[2].endswith(end), name
    assert Formatter(Tok(), "deepseek").render(conv[:3], False) == "<s>SYS\n\nUser: Q1\n\nAssistant: A1</s>"


def test_packing_fills_sequences_and_keeps_records_whole(tmp_path, tok):
    import numpy as np

    from merak_lora.data import SampleSet, pack
    data = tokenize_records(DataSpec(SAMPLE_PATH, seq_length=128), tok)
    lengths = np.array([len(e.ids) for e in data.examples])
    samples = SampleSet(data.examples, *pack(lengths, np.arange(len(lengths)), 128, seed=0))
    bins = [samples[s] for s in range(len(samples))]
    assert sorted(id(e) for b in bins for e in b) == sorted(id(e) for e in data.examples)
    assert all(sum(len(e.ids) for e in b) <= 128 for b in bins)
    assert len(bins) < len(data.examples) / 2
    batch = collate(bins[:2], tok.pad_token_id, 8, 128)
    for row, sample in enumerate(bins[:2]):  # positions restart at every record
        starts = [0]
        for e in sample[:-1]:
            starts.append(starts[-1] + len(e.ids))
        assert all(batch.position_ids[row, s].item() == 0 for s in starts)


def test_cache_hit_returns_the_same_tokens(tmp_path, tok):
    spec = DataSpec(write(tmp_path / "d.json", RECORDS), seq_length=256)
    first = prepare_here(spec, tok, tmp_path / "cache")
    second = prepare_here(spec, tok, tmp_path / "cache")
    assert first.path == second.path and first.shards == second.shards
    from merak_lora.data import TokenStore
    got = [(list(e.ids), [bool(t) for t in e.trained]) for e in (TokenStore(second)[i] for i in range(2))]
    assert got == [(list(e.ids), list(e.trained)) for e in tokenize_records(spec, tok).examples]
    third = prepare_here(DataSpec(spec.path, seq_length=64), tok, tmp_path / "cache")
    assert third.path != first.path and third.shards != first.shards, "another --seq_length must not reuse it"


def prepare_here(spec, tok, cache):
    """The run's data preparation in this one process."""
    import torch.distributed as dist

    from merak_lora.coordinate import Coordinator
    from merak_lora.data.prepare import prepare
    return prepare(spec, tok, str(cache), Coordinator(dist.HashStore(), 0, 1), progress=False)


SAMPLE_PATH = __import__("conftest").SAMPLE


# --- bad input: each with the message a user needs ---------------------------------------------------------

BAD = [
    ("missing output", '[{"instruction": "hi"}]', {}, "record 1: missing field 'output'"),
    ("empty output", '[{"instruction": "hi", "output": ""}]', {}, "record 1: field 'output' is empty"),
    ("missing instruction", '[{"output": "x"}]', {}, "record 1: missing field 'instruction'"),
    ("output of wrong type", '[{"instruction": "hi", "output": ["a"]}]', {}, "field 'output' should be text, got list"),
    ("record not an object", '["just text"]', {}, "record 1: a record must be a JSON object, got str"),
    ("empty file", "  \n", {}, "the file is empty"),
    ("invalid JSON in JSON lines", '{"instruction": "a", "output": "b"}\n{"instruction": "a", output: b}\n', {},
     "invalid JSON at line 2"),
    ("invalid JSON in an array", '[{"instruction": "a", "output": "b"},\n {"instruction": }]', {},
     "invalid JSON at line 2, column"),
    ("conversations not a list", '[{"conversations": "hello"}]', {}, "field 'conversations' should be a non-empty list"),
    ("unknown role", '[{"conversations": [{"from": "narrator", "value": "x"}]}]', {}, "has role 'narrator'"),
    ("ends with the user", '[{"messages": [{"role": "user", "content": "x"}]}]', {}, "must end with an assistant turn"),
    ("turns out of order", '[{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", '
     '"content": "y"}]}]', {}, "turns must alternate user, assistant"),
    ("system turn mid-way", '[{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "y"}]}]', {}, "is a system turn after the conversation started"),
    ("history of wrong shape", '[{"instruction": "q", "output": "a", "history": ["not a pair"]}]', {},
     "field 'history' should be a list of [question, answer] pairs"),
    ("turn without text", '[{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}]', {},
     "messages[0]: missing field 'content'"),
    ("bad field_map", '[{"instruction": "q", "output": "a"}]', {"field_map": "instruction"}, "is not name=key"),
    ("unknown data_format", '[{"instruction": "q", "output": "a"}]', {"data_format": "csv"}, "is not one of auto"),
    ("unknown template", '[{"instruction": "q", "output": "a"}]', {"template": "vicuna"}, "--template 'vicuna' is not"),
    ("nothing usable", '[{"instruction": "q"}, {"output": "a"}]', {"skip_bad_records": True},
     "no usable records (2 read, 2 bad"),
]


@pytest.mark.parametrize("name,content,spec_kw,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named_with_file_line_and_field(tmp_path, tok, name, content, spec_kw, message):
    path = tmp_path / ("data.jsonl" if "lines" in name else "data.json")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        tokenize_records(DataSpec(str(path), **{"seq_length": 256, **spec_kw}), tok)
    assert message in str(err.value)
    if isinstance(err.value, DataError) and "file is empty" not in message and "usable" not in message:
        assert "data.json" in str(err.value)  # names the file


def test_not_utf8_and_missing_paths(tmp_path, tok):
    (tmp_path / "gbk.json").write_bytes('[{"instruction": "你好", "output": "好"}]'.encode("gbk"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        tokenize_records(DataSpec(str(tmp_path / "gbk.json")), tok)
    with pytest.raises(DataError, match="no such data file or folder"):
        tokenize_records(DataSpec(str(tmp_path / "nope.json")), tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no .json or .jsonl files"):
        tokenize_records(DataSpec(str(tmp_path / "empty_dir")), tok)


def test_template_the_tokenizer_cannot_apply(tmp_path, tok):
    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    path = write(tmp_path / "sys.json", [{"system": "s", "instruction": "q", "output": "a"}])
    with pytest.raises(ConfigError, match="chat template cannot format this conversation.*System role not "
                                          "supported.*--template"):
        tokenize_records(DataSpec(path), strict)


def test_skip_bad_records_counts_instead_of_stopping(tmp_path, tok):
    text = ('{"instruction": "a", "output": "b"}\n{"instruction": "a", output: b}\n'
            '{"instruction": "c"}\n{"instruction": "d", "output": "e"}\n')
    (tmp_path / "mixed.jsonl").write_text(text, encoding="utf-8")
    data = tokenize_records(DataSpec(str(tmp_path / "mixed.jsonl"), skip_bad_records=True), tok)
    assert len(data.examples) == 2 and data.stats.skipped_bad == 2
    assert any("line 2: invalid JSON" in b for b in data.stats.bad_examples)
    assert any("line 3: missing field 'output'" in b for b in data.stats.bad_examples)


# --- continued pre-training text and TRL's prompt-completion ---------------------------------------------------

def test_text_records_train_every_token(tmp_path, tok):
    path = write(tmp_path / "corpus.jsonl", [{"text": "杭州的茶馆里，小满在煮水。"}, {"text": "Tea is ready."}],
                 jsonl=True)
    data = tokenize_records(DataSpec(path, seq_length=256), tok)
    for text, ex in zip(["杭州的茶馆里，小满在煮水。", "Tea is ready."], data.examples):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]   # the tokenizer's own start (no BOS for this one), EOS
        assert ex.ids == ids and all(ex.trained)
        batch = collate([[ex]], tok.pad_token_id, 8, 256)
        assert batch.targets[0][:len(ids) - 1].tolist() == ids[1:] and batch.targets_count == len(ids) - 1


def test_prompt_completion_strings_go_to_the_tokenizer_without_a_template(tmp_path, tok):
    path = write(tmp_path / "pc.jsonl", [{"prompt": "The capital of France is", "completion": " Paris."}], jsonl=True)
    ex = tokenize_records(DataSpec(path, seq_length=256), tok).examples[0]
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    completion = tok(" Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.ids == prompt + completion
    assert ex.trained == [False] * len(prompt) + [True] * len(completion)


def test_prompt_completion_messages_use_the_chat_template_like_messages_records(tmp_path, tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    pc = write(tmp_path / "pc.json", [{"prompt": conv, "completion": [{"role": "assistant", "content": "Hello."}]},
                                      {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello."}]}])
    ms = write(tmp_path / "m.json", [{"messages": conv + [{"role": "assistant", "content": "Hello."}]},
                                     {"messages": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello."}]}])
    a = tokenize_records(DataSpec(pc, seq_length=256), tok).examples
    b = tokenize_records(DataSpec(ms, seq_length=256), tok).examples
    assert [(e.ids, e.trained) for e in a] == [(e.ids, e.trained) for e in b]


def test_a_record_of_unknown_shape_names_its_keys_the_shapes_and_field_map(tmp_path, tok):
    path = write(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}], jsonl=True)
    with pytest.raises(DataError) as err:
        tokenize_records(DataSpec(path), tok)
    text = str(err.value)
    assert "qa.jsonl, line 1: a record of unknown shape (keys: question, answer)" in text
    assert "prompt-completion (prompt, completion) or text (text)" in text and "--field_map" in text
    data = tokenize_records(DataSpec(path, field_map="instruction=question,output=answer"), tok)
    assert len(data.examples) == 1


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x", "completion": ""}, "field 'completion' is empty"),
    ({"text": "  "}, "field 'text' is empty"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "narrator", "content": "y"}]},
     "completion[0] has role 'narrator'"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "completion": "y"}, "turns must alternate"),
])
def test_bad_prompt_completion_and_text_records_are_named(tmp_path, tok, record, message):
    path = write(tmp_path / "bad.jsonl", [record], jsonl=True)
    with pytest.raises(DataError, match="bad.jsonl, line 1") as err:
        tokenize_records(DataSpec(path), tok)
    assert message in str(err.value)
