"""The official ollama Python client against the box's LLM API.

Usage: ollama_client.py BASE_URL MODEL PULLABLE. Chats, generates, lists,
shows, pulls PULLABLE from the box's signed catalog with progress, then
deletes it; prints what it saw as JSON. Any mismatch fails an assertion.
"""
import json
import sys

import ollama

base, model, pullable = sys.argv[1:4]
client = ollama.Client(host=base)
seen = {}
question = [{"role": "user", "content": "What is 2+2?"}]
opts = {"temperature": 0, "num_predict": 24}

r = client.chat(model=model, messages=question, options=opts)
assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant"
assert r.eval_count > 0 and r.prompt_eval_count > 0 and r.eval_duration > 0
assert r.total_duration >= r.eval_duration + r.prompt_eval_duration
seen["answer"] = r.message.content

parts = list(client.chat(model=model, messages=question, options=opts, stream=True))
assert all(not p.done for p in parts[:-1]) and parts[-1].done
assert "".join(p.message.content for p in parts) == r.message.content
assert parts[-1].eval_count == r.eval_count

g = client.generate(model=model, prompt="What is 2+2?", options=opts)
assert g.done and g.response == r.message.content, (g.response, r.message.content)
raw = client.generate(model=model, prompt="The capital of France is", raw=True,
                      options={"temperature": 0, "num_predict": 6})
assert raw.response
seen["raw"] = raw.response

j = client.chat(model=model, messages=question, format="json", options={"temperature": 0, "num_predict": 32})
seen["json"] = json.loads(j.message.content)

names = [m.model for m in client.list().models]
assert model in names, names
show = client.show(model)
assert show.modelinfo[f"{show.details.family}.context_length"] > 0, show.modelinfo
assert "chat" in show.capabilities and show.template
seen["context_length"] = show.modelinfo[f"{show.details.family}.context_length"]
running = [m.model for m in client.ps().models]
assert model in running, running

statuses = [p.status for p in client.pull(pullable, stream=True)]
assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
assert pullable in [m.model for m in client.list().models]
seen["pull"] = statuses
try:
    client.pull("no-such-model")
    raise AssertionError("a model outside the catalog was pulled")
except ollama.ResponseError as e:
    assert e.status_code == 404, e
    seen["pull_refused"] = e.error

client.delete(pullable)
assert pullable not in [m.model for m in client.list().models]
try:
    client.chat(model="no-such-model", messages=question)
    raise AssertionError("an unknown model was answered")
except ollama.ResponseError as e:
    assert e.status_code == 404, e

print(json.dumps(seen))
