"""The official openai Python SDK against the box's LLM API.

Usage: openai_client.py BASE_URL MODEL [KEY]. Checks what the SDK parses
and prints what it saw as JSON; any mismatch fails an assertion. With KEY,
it calls from 127.0.0.2 (another machine, to the box) with that API key,
and only chats.
"""
import json
import sys

import httpx
import openai

base, model = sys.argv[1], sys.argv[2]
question = [{"role": "user", "content": "What is 2+2?"}]
if len(sys.argv) > 3:
    remote = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=sys.argv[3], max_retries=0, http_client=remote)
    r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=8)
    print(json.dumps({"answer": r.choices[0].message.content}))
    sys.exit(0)
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused-on-loopback", max_retries=0)
seen = {}

# Not streamed.
r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
seen["answer"] = r.choices[0].message.content
seen["usage"] = r.usage.model_dump()

# Streamed, with usage: one id and created, the role first, the finish
# reason only last, then a usage chunk with no choices.
chunks = list(client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=24,
    stream=True, stream_options={"include_usage": True}))
assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
with_choices = [c for c in chunks if c.choices]
assert with_choices[0].choices[0].delta.role == "assistant"
assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
assert with_choices[-1].choices[0].finish_reason == r.choices[0].finish_reason
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
assert all(c.usage is None for c in chunks[:-1])
streamed = "".join(c.choices[0].delta.content or "" for c in with_choices)
assert streamed == seen["answer"], (streamed, seen["answer"])

# Without include_usage there is no usage chunk.
plain = list(client.chat.completions.create(model=model, messages=question, temperature=0,
                                            max_tokens=4, stream=True))
assert all(c.choices for c in plain) and all(c.usage is None for c in plain)

# A system message, and stop strings: the answer ends before one.
r2 = client.chat.completions.create(
    model=model, temperature=0, max_tokens=24, stop=["4"],
    messages=[{"role": "system", "content": "You answer briefly."}] + question)
assert "4" not in r2.choices[0].message.content and r2.choices[0].finish_reason == "stop"

# Seeded sampling repeats; another seed is allowed to differ.
def sample(seed):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=1.0, top_p=0.95, seed=seed, max_tokens=16).choices[0].message.content
a, b = sample(7), sample(7)
assert a == b, (a, b)
seen["seeded"] = a

# JSON schema output parses and holds the schema's keys.
schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
          "required": ["answer"], "additionalProperties": False}
r3 = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=32,
    response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}})
obj = json.loads(r3.choices[0].message.content)
assert set(obj) == {"answer"} and isinstance(obj["answer"], int), obj
seen["json"] = obj

# Plain completions.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
assert c.object == "text_completion" and c.choices[0].text
seen["completion"] = c.choices[0].text

# Models.
ids = [m.id for m in client.models.list().data]
assert model in ids, ids
assert client.models.retrieve(model).id == model

# Errors the SDK raises, in OpenAI's shape.
try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("an unknown model was answered")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "NotFound", e.body
try:
    client.chat.completions.create(model=model, messages=question, n=2)
    raise AssertionError("n=2 was answered")
except openai.BadRequestError as e:
    assert "n must be 1" in e.body["message"], e.body
    seen["bad_request"] = e.body
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was listed")
except openai.NotFoundError:
    pass

print(json.dumps(seen))
