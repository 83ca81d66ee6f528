// llama.cpp's side of `just bench` (LLM part), on the GGUF file the folder
// was converted from, with the same thread count and prompts as npud.
//
// Reads {"gguf", "threads", "prompt": [ids], "prompts": [[ids], ..],
// "new": N, "streams": [1, 2, ..], "short": [[ids], ..]} on stdin; prints
// JSON:
//   ttft_s, decode_tps   one sequence: "prompt" as a warm-up, then each of
//                        "prompts" and N tokens greedy; the medians of their
//                        times (none without prompts)
//   streams: {k: tps}    k sequences of one context at once (llama.cpp
//                        batches them), aggregate tokens/s
//   peak_rss_mib         this process's peak RSS
//   llama_cpp            the llama.cpp release the binary was built from
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
import {readFileSync} from "node:fs";

const req = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: req.gguf});

async function one(sequence, ids) {
    const t0 = performance.now();
    let t1 = t0;
    let count = 0;
    for await (const _ of sequence.evaluate(ids, {temperature: 0})) {
        count += 1;
        if (count === 1) t1 = performance.now();
        if (count >= req.new) break;
    }
    const t2 = performance.now();
    return {ttft_s: (t1 - t0) / 1000, decode_tps: (count - 1) / ((t2 - t1) / 1000), tokens: count};
}

const context = await model.createContext({
    contextSize: 1024, sequences: 1, threads: req.threads, batchSize: 512,
});
const sequence = context.getSequence();
await one(sequence, req.prompt); // warm-up, as long as the runs
const runs = [];
for (const ids of req.prompts) {
    await sequence.clearHistory();
    runs.push(await one(sequence, ids));
}
await context.dispose();
const median = (key) => runs.length === 0 ? null
    : runs.map((r) => r[key]).sort((a, b) => a - b)[Math.floor(runs.length / 2)];

const streams = {};
for (const k of req.streams) {
    const ctx = await model.createContext({
        contextSize: 1024, sequences: k, threads: req.threads, batchSize: 512,
    });
    const seqs = Array.from({length: k}, () => ctx.getSequence());
    const t0 = performance.now();
    const outs = await Promise.all(seqs.map((s, i) => one(s, req.short[i % req.short.length])));
    streams[k] = outs.reduce((n, o) => n + o.tokens, 0) / ((performance.now() - t0) / 1000);
    await ctx.dispose();
}

const meta = JSON.parse(readFileSync(
    new URL("node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/_nlcBuildMetadata.json", import.meta.url),
    "utf8",
));
process.stdout.write(JSON.stringify({
    ttft_s: median("ttft_s"),
    decode_tps: median("decode_tps"),
    streams,
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
    llama_cpp: meta.buildOptions.llamaCpp.release,
}));
