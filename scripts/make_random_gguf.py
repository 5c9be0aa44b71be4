#!/usr/bin/env python3
"""Writes a random-weight llama GGUF of a real model's shape, for scripts/gpu-check (a GPU machine carries no
model files). Weights are seeded Gaussian noise, never zeros (zeros run faster and would flatter the figures),
quantized with the `gguf` package (gguf==0.17.1): Q4_1 matrices, a Q8_0 tied embedding/head, f32 norms.
The vocabulary is SentencePiece-style ("llama": <unk>, <s>, </s>, 256 byte tokens, then filler pieces), so
any text tokenizes and the server loads the file from its metadata alone.

  python3 scripts/make_random_gguf.py --shape smollm2 --out /tmp/smollm2-shape.gguf
Shapes: smollm2 (SmolLM2-135M: 30 layers, width 576, 9 heads / 3 KV, FFN 1536, 49,152 tokens) and
llama-1b (Llama 3.2 1B: 16 layers, width 2048, 32 heads / 8 KV, FFN 8192, 128,256 tokens).
"""
import argparse

import gguf
import numpy as np

SHAPES = {
    "smollm2": dict(layers=30, width=576, heads=9, kv=3, ff=1536, vocab=49152, ctx=8192, base=100000.0),
    "llama-1b": dict(layers=16, width=2048, heads=32, kv=8, ff=8192, vocab=128256, ctx=8192, base=500000.0),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    s = SHAPES[a.shape]
    rng = np.random.default_rng(a.seed)
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random {a.shape}")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["width"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(s["base"])
    n = s["vocab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581p{i}" for i in range(n - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def mat(rows, cols, qtype=gguf.GGMLQuantizationType.Q4_1):
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cols ** -0.5)
        return gguf.quants.quantize(x, qtype), qtype

    def norm(k):
        return (1.0 + 0.1 * rng.standard_normal(k)).astype(np.float32)

    def add(name, q):
        w.add_tensor(name, q[0], raw_dtype=q[1])

    hd = s["width"] // s["heads"]
    # The tied head's rows have norm ~1 (entries of std width^-0.5), so the logits of the unit-RMS last state
    # have a spread of ~1 nat. Entries of std 1 (the first GPU run) gave logits of std ~24 (sqrt(width)): near
    # one-hot distributions in which rounding that two correct engines are free to differ in (30 random layers
    # amplify it) moved log-probabilities by whole nats. On the SmolLM2 shape, our CPU kernels against candle's
    # CPU ops then differed by mean KLD 0.012, and by 0.00046 with std 3 * width^-0.5, but by 1e-6 with this
    # scale, so a wrong graph (KLD of order 0.1-1) stands out from rounding by five orders of magnitude. The
    # same-top rate means little on such flat distributions; the KLD is the figure to read.
    add("token_embd.weight", mat(n, s["width"], gguf.GGMLQuantizationType.Q8_0))
    w.add_tensor("output_norm.weight", norm(s["width"]))
    for i in range(s["layers"]):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", norm(s["width"]))
        add(f"{p}.attn_q.weight", mat(s["heads"] * hd, s["width"]))
        add(f"{p}.attn_k.weight", mat(s["kv"] * hd, s["width"]))
        add(f"{p}.attn_v.weight", mat(s["kv"] * hd, s["width"]))
        add(f"{p}.attn_output.weight", mat(s["width"], s["heads"] * hd))
        w.add_tensor(f"{p}.ffn_norm.weight", norm(s["width"]))
        add(f"{p}.ffn_gate.weight", mat(s["ff"], s["width"]))
        add(f"{p}.ffn_up.weight", mat(s["ff"], s["width"]))
        add(f"{p}.ffn_down.weight", mat(s["width"], s["ff"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
