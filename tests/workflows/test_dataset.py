import json

import pytest

from workflows.config import DatasetConfig
from workflows.data.dataset import DatasetError, PromptLoader, load_prompt_dataset, reference_answer


def test_reference_answer():
    assert reference_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert reference_answer("#### 1,234") == "1234"
    assert reference_answer("no marker") is None
    assert reference_answer(None) is None


def test_real_gsm8k_test_split_loads_with_chat_template(gsm8k_dir, tokenizer):
    data = load_prompt_dataset(DatasetConfig(path=str(gsm8k_dir), split="test"), tokenizer)
    assert len(data) == 1319 and data.num_malformed == 0
    row = data.rows[0]
    text = tokenizer.decode(row["prompt_ids"])
    assert "<|im_start|>user" in text and "\\boxed{}" in text and text.rstrip().endswith("assistant")
    assert row["answer"] == "18"  # Janet's ducks


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_malformed_and_long_rows_are_counted_not_fatal(tmp_path, tokenizer):
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"},
            {"question": "No answer marker", "answer": "42"},
            {"answer": "#### 3"},
            {"question": "long " * 400, "answer": "#### 5"},
        ],
    )
    data = load_prompt_dataset(DatasetConfig(path=str(tmp_path), max_prompt_length=128, answer_format="gsm8k"), tokenizer)
    assert len(data) == 1 and data.num_malformed == 2 and data.num_too_long == 1
    assert "skipped 2 malformed" in data.report()


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": ""}])
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompt_dataset(DatasetConfig(path=str(tmp_path)), tokenizer)
    with pytest.raises(DatasetError, match="validation"):
        load_prompt_dataset(DatasetConfig(path=str(tmp_path)), tokenizer, split="validation")


def test_parquet_directory(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"question": "2+2?", "answer": "#### 4"}] * 3).to_parquet(tmp_path / "train-0.parquet")
    assert len(load_prompt_dataset(DatasetConfig(path=str(tmp_path)), tokenizer)) == 3


def test_loader_reshuffles_each_epoch_reproducibly():
    from workflows.data.dataset import PromptDataset

    data = PromptDataset(rows=[{"id": i} for i in range(10)])
    a = PromptLoader(data, batch_size=3, shuffle=True, seed=5)
    b = PromptLoader(data, batch_size=3, shuffle=True, seed=5)
    epoch1, epoch2 = list(a), list(a)
    assert epoch1 == list(b) and epoch1 != epoch2
    assert len(epoch1) == 3 and all(len(batch) == 3 for batch in epoch1)
    with pytest.raises(ValueError, match="batch_size=11"):
        PromptLoader(data, batch_size=11, shuffle=False, seed=0)


# ---------------------------------------------------------------------------------------
# The GSM8K shipped with the package: dataset.path=openai/gsm8k without the hub.


@pytest.fixture
def hub_offline(monkeypatch):
    import workflows.data.sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(workflows.data.sources, "_warned_packaged", set())


def test_shipped_gsm8k_is_the_real_one(gsm8k_dir):
    from workflows.data.dataset import PACKAGED_DATASETS

    shipped = PACKAGED_DATASETS["openai/gsm8k"]
    for name in ("train.jsonl", "test.jsonl", "LICENSE"):
        assert (shipped / name).read_bytes() == (gsm8k_dir / name).read_bytes(), name
    assert "MIT License" in (shipped / "LICENSE").read_text()


def test_hub_id_falls_back_to_the_shipped_copy_with_one_warning(hub_offline, gsm8k_dir, tokenizer, caplog):
    from workflows.data.dataset import load_raw_split

    cfg = DatasetConfig()  # the default: path=openai/gsm8k, name=main
    assert cfg.path == "openai/gsm8k"
    with caplog.at_level("WARNING", logger="workflows.data.sources"):
        shipped = load_prompt_dataset(DatasetConfig(split="test"), tokenizer)
        assert len(load_raw_split(cfg, "train")) == 7473  # the train split too; no second warning
    local = load_prompt_dataset(DatasetConfig(path=str(gsm8k_dir), split="test"), tokenizer)
    assert shipped.rows == local.rows and len(shipped) == 1319
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1 and warnings[0].startswith("hub unreachable for openai/gsm8k; using the copy shipped")


def test_unreachable_hub_id_without_a_copy_names_the_key_and_the_fix(hub_offline):
    from engines.hub import HubUnreachableError
    from workflows.data.dataset import load_raw_split

    for cfg in (DatasetConfig(path="nobody-here/no-such-data"), DatasetConfig(name="socratic")):
        with pytest.raises(HubUnreachableError) as info:
            load_raw_split(cfg, "train")
        message = str(info.value)
        assert message.startswith(f"dataset.path={cfg.path!r}: the Hugging Face hub is unreachable")
        assert message.endswith("pass dataset.path=<local dir or file of jsonl/json/parquet/csv>") and "\n" not in message


def test_a_dataset_the_reachable_hub_does_not_serve_is_one_line(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    import workflows.data.sources
    from engines.hub import HubError, HubUnreachableError

    def load_dataset(path, name=None, split=None):
        raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(workflows.data.sources, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(HubError) as info:
        workflows.data.sources.load_raw_split(DatasetConfig(path="nobody-here/no-such-data"), "train")
    assert not isinstance(info.value, HubUnreachableError)
    assert str(info.value) == (
        "dataset.path='nobody-here/no-such-data': the Hugging Face hub has no such repository or refuses access "
        "(Dataset 'nobody-here/no-such-data' doesn't exist on the Hub or cannot be accessed.); pass an existing "
        "hub id or dataset.path=<local dir or file of jsonl/json/parquet/csv>"
    )


# ---------------------------------------------------------------------------------------
# Bring your own data: column settings, prompt building, file formats, clean errors.


def test_own_columns_instruction_and_system_prompt(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": " Spell 'cat' backwards. ", "solution": "tac", "level": 2}])
    cfg = DatasetConfig(path=str(tmp_path / "train.jsonl"), prompt_column="prompt", answer_column="solution",
                        system_prompt="Be brief.", instruction="Task: {question} (box it)")
    row = load_prompt_dataset(cfg, tokenizer).rows[0]
    text = tokenizer.decode(row["prompt_ids"])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nTask: Spell 'cat' backwards. (box it)<|im_end|>" in text
    # The reference as it is (no '####' in the column); every column reaches the reward.
    assert row["answer"] == "tac" and row["prompt"] == " Spell 'cat' backwards. "
    assert row["columns"] == {"prompt": " Spell 'cat' backwards. ", "solution": "tac", "level": 2}


def test_a_messages_column_is_taken_as_it_is(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "S."}, {"role": "user", "content": "Say hi."}]
    write_jsonl(tmp_path / "train.jsonl", [{"messages": messages, "answer": "hi"}])
    cfg = DatasetConfig(path=str(tmp_path), messages_column="messages", system_prompt="ignored")
    row = load_prompt_dataset(cfg, tokenizer).rows[0]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert row["prompt_ids"] == list(expected) and row["prompt"] == messages and "ignored" not in str(row)


@pytest.mark.parametrize("fmt, column, expected", [
    ("gsm8k", "so 1,234\n#### 1,234", "1234"), ("gsm8k", "1234", None),
    ("boxed", "thus \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"), ("boxed", "no box", None),
    ("raw", "  a, b, c ", "a, b, c"), ("raw", 7, "7"), ("raw", "", None),
    (None, "work\n#### 12", "12"), (None, "a, b", "a, b"),
])
def test_answer_formats(tmp_path, tokenizer, fmt, column, expected):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": column}, {"question": "q2", "answer": "\\boxed{1}\n#### 1"}])
    data = load_prompt_dataset(DatasetConfig(path=str(tmp_path), answer_format=fmt), tokenizer)
    answers = [row["answer"] for row in data.rows if row["question"] == "q"]
    assert answers == ([] if expected is None else [expected])


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet", ".jsonl"])
def test_every_file_format_reads_through_datasets(tmp_path, tokenizer, suffix):
    import datasets

    rows = [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(3)]
    path = tmp_path / f"train{suffix}"
    table = datasets.Dataset.from_list(rows)
    {".csv": table.to_csv, ".parquet": table.to_parquet}.get(suffix, lambda p: p.write_text(
        json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)))(path)
    for where in (path, tmp_path):  # the file, or the directory holding it
        data = load_prompt_dataset(DatasetConfig(path=str(where)), tokenizer)
        assert [r["answer"] for r in data.rows] == ["1", "2", "3"]


def test_bad_files_are_one_line_naming_the_file_and_line(tmp_path, tokenizer):
    from workflows.data.sources import check_dataset

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b" "answer": 2}\n')
    cases = [
        (DatasetConfig(path=str(bad)), f"{bad} line 3 is not valid JSON (Expecting ',' delimiter, column 18)"),
        (DatasetConfig(path=str(tmp_path / "wrong.jsonl")), "has the columns [q, a], not the expected [question, "
                                                            "answer] (missing: question, answer)"),
        (DatasetConfig(path=str(tmp_path / "empty.jsonl")), "empty.jsonl is empty"),
        (DatasetConfig(path=str(tmp_path / "array.json")), "array.json holds a JSON int; it must hold rows"),
    ]
    write_jsonl(tmp_path / "wrong.jsonl", [{"q": "x", "a": "y"}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "array.json").write_text("3")
    for cfg, fragment in cases:
        for load, args in ((check_dataset, (cfg, ["train"])), (load_prompt_dataset, (cfg, tokenizer))):
            with pytest.raises(DatasetError) as info:
                load(*args)
            assert fragment in str(info.value) and "\n" not in str(info.value)
