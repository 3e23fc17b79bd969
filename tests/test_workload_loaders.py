"""Workload sources, tokenizer, length fill, synthetic generator, schema errors and data-dir resolution."""

from __future__ import annotations

import json
import lzma
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from chimera.workload import datadir, lengthfill, lengthfill_data, synthetic, tokens
from chimera.workload.datadir import DataDirError, require_file, resolve_data_dir
from chimera.workload.loaders import SOURCES, UnknownSourceError, fireact_hotpotqa, load_source, mmlu_pro_math
from chimera.workload.loaders._common import read_json
from chimera.workload.schema import WorkloadError, load_tasks, write_tasks


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return resolve_data_dir()
    except DataDirError as e:
        pytest.skip(f"public benchmark data not available (set CHIMERA_DATA_DIR to run these): {e}")


@pytest.fixture(scope="module")
def mmlu(data_dir):
    return load_source("mmlu-pro-math", data_dir)


# --- real sources ---------------------------------------------------------------------------------------------

EXPECTED = {  # name -> (tasks, models); counts from the SOURCE.md files
    "routerdc-gsm8k": (2319, 7),
    "routerdc-math-prealgebra": (871, 7),
    "routerdc-humaneval": (164, 7),
    "routerdc-mbpp": (500, 7),
    "routellm-gsm8k": (1319, 2),
    "fireact-hotpotqa": (464, 3),  # questions present in all three trajectory files (465 gpt, 499 13b, 500 7b)
    "tora-gsm8k": (1319, 2),
}


def test_every_source_is_registered_with_its_kind():
    assert set(SOURCES) == set(EXPECTED) | {"mmlu-pro-math"}
    for info in SOURCES.values():
        assert info.kind in {"math", "code", "qa"} and info.models and callable(info.loader)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_source_counts_and_ids(data_dir, name):
    n_tasks, n_models = EXPECTED[name]
    tasks = load_source(name, data_dir)
    assert len(tasks) == n_tasks
    assert len({t.id for t in tasks}) == n_tasks and all(t.id.startswith(name + "/") for t in tasks)
    assert {m for t in tasks for m in t.outcomes} == set(SOURCES[name].models)
    assert all(len(t.outcomes) == n_models and t.kind == SOURCES[name].kind for t in tasks)
    assert all(t.prompt_tokens and t.prompt_tokens > 0 for t in tasks)


def test_mmlu_pro_math_counts(mmlu):
    assert len(mmlu) == 1351
    counts = {m: sum(m in t.outcomes for t in mmlu) for m in mmlu_pro_math.MODELS}
    assert len(counts) == 29 and set(counts) == {m for t in mmlu for m in t.outcomes}
    assert counts["DeepSeek-Coder-V2"] == 1293 and all(v == 1351 for m, v in counts.items() if m != "DeepSeek-Coder-V2")
    assert all(o.score in (0.0, 1.0) for t in mmlu for o in t.outcomes.values())
    # jamba-1.5-large wrote answers only: its "CoT" is a few tokens
    assert statistics.median(t.outcomes["jamba-1.5-large"].output_tokens for t in mmlu) < 15
    # Llama-3 base files ran on into the next few-shot question; that part is cut (kept as untruncated_output_tokens)
    llama3 = [t.outcomes["Meta-Llama-3-8B"] for t in mmlu]
    cut = [o for o in llama3 if "untruncated_output_tokens" in o.model_extra]
    assert len(cut) > 900 and all(o.untruncated_output_tokens > o.output_tokens for o in cut)


def test_limit_and_prompt_tokens_match_tokenizer(data_dir):
    for name in SOURCES:
        tasks = load_source(name, data_dir, limit=5)
        assert len(tasks) == 5, name
        assert tasks == load_source(name, data_dir, limit=10)[:5], name
        assert [t.prompt_tokens for t in tasks] == tokens.count_tokens_batch([t.prompt for t in tasks]), name


def test_routellm_outcome_table(data_dir):
    tasks = load_source("routellm-gsm8k", data_dir)
    pairs = [(t.outcomes["Mixtral-8x7B-Instruct"].score, t.outcomes["GPT-4-1106"].score) for t in tasks]
    assert {p: pairs.count(p) for p in set(pairs)} == {(1, 1): 747, (0, 1): 383, (1, 0): 95, (0, 0): 94}
    assert sum(t.contaminated for t in tasks) == 12


def test_tora_accuracy_matches_reported(data_dir):
    tasks = load_source("tora-gsm8k", data_dir)
    for model, reported in (("ToRA-70B", 0.843), ("ToRA-Code-34B", 0.807)):
        acc = statistics.mean(t.outcomes[model].score for t in tasks)
        assert abs(acc - reported) < 0.005, (model, acc)
    t = tasks[0]
    for m, st in t.stages.items():
        assert t.outcomes[m].output_tokens == sum(s.output_tokens for s in st)
        assert st[0].observation_tokens > 0  # the program's output block fed back


def test_fireact_calls_per_question_match_source_md(data_dir):
    reported = {"Llama-2-7b-lora": 3.6, "Llama-2-13b-lora": 3.3, "gpt-3.5-turbo-0613-ft": 2.7}
    for model, fname in fireact_hotpotqa.FILES.items():
        run = read_json(data_dir, f"{fireact_hotpotqa.TRAJ_DIR}/{fname}")
        parse = {str: fireact_hotpotqa.parse_text_traj, list: fireact_hotpotqa.parse_chat_traj}
        calls = [len(parse[type(r["traj"])](r["traj"])) for r in run.values()]
        assert round(statistics.mean(calls), 1) == reported[model], model
    tasks = load_source("fireact-hotpotqa", data_dir)
    em = {m: statistics.mean(t.outcomes[m].score for t in tasks) for m in reported}
    assert em["Llama-2-7b-lora"] < em["Llama-2-13b-lora"] < em["gpt-3.5-turbo-0613-ft"]
    for t in tasks[:50]:
        for m, st in t.stages.items():
            assert len(st) >= 1 and t.outcomes[m].output_tokens == sum(s.output_tokens for s in st)
            assert all(s.observation_tokens > 0 for s in st)
            assert all(b.prompt_tokens > a.prompt_tokens for a, b in zip(st, st[1:]))


def test_routerdc_lengths_are_filled_deterministically(data_dir):
    a = load_source("routerdc-mbpp", data_dir, limit=20)
    b = load_source("routerdc-mbpp", data_dir, limit=40)[:20]
    assert a == b
    assert all(o.length_from == "lengthfill" and o.output_tokens >= 1 for t in a for o in t.outcomes.values())


def test_shipped_length_constants_match_the_data(data_dir):
    refit = lengthfill.params_as_dict(lengthfill_data.refit(data_dir))
    shipped = lengthfill.params_as_dict(lengthfill.PARAMS)
    assert refit.keys() == shipped.keys()
    for kind in shipped:
        for key, value in shipped[kind].items():
            if isinstance(value, dict):
                assert value.keys() == refit[kind][key].keys(), (kind, key)
                for k, v in value.items():
                    assert math.isclose(v, refit[kind][key][k], abs_tol=1e-5), (kind, key, k)
            else:
                assert math.isclose(value, refit[kind][key], abs_tol=1e-5), (kind, key)


def test_loaded_source_round_trips_through_jsonl(data_dir, tmp_path):
    tasks = load_source("fireact-hotpotqa", data_dir, limit=10)
    path = tmp_path / "w.jsonl"
    assert write_tasks(tasks, path) == 10
    back, report = load_tasks(path)
    assert report.accepted == 10 and back == tasks
    assert back[0].stages["Llama-2-7b-lora"][0].observation_tokens > 0


# --- loaders on a tiny fake data directory (no public data needed) ---------------------------------------------


def _xz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)


def test_mmlu_fallback_to_word_counts(tmp_path):
    q = {"question_id": 1, "question": "What is 2+2?", "options": ["3", "4"], "answer": "B", "answer_index": 1,
         "category": "math", "src": "x"}
    _xz(tmp_path / "mmlu_pro/questions.jsonl.xz", json.dumps(q) + "\n")
    rows = ["question_id,model,pred,answer_in_file,correct,gen_chars,gen_words",
            "1,Yi-6B,B,B,1,40,8", "1,gemma-7b,A,B,0,40,10"]
    _xz(tmp_path / "mmlu_pro/results.csv.xz", "\n".join(rows) + "\n")
    text = "two plus two makes four. The answer is (B)."  # 8 words
    _xz(tmp_path / "mmlu_pro/generations_math.jsonl.xz",
        json.dumps({"question_id": 1, "model": "Yi-6B", "correct": 1, "text": text}) + "\n")
    (task,) = mmlu_pro_math.load(tmp_path)
    assert task.prompt == "What is 2+2?\nOptions:\nA. 3\nB. 4"
    assert task.outcomes["Yi-6B"].output_tokens == tokens.count_tokens(text)
    ratio = tokens.count_tokens(text) / 8
    assert task.outcomes["gemma-7b"].length_from == "gen_words"
    assert task.outcomes["gemma-7b"].output_tokens == round(10 * ratio) and task.outcomes["gemma-7b"].score == 0.0


def test_missing_data_file_names_file_and_dir(tmp_path):
    with pytest.raises(DataDirError) as e:
        load_source("routellm-gsm8k", tmp_path)
    assert "routellm/gsm8k_responses.csv.xz" in str(e.value) and str(tmp_path) in str(e.value)


def test_unknown_source_lists_names():
    with pytest.raises(UnknownSourceError) as e:
        load_source("no-such-source")
    assert "no-such-source" in str(e.value) and "mmlu-pro-math" in str(e.value) and "fireact-hotpotqa" in str(e.value)


# --- tokenizer --------------------------------------------------------------------------------------------------

KNOWN = {  # verified by decoding each token: e.g. "The answer is (A)." -> The| answer| is| (|A|).
    "Hello world": 2,
    "hello, world!": 4,
    "The answer is (A).": 6,
    "": 0,
    "1234567890": 10,  # Qwen splits digits one by one
    "你好，世界": 3,
    "def f(x):\n    return x**2\n": 10,
}


@pytest.mark.parametrize("text,count", sorted(KNOWN.items()))
def test_known_token_counts(text, count):
    assert tokens.count_tokens(text) == count


def test_batch_equals_single_including_threaded_path():
    texts = list(KNOWN) + [f"Step {i}: compute {i} * {i + 1} = {i * (i + 1)}.\n" * 50 for i in range(300)]
    assert sum(map(len, texts)) > tokens._PARALLEL_MIN_CHARS  # exercises the thread pool
    assert tokens.count_tokens_batch(texts) == [tokens.count_tokens(t) for t in texts]
    assert tokens.count_tokens_batch([]) == []


def test_very_long_text_is_chunked():
    text = "word " * 30_000 + "\n" + "x" * 150_000
    n = tokens.count_tokens(text)
    assert 30_000 <= n <= 80_000
    assert tokens.TOKENIZER_NAME.startswith("Qwen")


def test_missing_vocabulary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(tokens.ENV_VAR, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(tokens.TokenizerUnavailable, match="nope.tiktoken"):
        tokens.vocab_path()


# --- synthetic generator ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    return synthetic.generate(1500, seed=7)


def test_synthetic_is_deterministic(synth):
    again = synthetic.generate(1500, seed=7)
    assert again == synth
    assert synthetic.generate(40, seed=7) == synth[:40]  # prefix-stable
    assert synthetic.generate(40, seed=8) != synth[:40]
    two = synthetic.generate(40, seed=7, models=["qwen2.5-1.5b", "qwen2.5-14b"])
    assert [t.outcomes["qwen2.5-14b"] for t in two] == [t.outcomes["qwen2.5-14b"] for t in synth[:40]]
    assert len({t.id for t in synth}) == len(synth)


def test_synthetic_accuracy_matches_targets_and_ordering(synth):
    models = list(synthetic.DEFAULT_MODELS)
    overall = [statistics.mean(t.outcomes[m].score for t in synth) for m in models]
    assert overall == sorted(overall) and overall[0] < overall[-1] - 0.08
    for bench in ("gsm8k", "math", "humaneval", "mbpp", "hotpotqa"):
        sel = [t for t in synth if t.benchmark == bench]
        assert len(sel) > 150
        a = synthetic.DISCRIMINATION[sel[0].kind]
        for m in models:
            acc = statistics.mean(t.outcomes[m].score for t in sel)
            theta = synthetic.ability(synthetic.ACCURACY[m][bench], a)
            expected = statistics.mean(1 / (1 + math.exp(-a * (theta - t.difficulty))) for t in sel)
            assert abs(acc - expected) < 4 * math.sqrt(expected * (1 - expected) / len(sel)) + 0.01, (bench, m)
            assert abs(acc - synthetic.ACCURACY[m][bench]) < 0.12, (bench, m, acc)  # sampled difficulties vary


def test_synthetic_length_moments(synth):
    for bench, (mu, sigma, _) in synthetic.PROMPT_LOGNORMAL.items():
        logs = np.log([t.prompt_tokens for t in synth if t.benchmark == bench])
        assert abs(logs.mean() - mu) < 0.15 and abs(logs.std() - sigma) < 0.12, bench
    for kind in ("math", "code"):
        p = lengthfill.PARAMS[kind]
        sel = [t for t in synth if t.kind == kind]
        resid = np.array([
            [math.log(t.outcomes[m].output_tokens) - p.b * math.log(t.prompt_tokens) for m in synthetic.DEFAULT_MODELS]
            for t in sel
        ])
        resid -= resid.mean(0)  # remove model verbosity and dataset offsets' average
        assert abs(resid.std() - p.sigma_residual) < 0.15 * p.sigma_residual + 0.05, kind
        corr = np.corrcoef(resid[:, 0], resid[:, 2])[0, 1]
        assert corr > 0.1, (kind, corr)  # shared per-task length factor
    qa = [t for t in synth if t.kind == "qa"]
    steps = [s for t in qa for st in t.stages.values() for s in st]
    assert abs(statistics.mean(math.log(s.output_tokens) for s in steps) - synthetic.QA_STEP_MU) < 0.1
    for t in qa:
        for m, st in t.stages.items():
            assert 2 <= len(st) <= 6 and t.outcomes[m].output_tokens == sum(s.output_tokens for s in st)
    assert all(t.stages is None for t in synth if t.kind != "qa")


def test_synthetic_prompt_words_carry_difficulty(synth):
    hard = {w for bench, bands in synthetic.TOPICS.items() for w in bands[2]}

    def share_hard(tasks):
        return statistics.mean(any(w in t.prompt for w in hard) for t in tasks)

    easy_tasks = [t for t in synth if t.difficulty < -0.43]
    hard_tasks = [t for t in synth if t.difficulty > 0.43]
    assert share_hard(hard_tasks) > share_hard(easy_tasks) + 0.2


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="unknown model"):
        synthetic.generate(3, models=["mystery-model"])
    with pytest.raises(ValueError, match="unknown kinds"):
        synthetic.generate(3, kinds=("poetry",))
    t = synthetic.generate(5, seed=1, models=["qwen2.5-3b", "qwen2.5-32b"], kinds=("math",))
    assert all(set(x.outcomes) == {"qwen2.5-3b", "qwen2.5-32b"} and x.kind == "math" for x in t)


# --- schema errors ----------------------------------------------------------------------------------------------

GOOD = {"id": "a", "kind": "math", "prompt": "p", "outcomes": {"m": {"score": 1.0, "output_tokens": 3}}}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "w.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "outcomes"} | {"id": "b"}), "field 'outcomes'"),
        (
            json.dumps(GOOD | {"id": "b", "outcomes": {"m": {"score": 1.5, "output_tokens": 3}}}),
            "field 'outcomes.m.score'",
        ),
    ],
)
def test_schema_errors_name_line_and_field(tmp_path, bad, needle):
    path = _write(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(WorkloadError) as e:
        load_tasks(path)
    assert f"{path}:2:" in str(e.value) and needle in str(e.value)


# --- data-dir resolution ----------------------------------------------------------------------------------------


def test_explicit_and_env_dirs_are_not_silently_replaced(tmp_path, monkeypatch):
    missing = tmp_path / "absent"
    with pytest.raises(DataDirError, match="explicit argument"):
        resolve_data_dir(missing)
    monkeypatch.setenv(datadir.ENV_VAR, str(missing))
    with pytest.raises(DataDirError, match=datadir.ENV_VAR):
        resolve_data_dir()
    monkeypatch.setenv(datadir.ENV_VAR, str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()


def test_fallbacks_and_error_listing(tmp_path, monkeypatch):
    monkeypatch.delenv(datadir.ENV_VAR, raising=False)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(datadir, "_repo_root", lambda: tmp_path / "elsewhere" / "root")
    with pytest.raises(DataDirError) as e:
        resolve_data_dir()
    msg = str(e.value)
    assert "current directory" in msg and "repository root" in msg and "shared" in msg
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_require_file_names_file_and_dir(tmp_path):
    with pytest.raises(DataDirError) as e:
        require_file(tmp_path, "x/y.json")
    assert "x/y.json" in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "f.txt").write_text("ok")
    assert require_file(tmp_path, "f.txt") == tmp_path / "f.txt"
