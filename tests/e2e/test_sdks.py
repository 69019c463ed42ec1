"""The official openai and anthropic SDKs, pointed at Envoy, work unchanged; their usage matches
the access log and the fake upstream's ledger."""
import uuid

import anthropic
import openai
import pytest

from conftest import KEYS


def ids():
    rid = str(uuid.uuid4())
    return rid, {"x-request-id": rid, "x-fake-request-id": rid}


@pytest.fixture()
def oai(envoy):
    return openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEYS["team-a"], max_retries=0)


@pytest.fixture()
def claude(envoy):
    return anthropic.Anthropic(base_url=envoy.url, api_key=KEYS["team-b"], max_retries=0)


def check(envoy, upstream, rid, tenant="team-a"):
    line = envoy.access_line(rid)
    usage = upstream.entry(rid)["usage"]
    assert line["tenant"] == tenant
    assert line["usage_source"] == "reported"
    assert (int(line["input_tokens"]), int(line["output_tokens"]), int(line["cached_input_tokens"])) == (
        usage["input"], usage["output"], usage["cached_input"])
    return line, usage


def test_openai_chat(envoy, upstream, oai):
    rid, headers = ids()
    resp = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers=headers)
    assert resp.choices[0].message.content
    _, usage = check(envoy, upstream, rid)
    assert resp.usage.prompt_tokens == usage["input"] and resp.usage.completion_tokens == usage["output"]


def test_openai_chat_streaming_with_include_usage(envoy, upstream, oai):
    rid, headers = ids()
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                         stream=True, stream_options={"include_usage": True},
                                         extra_headers={**headers, "x-fake-chunks": "5"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    _, usage = check(envoy, upstream, rid)
    assert final.usage.completion_tokens == usage["output"]


def test_openai_responses(envoy, upstream, oai):
    rid, headers = ids()
    resp = oai.responses.create(model="gpt-4o-mini", input="hi", extra_headers=headers)
    assert resp.output_text
    _, usage = check(envoy, upstream, rid)
    assert resp.usage.output_tokens == usage["output"]


def test_openai_responses_streaming(envoy, upstream, oai):
    rid, headers = ids()
    events = list(oai.responses.create(model="gpt-4o-mini", input="hi", stream=True, extra_headers=headers))
    assert events[-1].type == "response.completed"
    _, usage = check(envoy, upstream, rid)
    assert events[-1].response.usage.output_tokens == usage["output"]


def test_openai_embeddings(envoy, upstream, oai):
    rid, headers = ids()
    resp = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"], extra_headers=headers)
    assert len(resp.data) == 2 and len(resp.data[0].embedding) > 0
    line, usage = check(envoy, upstream, rid)
    assert line["api"] == "embeddings" and resp.usage.prompt_tokens == usage["input"]


def test_anthropic_messages(envoy, upstream, claude):
    rid, headers = ids()
    msg = claude.messages.create(model="claude-3-5-haiku", max_tokens=64,
                                 messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
    assert msg.content[0].text
    check(envoy, upstream, rid, tenant="team-b")


def test_anthropic_messages_streaming(envoy, upstream, claude):
    rid, headers = ids()
    # 100 input tokens reported: the prompt holds at least 100 bytes (reported input is bounded
    # by the body's bytes).
    with claude.messages.stream(model="claude-3-5-haiku", max_tokens=64,
                                messages=[{"role": "user", "content": "hi " + "x" * 120}],
                                extra_headers={**headers, "x-fake-cached-tokens": "30",
                                               "x-fake-cache-write-tokens": "12",
                                               "x-fake-input-tokens": "100"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    line, usage = check(envoy, upstream, rid, tenant="team-b")
    # Anthropic's input_tokens excludes cache tokens; Tollgate's input includes them.
    assert final.usage.input_tokens == 100 - 30 - 12
    assert line["input_tokens"] == 100 and line["cache_write_input_tokens"] == 12


def test_openai_sdk_raises_authentication_error(envoy):
    client = openai.OpenAI(base_url=envoy.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "invalid_api_key"


def test_anthropic_sdk_raises_authentication_error(envoy):
    client = anthropic.Anthropic(base_url=envoy.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="claude-3-5-haiku", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
