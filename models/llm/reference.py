#!/usr/bin/env python3
"""What the reference implementations make of an LLM folder, for the tests.

Reads a JSON request on stdin and prints a JSON answer:

  {"folder": DIR, "texts": [...], "chats": [[{"role", "content"}, ...], ...],
   "decode": [[ids..], ..],
   "generate": [{"chat": [...]} | {"raw": "..."}, ...], "max_new": N}

  -> {"texts": [[ids..], ..]          Python tokenizers on tokenizer.json
      "chats": ["rendered", ..]        jinja2 on tokenizer_config.json's
                                       chat_template, as transformers renders it
      "decoded": ["text", ..]          Python tokenizers' decode
      "generate": [{"prompt": [ids..], "tokens": [ids..]}, ..]}
                                       onnxruntime-genai's greedy Generator on
                                       the folder, fed the prompt ids above

Nothing here is PocketOS code: it is what PocketOS is checked against.
"""

import json
import os
import sys

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


def render(template, messages, cfg):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    token = lambda k: cfg.get(k) if isinstance(cfg.get(k), str) else (cfg.get(k) or {}).get("content", "")
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=token("bos_token"), eos_token=token("eos_token")
    )


def main():
    req = json.load(sys.stdin)
    folder = req["folder"]
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    out = {
        "texts": [tok.encode(t, add_special_tokens=False).ids for t in req.get("texts", [])],
        "chats": [render(cfg["chat_template"], m, cfg) for m in req.get("chats", [])],
        "decoded": [tok.decode(ids, skip_special_tokens=False) for ids in req.get("decode", [])],
        "generate": [],
    }
    if req.get("generate"):
        import onnxruntime_genai as og

        model = og.Model(folder)
        for g in req["generate"]:
            text = g["raw"] if "raw" in g else render(cfg["chat_template"], g["chat"], cfg)
            ids = tok.encode(text, add_special_tokens=False).ids
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + req["max_new"], do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(ids)
            tokens = []
            while not gen.is_done():
                gen.generate_next_token()
                tokens.append(int(gen.get_next_tokens()[0]))
            out["generate"].append({"prompt": ids, "tokens": tokens})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
