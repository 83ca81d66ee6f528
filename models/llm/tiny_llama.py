#!/usr/bin/env python3
"""Write a tiny seeded random llama as a GGUF file, for fast tests.

Two layers, hidden size 64, 4 query heads and 2 KV heads of 16: a few MB.
Its tokenizer and chat template are SmolLM2's, read from the GGUF given, so
the tiny model tokenizes and renders chats exactly as the real one does,
and answers with seeded nonsense that is the same on every machine. Its
matrices are Q4_1 and its embedding and LM head Q8_0, as in SmolLM2's
GGUF (whose head is its embedding), so import_gguf.py converts it along the
same paths.

Usage: tiny_llama.py TOKENIZER_GGUF OUT_GGUF [--seed 7]
"""

import argparse

import gguf
import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 2, 64, 4, 2, 128, 2048


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer_gguf")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    src = gguf.GGUFReader(a.tokenizer_gguf)
    rng = np.random.default_rng(a.seed)
    tokens = [str(t) for t in src.fields["tokenizer.ggml.tokens"].contents()]
    head = HIDDEN // HEADS

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("tiny-random-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(src.fields["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(src.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(list(src.fields["tokenizer.ggml.token_type"].contents()))
    w.add_token_merges([str(m) for m in src.fields["tokenizer.ggml.merges"].contents()])
    for key, add in (
        ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
        ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
        ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id),
    ):
        add(int(src.fields[key].contents()))
    w.add_add_bos_token(False)
    w.add_chat_template(src.fields["tokenizer.chat_template"].contents())

    def matrix(name, rows, cols, qtype=gguf.GGMLQuantizationType.Q4_1, scale=None):
        data = rng.standard_normal((rows, cols)).astype(np.float32) * (scale or 2.0 / np.sqrt(cols))
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), HIDDEN, gguf.GGMLQuantizationType.Q8_0, scale=1.0)
    for i in range(LAYERS):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        matrix(b + "attn_q.weight", HEADS * head, HIDDEN)
        matrix(b + "attn_k.weight", KV_HEADS * head, HIDDEN)
        matrix(b + "attn_v.weight", KV_HEADS * head, HIDDEN)
        matrix(b + "attn_output.weight", HIDDEN, HEADS * head)
        norm(b + "ffn_norm.weight")
        matrix(b + "ffn_gate.weight", FFN, HIDDEN)
        matrix(b + "ffn_up.weight", FFN, HIDDEN)
        matrix(b + "ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    # An LM head of its own: a random model whose head is its embedding
    # mostly repeats one token.
    matrix("output.weight", len(tokens), HIDDEN, gguf.GGMLQuantizationType.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
