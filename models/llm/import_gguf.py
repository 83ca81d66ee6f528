#!/usr/bin/env python3
"""Turn a llama-architecture GGUF file into an onnxruntime-genai model folder.

The folder holds genai_config.json, model.onnx with its weights in
model.onnx.data, tokenizer.json, tokenizer_config.json (with the chat
template) and special_tokens_map.json: what `pocket-publish model pack --dir`
packs and what npud (or onnxruntime-genai) runs.

Two layouts:

  int4  the GGUF's 4-bit blocks as they are (Q4_1 -> MatMulNBits with the
        block offsets added back exactly), its Q8_0 embedding as an 8-bit
        LM head (MatMulNBits), int8 activations in the matmuls
        (accuracy_level 4), GroupQueryAttention with rotary inside and one
        KV buffer per sequence (past_present_share_buffer = true);
  fp32  every weight dequantized to float, standard ONNX ops only, each
        `present` fed back as the next `past` (past_present_share_buffer =
        false).

Both take an optional scalar input `logits_to_keep` (an initializer that
callers may override, 0 when they do not, as onnxruntime-genai does): when
it is N > 0 the LM head runs on the last N positions only. npud passes 1
while it reads a prompt, so the LM head (a fifth of a prompt's work, and a
logits tensor of prompt length x vocabulary) runs once, not per token.

Only what GGUF itself says is used: no network, no torch. GGUF stores
llama's Q and K rows permuted for its rotary layout; they are put back in
Hugging Face's order, so rotary halves are rotated as llama does.

Usage: import_gguf.py GGUF OUT_DIR [--layout int4|fp32] [--context N]
"""

import argparse
import json
import os
import sys

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
QK = 32  # elements per Q4_1 / Q8_0 block
KEEP = "logits_to_keep"


class Unsupported(Exception):
    pass


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise Unsupported(f"the GGUF file has no {key}")
    return f.contents()


# --- tokenizer ---------------------------------------------------------------

# Pre-tokenizers by GGUF's `tokenizer.ggml.pre`, as llama.cpp reads them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(pre):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level
    if pre in ("llama-bpe", "llama3"):
        split = pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        split = pt.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise Unsupported(f"pre-tokenizer {pre!r} is not supported (known: smollm, gpt-2, llama-bpe, qwen2)")


def write_tokenizer(reader, out):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise Unsupported(f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]
    types = list(field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(str(m).split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizer(str(field(reader, "tokenizer.ggml.pre", "default")))
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    # Control tokens (type 3) and user-defined ones (type 4) are matched whole.
    special = [AddedToken(tokens[i], special=ty == 3, normalized=False) for i, ty in enumerate(types) if ty in (3, 4)]
    tk.add_special_tokens([s for s in special if s.special])
    tk.add_tokens([s for s in special if not s.special])
    tk.save(os.path.join(out, "tokenizer.json"))

    bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(field(reader, "tokenizer.ggml.padding_token_id", eos))
    template = field(reader, "tokenizer.chat_template", "")
    if not template:
        raise Unsupported("the GGUF file has no chat template (tokenizer.chat_template)")
    config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[int(field(reader, "tokenizer.ggml.unknown_token_id", eos))],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": str(template),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(
            {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
            f,
            indent=2,
            ensure_ascii=False,
        )
    return bos, eos, pad


# --- weights -----------------------------------------------------------------


class Weights:
    def __init__(self, reader, heads, kv_heads):
        self.t = {t.name: t for t in reader.tensors}
        self.heads = heads
        self.kv_heads = kv_heads

    def has(self, name):
        return name in self.t

    def _rows(self, name):
        """The number of rows a permuted Q/K tensor's heads are split over."""
        if name.endswith("attn_q.weight"):
            return self.heads
        if name.endswith("attn_k.weight"):
            return self.kv_heads
        return None

    def unpermute(self, name, rows):
        """Undo GGUF's rotary permutation of Q/K rows (rows: [out, ...])."""
        heads = self._rows(name)
        if heads is None:
            return rows
        out = rows.shape[0]
        return rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def float(self, name):
        """The tensor as float32 [out, in] (or [n] for vectors)."""
        t = self.t[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        return self.unpermute(name, a)

    def raw(self, name, qtype):
        """The tensor's blocks as bytes [out, in / 32, block bytes], rows in HF order."""
        t = self.t[name]
        if t.tensor_type != qtype:
            raise Unsupported(f"{name} is {t.tensor_type.name}, not {qtype.name}")
        rows = np.asarray(t.data, dtype=np.uint8)
        block = gguf.GGML_QUANT_SIZES[qtype][1]
        rows = rows.reshape(rows.shape[0], -1, block)
        return self.unpermute(name, rows)


def q4_1_to_nbits(blocks):
    """Q4_1 blocks [N, nb, 20] -> MatMulNBits (B [N, nb, 16] uint8, scales
    [N*nb] f32, offsets [N, nb] f32) with w = scale * (q - 8) + offset, which
    is exactly GGUF's w = d * q + m."""
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[:, :, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: element j low, j+16 high
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # ORT: pairs per byte
    return packed, d.reshape(-1), m + 8.0 * d


def q8_0_to_nbits(blocks):
    """Q8_0 blocks [N, nb, 34] -> MatMulNBits 8-bit (B uint8 = q + 128,
    scales), exactly w = d * q."""
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[:, :, 2:34].view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d.reshape(-1)


# --- graph -------------------------------------------------------------------


class Graph:
    def __init__(self):
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const(self, array, hint="c"):
        return self.init(self.name(hint), np.asarray(array))

    def op(self, op, inputs, hint=None, outputs=1, domain=None, **attrs):
        outs = [self.name(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs


def keep_last(g, h):
    """h [batch, seq, hidden] cut to its last `logits_to_keep` positions,
    or all of them when that is 0."""
    g.init(KEEP, np.array(0, np.int64))
    seq = g.op("Shape", [h], start=1, end=2)
    want = g.op("Reshape", [KEEP, g.const(np.array([1], np.int64))])
    every = g.op("Equal", [want, g.const(np.array([0], np.int64))])
    n = g.op("Where", [every, seq, g.op("Min", [want, seq])])
    return g.op("Slice", [h, g.op("Sub", [seq, n]), seq, g.const(np.array([1], np.int64))])


def rope_cache(head, base, context):
    inv = 1.0 / (base ** (np.arange(0, head, 2, dtype=np.float64) / head))
    freqs = np.outer(np.arange(context, dtype=np.float64), inv)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def rms_norm(g, x, weight, eps):
    sq = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [mean, g.const(np.float32(eps))])])
    return g.op("Mul", [g.op("Div", [x, std]), weight])


def rotate(g, x, cos, sin):
    """Llama rotary on x [B, h, S, hd] with cos/sin [B, 1, S, hd/2]."""
    x1, x2 = g.op("Split", [x], outputs=2, axis=-1)
    a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
    b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
    return g.op("Concat", [a, b], axis=-1)


def build_fp32(w, p):
    g = Graph()
    L, nh, kvh, hd, H = p["layers"], p["heads"], p["kv_heads"], p["head"], p["hidden"]
    group = nh // kvh
    cos, sin = rope_cache(hd, p["rope_base"], p["context"])
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)
    embed = g.init("embed", w.float("token_embd.weight"))
    x = g.op("Gather", [embed, "input_ids"], axis=0)
    # Rotary angles for each position, [B, 1, S, hd/2].
    cos_p = g.op("Unsqueeze", [g.op("Gather", ["cos_cache", "position_ids"]), g.const(np.array([1], np.int64))])
    sin_p = g.op("Unsqueeze", [g.op("Gather", ["sin_cache", "position_ids"]), g.const(np.array([1], np.int64))])
    # Attention bias [B, 1, 1, S, T]: 0 where a query may see a key (causal
    # in cache positions, and the mask's 1s), -1e9 elsewhere.
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(np.int64(1))])
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(np.int64(1))])
    past = g.op("Sub", [total, seq])
    kidx = g.op("Range", [g.const(np.int64(0)), total, g.const(np.int64(1))])
    qidx = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(np.int64(1))]), g.const(np.array([1], np.int64))])
    causal = g.op("LessOrEqual", [kidx, qidx])
    keep = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const(np.array([1, 2, 3], np.int64))])
    allowed = g.op("And", [causal, keep])
    bias = g.op("Where", [allowed, g.const(np.float32(0.0)), g.const(np.float32(-1e9))])
    scale = g.const(np.float32(1.0 / np.sqrt(hd)))

    def linear(h, name):
        return g.op("MatMul", [h, g.init(name, np.ascontiguousarray(w.float(name).T))])

    for i in range(L):
        b = f"blk.{i}."
        h = rms_norm(g, x, g.init(b + "attn_norm.weight", w.float(b + "attn_norm.weight")), p["eps"])
        q = linear(h, b + "attn_q.weight")
        k = linear(h, b + "attn_k.weight")
        v = linear(h, b + "attn_v.weight")
        heads = lambda t, n: g.op("Transpose", [g.op("Reshape", [t, g.const(np.array([0, 0, n, hd], np.int64))])], perm=[0, 2, 1, 3])
        q = rotate(g, heads(q, nh), cos_p, sin_p)
        k = rotate(g, heads(k, kvh), cos_p, sin_p)
        v = heads(v, kvh)
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2)
        pv = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2)
        g.nodes.append(helper.make_node("Identity", [pk], [f"present.{i}.key"]))
        g.nodes.append(helper.make_node("Identity", [pv], [f"present.{i}.value"]))
        qg = g.op("Reshape", [q, g.const(np.array([0, kvh, group, -1, hd], np.int64))])
        kt = g.op("Unsqueeze", [g.op("Transpose", [pk], perm=[0, 1, 3, 2]), g.const(np.array([2], np.int64))])
        s = g.op("Add", [g.op("Mul", [g.op("MatMul", [qg, kt]), scale]), bias])
        probs = g.op("Softmax", [s], axis=-1)
        ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [pv, g.const(np.array([2], np.int64))])])
        ctx = g.op("Reshape", [ctx, g.const(np.array([0, nh, -1, hd], np.int64))])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const(np.array([0, 0, nh * hd], np.int64))])
        x = g.op("Add", [x, linear(ctx, b + "attn_output.weight")])
        h = rms_norm(g, x, g.init(b + "ffn_norm.weight", w.float(b + "ffn_norm.weight")), p["eps"])
        gate = linear(h, b + "ffn_gate.weight")
        up = linear(h, b + "ffn_up.weight")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, linear(act, b + "ffn_down.weight")])
    h = keep_last(g, rms_norm(g, x, g.init("output_norm.weight", w.float("output_norm.weight")), p["eps"]))
    flat = g.op("Reshape", [h, g.const(np.array([-1, H], np.int64))])
    if w.has("output.weight"):
        logits = g.op("Gemm", [flat, g.init("lm_head", w.float("output.weight"))], transB=1)
    else:  # tied: the embedding table, read transposed
        logits = g.op("Gemm", [flat, embed], transB=1)
    shape = g.op("Concat", [g.op("Shape", [h], start=0, end=2), g.const(np.array([-1], np.int64))], axis=0)
    g.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"]))
    return g


def build_int4(w, p):
    g = Graph()
    L, nh, kvh, hd, H = p["layers"], p["heads"], p["kv_heads"], p["head"], p["hidden"]
    ms = "com.microsoft"
    cos, sin = rope_cache(hd, p["rope_base"], p["context"])
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)
    # The residual stream is [batch * seq, hidden], so that each offset
    # correction is one Gemm (2-D only) that adds to its matmul's output
    # instead of a MatMul and an Add; with Q, K and V packed too, SmolLM2
    # runs 830 operators a token, not 916. GroupQueryAttention and the
    # logits take [batch, seq, ...].
    x = g.op("Gather", [g.init("embed", w.float("token_embd.weight")), g.op("Reshape", ["input_ids", g.const(np.array([-1], np.int64))])], axis=0)
    bs3 = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const(np.array([-1], np.int64))], axis=0)
    seqlens = g.op(
        "Cast",
        [g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const(np.array([1], np.int64))], keepdims=0), g.const(np.int64(1))])],
        to=TensorProto.INT32,
    )
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(np.int64(1))])], to=TensorProto.INT32)
    blocks = {}

    def nbits4(h, names, hint):
        """h @ W for Q4_1 matrices stacked by rows (one MatMulNBits), with
        the blocks' offsets added back exactly: each block's sum of h times
        its offset, one Gemm that adds to the MatMulNBits output."""
        parts = [q4_1_to_nbits(w.raw(n, gguf.GGMLQuantizationType.Q4_1)) for n in names]
        B = np.concatenate([a for a, _, _ in parts])
        scales = np.concatenate([s for _, s, _ in parts])
        off = np.concatenate([o for _, _, o in parts])
        N, nb = B.shape[0], B.shape[1]
        K = nb * QK
        y = g.op(
            "MatMulNBits",
            [h, g.init(hint + ".qweight", B), g.init(hint + ".scales", scales)],
            domain=ms, K=K, N=N, bits=4, block_size=QK, accuracy_level=4,
        )
        if nb not in blocks:
            blocks[nb] = g.const(np.array([0, nb, QK], np.int64))
        sums = g.op("ReduceSum", [g.op("Reshape", [h, blocks[nb]]), g.const(np.array([-1], np.int64))], keepdims=0)
        return g.op("Gemm", [sums, g.init(hint + ".offsets", np.ascontiguousarray(off.T)), y])

    flat = g.const(np.array([-1, H], np.int64))
    for i in range(L):
        b = f"blk.{i}."
        h = g.op("SimplifiedLayerNormalization", [x, g.init(b + "attn_norm.weight", w.float(b + "attn_norm.weight"))], axis=-1, epsilon=p["eps"])
        qkv = nbits4(h, [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"], b + "qkv")
        # Q, K and V packed, as GroupQueryAttention takes them: no Split.
        attn = helper.make_node(
            "GroupQueryAttention",
            [g.op("Reshape", [qkv, bs3]), "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, "cos_cache", "sin_cache"],
            [g.name("attn"), f"present.{i}.key", f"present.{i}.value"],
            name=g.name("GroupQueryAttention"), domain=ms,
            num_heads=nh, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0, scale=float(1.0 / np.sqrt(hd)),
        )
        g.nodes.append(attn)
        x = g.op("Add", [x, nbits4(g.op("Reshape", [attn.output[0], flat]), [b + "attn_output.weight"], b + "o")])
        h = g.op("SimplifiedLayerNormalization", [x, g.init(b + "ffn_norm.weight", w.float(b + "ffn_norm.weight"))], axis=-1, epsilon=p["eps"])
        gu = nbits4(h, [b + "ffn_gate.weight", b + "ffn_up.weight"], b + "gate_up")
        gate, up = g.op("Split", [gu], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, nbits4(act, [b + "ffn_down.weight"], b + "down")])
    h = g.op("SimplifiedLayerNormalization", [x, g.init("output_norm.weight", w.float("output_norm.weight"))], axis=-1, epsilon=p["eps"])
    h = keep_last(g, g.op("Reshape", [h, bs3]))
    head = "output.weight" if w.has("output.weight") else "token_embd.weight"
    B, scales = q8_0_to_nbits(w.raw(head, gguf.GGMLQuantizationType.Q8_0))
    g.nodes.append(
        helper.make_node(
            "MatMulNBits",
            [h, g.init("lm_head.qweight", B), g.init("lm_head.scales", scales)],
            ["logits"], name="lm_head", domain=ms,
            K=B.shape[1] * QK, N=B.shape[0], bits=8, block_size=QK, accuracy_level=4,
        )
    )
    return g


def save_model(g, p, layout, out):
    f32 = TensorProto.FLOAT
    past_len = "max_length" if layout == "int4" else "past_sequence_length"
    total_len = "max_length" if layout == "int4" else "total_sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if layout == "fp32":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    # An initializer that is also an input: callers may leave it out.
    inputs.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, []))
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "logits_length", p["vocab"]])]
    for i in range(p["layers"]):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32, ["batch_size", p["kv_heads"], past_len, p["head"]]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, ["batch_size", p["kv_heads"], total_len, p["head"]]))
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if layout == "int4":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, producer_name="pocketos-import-gguf", opset_imports=opsets)
    model.ir_version = 8
    data = "model.onnx.data"
    if os.path.exists(os.path.join(out, data)):
        os.remove(os.path.join(out, data))
    onnx.save_model(model, os.path.join(out, "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)


def genai_config(p, layout, bos, eos, pad):
    inputs = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if layout == "fp32":
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": p["context"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": p["head"],
                "hidden_size": p["hidden"],
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": p["heads"],
                "num_hidden_layers": p["layers"],
                "num_key_value_heads": p["kv_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": p["vocab"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": p["context"],
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": layout == "int4",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def convert(path, out, layout, context=None):
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise Unsupported(f"architecture {arch!r} is not supported (only llama)")
    heads = int(field(reader, "llama.attention.head_count"))
    hidden = int(field(reader, "llama.embedding_length"))
    p = {
        "layers": int(field(reader, "llama.block_count")),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(field(reader, "llama.attention.head_count_kv", heads)),
        "head": hidden // heads,
        "eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_base": float(field(reader, "llama.rope.freq_base", 10000.0)),
        "context": int(context or field(reader, "llama.context_length")),
        "vocab": len(field(reader, "tokenizer.ggml.tokens")),
    }
    if int(field(reader, "llama.rope.dimension_count", p["head"])) != p["head"]:
        raise Unsupported("partial rotary is not supported")
    os.makedirs(out, exist_ok=True)
    bos, eos, pad = write_tokenizer(reader, out)
    w = Weights(reader, p["heads"], p["kv_heads"])
    g = build_int4(w, p) if layout == "int4" else build_fp32(w, p)
    save_model(g, p, layout, out)
    with open(os.path.join(out, "genai_config.json"), "w") as f:
        json.dump(genai_config(p, layout, bos, eos, pad), f, indent=2)
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--layout", choices=["int4", "fp32"], default="int4")
    ap.add_argument("--context", type=int, help="context length to record (default: the GGUF's)")
    a = ap.parse_args()
    try:
        p = convert(a.gguf, a.out, a.layout, a.context)
    except Unsupported as e:
        print(f"import-gguf: {a.gguf}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{a.out}: llama, {p['layers']} layers, {p['heads']}/{p['kv_heads']} heads of {p['head']}, context {p['context']}, {a.layout}")


if __name__ == "__main__":
    main()
