#!/usr/bin/env python3
"""onnxruntime-genai's side of `just bench` (LLM part), on the same folder
and thread count as npud.

Reads {"folder", "threads", "prompt": [ids], "prompts": [[ids], ..],
"new": N, "streams": [1, 2, ..], "short": [[ids], ..]} as the first line
of stdin; prints JSON:
  ttft_s, decode_tps        one Generator a prompt: "prompt" as a warm-up,
                            then each of "prompts" and N tokens greedy; the
                            medians of their times (none without prompts)
  streams: {k: tps}         k Generators at once (one per request, as
                            onnxruntime-genai serves concurrent requests on
                            CPU), aggregate tokens/s
  peak_rss_mib              this process's peak RSS

With "serve": true instead, the Generator stays loaded after the warm-up:
each further line of stdin is a prompt's [ids], answered at once with a
line of {"ttft_s", "decode_tps", "tokens"}, so that its answers can
alternate with another engine's one by one.
"""

import json
import os
import resource
import sys
import threading
import time

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime_genai as og


def main():
    req = json.loads(sys.stdin.readline())
    config = og.Config(req["folder"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": req["threads"], "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    n = req["new"]

    def one(ids, out=None):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        count = 1
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
        t2 = time.perf_counter()
        r = {"ttft_s": t1 - t0, "decode_tps": (count - 1) / (t2 - t1), "tokens": count}
        if out is not None:
            out.append(r)
        return r

    one(req["prompt"])  # warm-up: ONNX Runtime's memory grows to the prompt
    if req.get("serve"):
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            print(json.dumps(one(json.loads(line))), flush=True)
        return
    runs = [one(p) for p in req["prompts"]]

    def median(key):
        return sorted(r[key] for r in runs)[len(runs) // 2] if runs else None
    streams = {}
    for k in req["streams"]:
        outs = []
        threads = [threading.Thread(target=one, args=(req["short"][i % len(req["short"])], outs)) for i in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        streams[str(k)] = sum(o["tokens"] for o in outs) / (time.perf_counter() - t0)
    json.dump({
        "ttft_s": median("ttft_s"), "decode_tps": median("decode_tps"), "streams": streams,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, sys.stdout)


if __name__ == "__main__":
    main()
