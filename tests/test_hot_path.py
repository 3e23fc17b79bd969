"""The forwarding hot path: what passes through untouched is not re-serialised, the upstream stream is split into
lines however its bytes arrive, a slow upstream and a client that leaves are told apart, the trace writer batches."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from chimera.serve.proxy import _lines, request_content
from chimera.serve.relay import whole_answer
from chimera.serve.trace import TraceStore


# ---- request bodies --------------------------------------------------------------------------------------------
def test_a_body_passed_through_is_the_clients_bytes():
    raw = b'{"model": "m",  "messages": [{"role": "user", "content": "hi \\u00e9"}]}'
    body = json.loads(raw)
    assert request_content(dict(body), body, raw) is raw
    assert request_content(dict(body), body, b"\xef\xbb\xbf" + raw) == raw  # a BOM is not forwarded


@pytest.mark.parametrize("change", ["model", "hint", "usage"])
def test_a_body_the_gateway_changes_is_encoded_as_httpx_would(change):
    body = {"model": "chimera", "messages": [{"role": "user", "content": "é"}], "stream": True}
    sent = {**body, "model": "m"} if change == "model" else dict(body)
    if change == "hint":
        body = {**body, "chimera": {"workflow_id": "w"}}
    if change == "usage":
        sent["stream_options"] = {"include_usage": True}
    raw = json.dumps(body).encode()
    assert request_content(sent, body, raw) == json.dumps(sent, ensure_ascii=False, separators=(",", ":"),
                                                          allow_nan=False).encode()


def test_a_body_with_two_model_keys_is_not_passed_through():
    raw = b'{"model": "other", "model": "m", "messages": []}'
    body = json.loads(raw)
    assert request_content(dict(body), body, raw) == b'{"model":"m","messages":[]}'


# ---- whole answers -----------------------------------------------------------------------------------------------
def test_an_answer_naming_the_served_model_goes_as_it_came():
    content = b'{"id": "c1", "model": "m", "choices": [], "usage": {"completion_tokens": 2}}'
    data, as_is = whole_answer(content, "m")
    assert as_is and data["usage"]["completion_tokens"] == 2
    assert whole_answer(b'{"id": "c1", "choices": []}', "m")[1]  # no model field: nothing to rename


@pytest.mark.parametrize("content", [
    b'{"model": "backend-name", "choices": []}',  # renamed to the served model: re-encoded
    b'{"model": "m", "x": NaN}', b'{"model": "m", "x": 1e999}',  # what the encoder refuses (a 500, as before)
    b'{"model": "m", "x": "\\ud800"}',  # a lone surrogate
    b'\xef\xbb\xbf{"model": "m"}', '{"model": "m"}'.encode("utf-16-le"),  # not plain UTF-8 JSON text
    b'[1, 2]',
])
def test_an_answer_that_needs_rewriting_or_is_odd_is_not_passed_through(content):
    assert whole_answer(content, "m")[1] is False


# ---- the upstream stream's lines ---------------------------------------------------------------------------------
class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self):
        for c in self.chunks:
            yield c


class _Resp:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


async def _all(chunks: list[bytes]) -> list[str]:
    return [line async for line in _lines(_Resp(chunks))]  # type: ignore[arg-type]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 1000])
def test_lines_are_the_same_however_the_bytes_are_cut(cut):
    text = 'data: {"a": "é"}\r\n\r\ndata: x\n\ndata: y\rdata: z\n\ndata: [DONE]\n\n'.encode()
    chunks = [text[i:i + cut] for i in range(0, len(text), cut)]
    assert asyncio.run(_all(chunks)) == text.decode().splitlines()


def test_a_line_longer_than_any_buffer_is_one_line():
    long = "data: " + "x" * 300_000
    assert asyncio.run(_all([long.encode()[i:i + 4096] for i in range(0, len(long), 4096)] + [b"\n"])) == [long]


def test_an_unfinished_last_line_and_bad_bytes_are_kept():
    assert asyncio.run(_all([b"data: a\n", b"data: \xff", b"b"])) == ["data: a", "data: \ufffdb"]


# ---- the trace writer batches, flush does not wait for the batch -------------------------------------------------
def test_the_writer_commits_rows_in_batches_and_flush_is_prompt(tmp_path):
    store = TraceStore(tmp_path / "t.sqlite", batch_s=0.5)
    try:
        for i in range(50):
            store.log_call({"workflow_id": f"w{i}", "status": "ok"})
        t0 = time.monotonic()
        assert store.flush()
        assert time.monotonic() - t0 < 0.4  # flush cuts the gathering short
        assert store.stats()["written"] == 50
        store.log_call({"workflow_id": "late", "status": "ok"})
        time.sleep(1.0)  # one batch later the row is committed without a flush
        assert store.stats()["written"] == 51
    finally:
        store.close()
