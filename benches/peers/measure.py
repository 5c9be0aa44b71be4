#!/usr/bin/env python3
"""Measures omnibus and its peers on this machine in one run, interleaved, and writes BENCHMARKS.md.

Peers: sentence-transformers and ONNX Runtime (in-process, the same MiniLM weights), llama.cpp
(llama-bench, and llama-server with continuous batching over HTTP). omnibus is measured as users see it:
its gRPC server driven by `omnibus bench`. Every figure is the median of --rounds rounds; rounds
interleave omnibus and the peers so drifting machine speed hits both. Run through scripts/bench, which
installs the peers first.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OMNIBUS = ROOT / "target/release/omnibus"
MODELS = ROOT / "models"
MINILM = MODELS / "all-MiniLM-L6-v2"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT = "The quick brown fox jumps over the lazy dog again"  # 12 tokens with [CLS]/[SEP]
CORPUS_DIR = ROOT / "benches/corpus"
PROMPT20 = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
THREADS = 2
P99_RATE = 50  # requests/s of the open-loop Predict p99 row: about half the capacity


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- omnibus
class Omnibus:
    def __init__(self, model_dir=MODELS, ready="predict"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(OMNIBUS), "serve", "--listen", f"127.0.0.1:{self.port}", "--model-dir", str(model_dir),
             "--threads", str(THREADS)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.proc.stdout.readline()  # the listening line
        # Ready when a request succeeds (the bench client reports errors otherwise).
        probe = ["--max-new-tokens", "1", "--prompt", "hi"] if ready == "generate" else []
        for _ in range(600):
            r = self.bench(ready, "-c", "1", "--requests", "1", "--warmup", "0s", *probe)
            if r["requests_ok"] == 1:
                break
            time.sleep(0.1)
        self.rss_start = rss_mb(self.proc.pid)

    def bench(self, kind, *args):
        out = subprocess.run([str(OMNIBUS), "bench", kind, "--addr", f"http://127.0.0.1:{self.port}", "--json",
                              "--quiet", *args], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    def stop(self):
        self.rss_end = rss_mb(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- NVIDIA's perf_analyzer
class PerfAnalyzer:
    """perf_analyzer from the tritonclient[grpc] wheel, driving omnibus's Open Inference Protocol side."""

    def __init__(self, binary: Path, libdir: Path, work: Path):
        self.binary, self.libdir = binary, libdir
        self.input = work / "pa-input.json"
        self.input.write_text(json.dumps({"data": [{"TEXT": [SHORT]}]}))

    def embeddings(self, port, concurrency, seconds):
        env = dict(os.environ, LD_LIBRARY_PATH=str(self.libdir))
        out = subprocess.run(
            [str(self.binary), "-m", "all-MiniLM-L6-v2", "-u", f"127.0.0.1:{port}", "-i", "grpc",
             "--input-data", str(self.input), "--shape", "TEXT:1",
             "--concurrency-range", f"{concurrency}:{concurrency}",
             "--measurement-interval", str(int(seconds * 1000))],
            capture_output=True, text=True, env=env, check=True).stdout
        m = re.search(r"Concurrency: \d+, throughput: ([0-9.]+) infer/sec, latency (\d+) usec", out)
        if not m:
            raise RuntimeError(f"perf_analyzer output not understood:\n{out}")
        return float(m.group(1)), float(m.group(2)) / 1000.0


# ---------------------------------------------------------------- embedding peers
def peer_rate(encode, batch, seconds, texts=None):
    """Sentences/s of `encode` on batches of `batch` consecutive texts (cycling through `texts`), or of
    the uniform short sentence when `texts` is None. Each batch is padded to its own longest, as the
    peers do it: they pay for their padding."""
    texts = texts or [SHORT]
    batches = [[texts[(i + j) % len(texts)] for j in range(batch)] for i in range(0, max(len(texts), batch), batch)]
    encode(batches[0])
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        b = batches[i % len(batches)]
        encode(b)
        n += len(b)
        i += 1
    return n / (time.perf_counter() - t0)


class SentenceTransformersPeer:
    def __init__(self):
        import torch
        from sentence_transformers import SentenceTransformer
        torch.set_num_threads(THREADS)
        self.model = SentenceTransformer(str(MINILM), device="cpu")

    def encode(self, xs):
        return self.model.encode(xs, batch_size=len(xs))

    def rate(self, batch, seconds=4.0, texts=None):
        return peer_rate(self.encode, batch, seconds, texts)


class OnnxPeer:
    def __init__(self, work: Path):
        import numpy as np
        import onnxruntime as ort
        from transformers import AutoTokenizer
        self.np = np
        path = work / "minilm.onnx"
        if not path.exists():
            self.export(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.tok = AutoTokenizer.from_pretrained(str(MINILM))

    @staticmethod
    def export(path: Path):
        import torch
        from transformers import AutoModel
        class Encoder(torch.nn.Module):
            # Keyword arguments: BertModel's positional order differs between transformers versions.
            def __init__(self):
                super().__init__()
                self.bert = AutoModel.from_pretrained(str(MINILM)).eval()

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).last_hidden_state

        ids = torch.ones(2, 12, dtype=torch.long)
        torch.onnx.export(Encoder(), (ids, ids, torch.zeros_like(ids)), str(path),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "b", 1: "s"} for n in ["input_ids", "attention_mask", "token_type_ids"]},
                          opset_version=17, dynamo=False)

    def encode(self, xs):
        np = self.np
        enc = self.tok(xs, padding=True, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]}
        hidden = self.session.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        v = (hidden * mask).sum(1) / mask.sum(1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def rate(self, batch, seconds=4.0, texts=None):
        return peer_rate(self.encode, batch, seconds, texts)


# ---------------------------------------------------------------- llama.cpp
class LlamaCpp:
    def __init__(self, bindir: Path, gguf: Path = GGUF):
        self.bin = bindir
        self.gguf = gguf

    def bench(self, *args):
        out = subprocess.run([str(self.bin / "llama-bench"), "-m", str(self.gguf), "-t", str(THREADS), "-o", "json",
                              "-r", "3", *args], capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]["avg_ts"]

    def start_server(self, slots=16):
        self.port = free_port()
        self.server = subprocess.Popen(
            [str(self.bin / "llama-server"), "-m", str(self.gguf), "-t", str(THREADS), "-np", str(slots),
             "-c", str(slots * 512), "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.1)
        self.rss = rss_mb(self.server.pid)

    def stream(self, prompt, n):
        """One streamed completion: (time to first token, tokens, total seconds)."""
        body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "stream": True,
                           "cache_prompt": False, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: "):
                    msg = json.loads(line[6:])
                    if msg.get("content") or msg.get("tokens"):
                        tokens += 1
                        ttft = ttft or time.perf_counter() - t0
                    if msg.get("stop"):
                        break
        return ttft or 0.0, tokens, time.perf_counter() - t0

    def closed_loop(self, clients, seconds, prompt=PROMPT20, n=64):
        stop = time.perf_counter() + seconds
        results, lock = [], threading.Lock()

        def worker():
            while time.perf_counter() < stop:
                r = self.stream(prompt, n)
                with lock:
                    results.append(r)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        elapsed = time.perf_counter() - t0
        return {"tok_s": sum(r[1] for r in results) / elapsed, "ttft_ms": statistics.median(r[0] for r in results) * 1e3}

    def stop_server(self):
        self.server.terminate()
        self.server.wait(timeout=30)


# ---------------------------------------------------------------- the run
def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    simd = [f for f in ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"] if f" {f}" in flags]
    mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, SIMD: {' '.join(simd)}"


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def embeddings_round(r, a, st, ort, pa, corpus, last):
    secs = f"{a.seconds}s"
    om = Omnibus()
    log("omnibus embeddings: the corpus, then the uniform short sentence")
    for c in [1, 8, 32]:
        rep = om.bench("predict", "-c", str(c), "--duration", secs, "--input-file", str(corpus))
        r[f"o_c{c}"].append(rep["items_per_s"])
        r[f"o_c{c}_p50"].append(rep["latency_ms"]["p50"])
    for c in [1, 8, 32]:
        rep = om.bench("predict", "-c", str(c), "--duration", secs, "--input", SHORT)
        r[f"o_u{c}"].append(rep["items_per_s"])
        r[f"o_u{c}_p50"].append(rep["latency_ms"]["p50"])
    if pa:
        log("perf_analyzer: embeddings over the Open Inference Protocol")
        for c in [1, 32]:
            rate, ms = pa.embeddings(om.port, c, a.seconds)
            r[f"pa{c}"].append(rate)
            r[f"pa{c}_ms"].append(ms)
    log("omnibus at a fixed rate")
    e = om.bench("predict", "--rate", str(P99_RATE), "-c", "256", "--duration", secs, "--input-file", str(corpus))
    r["o_p99e"].append(e["latency_ms"]["p99"])
    if last and a.memory_seconds > 0:
        log(f"omnibus memory: {a.memory_seconds:.0f} s of 32 callers on the corpus")
        warm = rss_mb(om.proc.pid)
        om.bench("predict", "-c", "32", "--duration", f"{a.memory_seconds}s", "--input-file", str(corpus))
        r["rss_warm"].append(warm)
        r["rss_after"].append(rss_mb(om.proc.pid))
    om.stop()
    r["rss_start"].append(om.rss_start)
    r["rss_end"].append(om.rss_end)
    log("peers: embeddings (the corpus, then the uniform short sentence)")
    texts = [l for l in corpus.read_text(encoding="utf-8").splitlines() if l.strip()]
    for b in [1, 8, 32]:
        r[f"st_c{b}"].append(st.rate(b, a.seconds / 2, texts))
        r[f"ort_c{b}"].append(ort.rate(b, a.seconds / 2, texts))
        r[f"st_u{b}"].append(st.rate(b, a.seconds / 2))
        r[f"ort_u{b}"].append(ort.rate(b, a.seconds / 2))


def generation_round(r, a, llama):
    secs = f"{a.seconds}s"
    if a.gguf == GGUF:
        om = Omnibus()
    else:
        # The file alone in a folder of its own, so only it loads.
        alone = a.work / f"gguf-{a.gguf.stem}"
        alone.mkdir(exist_ok=True)
        link = alone / a.gguf.name
        if not link.exists():
            link.symlink_to(a.gguf.resolve())
        om = Omnibus(alone, ready="generate")
    log("omnibus generation")
    g = om.bench("generate", "-c", "1", "--max-new-tokens", "128", "--duration", secs, "--prompt", PROMPT20)
    r["o_dec"].append(1000.0 / g["inter_token_ms"]["p50"])
    g = om.bench("generate", "-c", "1", "--max-new-tokens", "1", "--duration", secs, "--prompt", "word",
                 "--prompt-repeat", "256")
    r["o_pp"].append(256 / (g["ttft_ms"]["p50"] / 1000.0))
    for c in [1, 4, 8, 16]:
        g = om.bench("generate", "-c", str(c), "--max-new-tokens", "64", "--duration", str(a.seconds * 1.5) + "s",
                     "--prompt", PROMPT20)
        r[f"o_g{c}"].append(g["items_per_s"])
        if c == 1:
            r["o_ttft"].append(g["ttft_ms"]["p50"])
        if c == 16:
            r["o_t16"].append(g["ttft_ms"]["p50"])
    g = om.bench("generate", "--rate", "2", "-c", "64", "--max-new-tokens", "32", "--duration", secs,
                 "--prompt", PROMPT20)
    r["o_p99g"].append(g["latency_ms"]["p99"])
    om.stop()
    r["rss_gen"].append(om.rss_start)
    log("llama.cpp: llama-bench")
    r["l_dec"].append(llama.bench("-n", "128", "-p", "0"))
    r["l_pp"].append(llama.bench("-p", "256", "-n", "0"))
    log("llama.cpp: llama-server")
    llama.start_server()
    for c in [1, 4, 8, 16]:
        res = llama.closed_loop(c, a.seconds * 1.5)
        r[f"l_g{c}"].append(res["tok_s"])
        if c == 1:
            r["l_ttft"].append(res["ttft_ms"])
        if c == 16:
            r["l_t16"].append(res["ttft_ms"])
    lat = []
    stop = time.perf_counter() + a.seconds
    threads = []
    while time.perf_counter() < stop:  # open loop at 2 requests/s, like omnibus's
        t = threading.Thread(target=lambda: lat.append(llama.stream(PROMPT20, 32)[2]))
        t.start()
        threads.append(t)
        time.sleep(0.5)
    [t.join() for t in threads]
    r["l_p99g"].append(sorted(lat)[max(0, int(len(lat) * 0.99) - 1)] * 1e3)
    r["l_rss"].append(llama.rss)
    llama.stop_server()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--only", choices=["embeddings", "generation"], help="measure one part; the other part's "
                    "last results (target/bench/results-*.json) go into BENCHMARKS.md unchanged")
    ap.add_argument("--corpus", choices=["tune", "heldout"], default="tune",
                    help="benches/corpus/<name>.txt: tune for every run, heldout for the last check of a change")
    ap.add_argument("--memory-seconds", type=float, default=60.0, help="32 callers on the corpus this long "
                    "(last round), resident memory before and after; 0 skips it")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--gguf", type=Path, default=GGUF, help="generation model to measure (default SmolLM2 Q4_1); "
                    "another file's figures get a section of their own")
    ap.add_argument("--perf-analyzer", type=Path, help="perf_analyzer binary (from tritonclient[grpc])")
    ap.add_argument("--perf-analyzer-libs", type=Path, help="folder holding libcudart.so.12 for perf_analyzer")
    ap.add_argument("--render", action="store_true", help="measure nothing: rewrite BENCHMARKS.md from the last "
                    "results and the hand-kept sections (benches/fidelity.md, benches/device_generic.md)")
    a = ap.parse_args()
    corpus = CORPUS_DIR / f"{a.corpus}.txt"
    parts = [] if a.render else [a.only] if a.only else ["embeddings", "generation"]
    for part in parts:
        r = collections.defaultdict(list)
        if part == "embeddings":
            pa = PerfAnalyzer(a.perf_analyzer, a.perf_analyzer_libs, a.work) if a.perf_analyzer else None
            log("loading sentence-transformers and ONNX Runtime")
            st, ort = SentenceTransformersPeer(), OnnxPeer(a.work)
            for rnd in range(a.rounds):
                log(f"round {rnd + 1}/{a.rounds}: embeddings on {corpus.name}")
                embeddings_round(r, a, st, ort, pa, corpus, rnd == a.rounds - 1)
        else:
            if not a.llama_bin:
                sys.exit("--llama-bin is needed to measure generation")
            llama = LlamaCpp(a.llama_bin, a.gguf)
            for rnd in range(a.rounds):
                log(f"round {rnd + 1}/{a.rounds}: generation")
                generation_round(r, a, llama)
        result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "rounds": a.rounds,
                  "corpus": a.corpus, "medians": {k: med(v) for k, v in r.items()}, "all": dict(r)}
        if part == "embeddings":
            result["p99_rate"] = P99_RATE
        # The held-out run is kept apart: it checks the tuned figures, it does not replace them.
        suffix = "-heldout" if part == "embeddings" and a.corpus == "heldout" else ""
        if part == "generation" and a.gguf != GGUF:
            suffix = f"-{a.gguf.stem}"
            result["model"] = a.gguf.name
        (a.work / f"results-{part}{suffix}.json").write_text(json.dumps(result, indent=1))
    results = {}
    for part in ["embeddings", "embeddings-heldout", "generation"]:
        f = a.work / f"results-{part}.json"
        results[part] = json.loads(f.read_text()) if f.exists() else None
    results["other-generation"] = [json.loads(f.read_text()) for f in sorted(a.work.glob("results-generation-*.json"))]
    write(a.out, results)


def ratio(x, y, higher_is_better=True):
    if not y or y != y:
        return "n/a"
    q = x / y if higher_is_better else y / x
    return f"{q:.2f}x" + ("" if q >= 1 else " (behind)")


def spread(values, fmt="{:.0f}"):
    """The rounds' figures, for the reader to see the noise: '(a / b / c)'."""
    return "(" + " / ".join(fmt.format(v) for v in values) + ")"


def generation_table(m, title):
    """The generation table of one model's medians."""
    lines = [
        f"## {title}",
        "",
        "| what | omnibus | llama.cpp | ratio |",
        "|---|---|---|---|",
        f"| single-stream decode, tokens/s (omnibus: 1 / inter-token p50; llama-bench -n 128) | {m['o_dec']:.1f} | {m['l_dec']:.1f} | {ratio(m['o_dec'], m['l_dec'])} |",
        f"| 256-token prompt, tokens/s (omnibus: from time to first token; llama-bench -p 256) | {m['o_pp']:.0f} | {m['l_pp']:.0f} | {ratio(m['o_pp'], m['l_pp'])} |",
        f"| time to first token, 1 client, ~20-token prompt, ms (llama-server) | {m['o_ttft']:.0f} | {m['l_ttft']:.0f} | {ratio(m['o_ttft'], m['l_ttft'], False)} |",
    ]
    for c in [1, 4, 8, 16]:
        o, l = m[f"o_g{c}"], m[f"l_g{c}"]
        lines.append(f"| aggregate tokens/s, {c} streaming clients x 64 tokens (llama-server -np 16) | {o:.0f} | {l:.0f} | {ratio(o, l)} |")
    lines += [
        f"| batching gain: aggregate at 8 streams over 1 stream | {m['o_g8'] / m['o_g1']:.2f}x | {m['l_g8'] / m['l_g1']:.2f}x | |",
        f"| time to first token at 16 clients, ms | {m['o_t16']:.0f} | {m['l_t16']:.0f} | {ratio(m['o_t16'], m['l_t16'], False)} |",
        f"| p99 latency, open loop at 2 requests/s x 32 tokens, ms | {m['o_p99g']:.0f} | {m['l_p99g']:.0f} | {ratio(m['o_p99g'], m['l_p99g'], False)} |",
    ]
    return lines


def write(out: Path, results):
    e, g = results["embeddings"], results["generation"]
    # The results live in the work folder (target/bench), which a fresh clone lacks: a part this run has
    # no results for keeps its sections from the file as it was, rather than vanishing from it.
    previous = out.read_text().splitlines() if out.exists() else []

    def carried(wanted):
        """The previous file's `## ` sections whose heading `wanted` accepts, each up to the next one."""
        keep, on = [], False
        for line in previous:
            if line.startswith("## "):
                on = wanted(line)
            if on:
                keep.append(line)
        return keep

    lines = ["# Benchmarks", ""]
    for name, part in [("Embeddings", e), ("Generation", g)]:
        if part:
            lines.append(f"{name} made by `scripts/bench` on {part['date']}: {part['machine']}; median of "
                         f"{part['rounds']} rounds.")
        else:
            old = [l for l in previous if l.startswith(f"{name} made by")]
            lines.append(old[0] if old else f"{name}: not measured yet (`scripts/bench --only {name.lower()}`).")
        lines.append("")
    lines += [
        "Each round runs omnibus and the peers one after another, so a slower machine slows both. Compare "
        "ratios, not absolute numbers: these VMs drift by 10-20% between runs. omnibus is measured through its "
        "gRPC server with `omnibus bench` running on the same 2 cores; the embedding peers are measured "
        "in-process (no server, no RPC), which flatters them.",
        "",
    ]
    if e:
        m = e["medians"]
        best_ort = max(m["ort_c1"], m["ort_c8"], m["ort_c32"])
        best_b = [b for b in [1, 8, 32] if m[f"ort_c{b}"] == best_ort][0]
        ort1_ms = 1000.0 / m["ort_c1"]
        lines += [
            f"## Embeddings: all-MiniLM-L6-v2 on the realistic corpus (`benches/corpus/{e['corpus']}.txt`)",
            "",
            "Texts of 3 to 116 words (median 15): English prose and paragraphs, code, and German, Spanish, Italian "
            "and Russian sayings (see `benches/corpus/README.md`). omnibus: C concurrent gRPC callers sending one "
            "text each, cycling through the corpus; the peers: batches of C consecutive texts, each padded to its "
            "longest, tokenization included. Sentences/s:",
            "",
            "| C (callers / batch) | omnibus | sentence-transformers | ratio | ONNX Runtime | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in [1, 8, 32]:
            o, s_, x = m[f"o_c{c}"], m[f"st_c{c}"], m[f"ort_c{c}"]
            lines.append(f"| {c} | {o:.0f} {spread(e['all'][f'o_c{c}'])} | {s_:.0f} | {ratio(o, s_)} | {x:.0f} | "
                         f"{ratio(o, x)} |")
        lines += [
            "",
            "| target | figure |",
            "|---|---|",
            f"| 32 callers over 1 caller (aim: 3x) | {m['o_c32'] / m['o_c1']:.2f}x |",
            f"| 32 callers over ONNX Runtime's best batch (batch {best_b}, {best_ort:.0f}/s; aim: 1.0x, then 1.5x) | "
            f"{m['o_c32'] / best_ort:.2f}x |",
            f"| 1 caller's p50 latency vs ONNX Runtime's batch-1 time per text (aim: within 2 ms) | "
            f"{m['o_c1_p50']:.2f} ms vs {ort1_ms:.2f} ms ({m['o_c1_p50'] - ort1_ms:+.2f} ms) |",
            f"| p50 latency at 8 / 32 callers, ms | {m['o_c8_p50']:.1f} / {m['o_c32_p50']:.1f} |",
            (f"| Predict p99 at {e['p99_rate']} requests/s (open loop, corpus: about half the capacity), ms | "
             if "p99_rate" in e else
             "| Predict p99 at 100 requests/s (open loop, corpus; measured before the script moved to 50/s), ms | ")
            + f"{m['o_p99e']:.1f} |",
        ]
        if "rss_warm" in m:
            lines.append(f"| resident memory after warm-up / after 60 s of 32 callers, MiB | {m['rss_warm']:.0f} / "
                         f"{m['rss_after']:.0f} ({(m['rss_after'] / m['rss_warm'] - 1) * 100:+.1f}%) |")
        lines += [
            "",
            "The uniform short sentence (12 tokens with [CLS]/[SEP]; no padding for anyone), kept so that nothing "
            "regresses there:",
            "",
            "| C | omnibus | sentence-transformers | ratio | ONNX Runtime | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in [1, 8, 32]:
            o, s_, x = m[f"o_u{c}"], m[f"st_u{c}"], m[f"ort_u{c}"]
            lines.append(f"| {c} | {o:.0f} | {s_:.0f} | {ratio(o, s_)} | {x:.0f} | {ratio(o, x)} |")
        if m.get("pa1") == m.get("pa1"):  # not NaN: perf_analyzer ran
            lines += [
                "",
                "The same model through the Open Inference Protocol (`inference.GRPCInferenceService/ModelInfer`), "
                "driven by NVIDIA's `perf_analyzer` (from `tritonclient[grpc]==2.51.0`, `--shape TEXT:1`, the "
                "short sentence):",
                "",
                "| perf_analyzer concurrency | infer/s | average latency, ms |",
                "|---|---|---|",
                f"| 1 | {m['pa1']:.0f} | {m['pa1_ms']:.1f} |",
                f"| 32 | {m['pa32']:.0f} | {m['pa32_ms']:.1f} |",
            ]
        h = results.get("embeddings-heldout")
        if h:
            hm = h["medians"]
            hbest = max(hm["ort_c1"], hm["ort_c8"], hm["ort_c32"])
            lines += [
                "",
                f"The last check, on the held-out texts (`benches/corpus/heldout.txt`, never used for tuning; "
                f"{h['date']}, median of {h['rounds']} rounds), sentences/s:",
                "",
                "| C | omnibus | sentence-transformers | ONNX Runtime |",
                "|---|---|---|---|",
            ]
            for c in [1, 8, 32]:
                lines.append(f"| {c} | {hm[f'o_c{c}']:.0f} | {hm[f'st_c{c}']:.0f} | {hm[f'ort_c{c}']:.0f} |")
            lines += [
                "",
                f"32 callers over 1: {hm['o_c32'] / hm['o_c1']:.2f}x; over ONNX Runtime's best batch: "
                f"{hm['o_c32'] / hbest:.2f}x; 1 caller's p50 {hm['o_c1_p50']:.2f} ms vs ONNX Runtime's batch-1 "
                f"{1000.0 / hm['ort_c1']:.2f} ms per text.",
            ]
        lines += ["", EMBEDDINGS_PROSE]
    else:
        lines += carried(lambda h: h.startswith("## Embeddings"))
    if not g:
        lines += carried(lambda h: h.startswith("## Generation: SmolLM2-135M-Instruct Q4_1"))
    if g:
        m = g["medians"]
        lines += generation_table(m, "Generation: SmolLM2-135M-Instruct Q4_1, 2 threads")
        lines += [
            "",
            "### How the CPU kernels get there",
            "",
            "Every GGUF weight matrix goes through `src/models/kernels/qmatmul`: output columns are split into chunks that "
            "a fixed team of compute threads claims (idle workers spin briefly, then park: a decode step is ~200 "
            "parallel regions of tens of microseconds each, and rayon's sleep/wake cost a third of a step), and each "
            "weight column is applied to every activation row of the batch while it is in L1. Q4_1, Q4_0 and Q8_0 "
            "(the output head) have our own kernels: at load every group of eight output columns is repacked so "
            "that one 32-byte load holds four bytes of each, and one `vpmaddubsw` (AVX2) advances eight columns "
            "at once, or one 512-bit `vpdpbusd` (AVX-512 VNNI, chosen at run time) sixteen, each unpacked "
            "register serving four rows. A block's 32 products are summed as one exact integer (AVX2: in i16, which the 4-bit weights "
            "keep below 32767) and converted once: ggml's portable order, the same bits on every path, where "
            "ggml's AVX2 build converts and multiplies-adds eight lanes per block (1.55-1.75x slower kernels, "
            "same run). The fidelity contract (the table below) allows the change of float order; the K-quants "
            "keep ggml's lane order, since Gemma's margin is thin, and Q5_0 (most of both Q4_K_M files) sums its "
            "blocks as integers too since 2026-12-04. "
            "Activations are quantized per block as ggml does (AVX2, bit-identical to the scalar code), and "
            "attention runs on the team too.",
            "",
            "The decoder's element-wise work (RMS norms, RoPE, the gated activation) runs on the team too, rows "
            "spread over it when a step has enough of them, and attention's q.k products take eight keys per pass "
            "(an 8x8 transpose folds their lanes in the scalar code's order, so the bits stay the same).",
            "",
            "Q, K and V (and gate and up) share one quantization of their input and one parallel region, and a "
            "decode step of one or two sequences spreads attention's heads over the team. Prompts are read 32 "
            "tokens per step on the CPU while other sequences run or wait (`--prefill-chunk`; it was 256), so "
            "clients that arrive together start streaming one after another instead of all waiting for the whole "
            "wave's prompts (the time to first token at 16 clients); a sequence alone reads 256 a step (see the "
            "fourth session of 2026-12-04 below).",
            "",
            "Work the team waits on is the other lever at 2 cores: in a 16-row served step's profile the second "
            "thread spun ~13% of the time while the engine thread worked alone (filling outputs with NaN, "
            "copying each sequence's logits, a scalar argmax, RMSNorm's serial f64 sum) or finished a region's "
            "last task. Release builds now leave outputs unwritten until the tasks fill them (debug and test "
            "builds still poison them), logits are copied on the team, argmax and the sum of squares vectorize, "
            "regions from four rows up are cut into sixteen tasks a thread, and attention runs its longest tasks "
            "first. Q4_1's repacked scales stay f16 (one exact `vcvtph2ps` per eight), so a one-row step streams "
            "the file's 66 MB of layers, not 80. Only the eight-lane sum of squares can move a bit (an f32 mean "
            "about one row in a million); the fidelity rows kept their figures.",
            "",
            "Prefetch (2026-12-03, first run on an AVX-512 Xeon): a served 8-stream profile on that machine put a "
            "third of the Q4_1 kernel's samples on the instructions that consume each block's first weight load: "
            "the kernels waited on memory, not on arithmetic. Every dot kernel now asks for the weights 4 KiB "
            "ahead of the block it multiplies (512 B to 8 KiB tried; 4-8 KiB best). (Four integer accumulators a "
            "row in the Q4_1 VNNI kernel instead of one chain of `vpdpbusd` were tried beside it: no faster, 528 "
            "vs 508 tok/s at 8 streams.) No bit changes. Same-run "
            "served A/Bs, SmolLM2 Q4_1: one stream 160 -> ~240 tok/s and 8 streams 435 -> ~499 on the VNNI path; "
            "capped to AVX2 (`OMNIBUS_CPU_FEATURES=avx2`) 146 -> ~237 and 372 -> 455; the Q4_K_M file's one "
            "stream 114 -> 155.",
            "",
            "512-bit kernels (2026-12-03, same Xeon): a microbenchmark here issues 512-bit `vpdpbusd` as fast as "
            "256-bit ones (0.155 vs 0.134 ns each, twelve independent chains), so on AVX-512 VNNI CPUs every "
            "repacked kernel (Q4_1, Q8_0, Q4_0, Q5_0 in its lane order then, and the K-quants in theirs) takes two "
            "adjacent groups, 16 columns, per register: per column the same operations as the 8-column kernels, "
            "so the same bits (unit tests, and `omnibus compare` against the previous release: mean KLD 0). "
            "Kernel bench, 1536x512 x 64 rows, same binary capped: Q4_1 197 us (AVX2 path 370), Q5_0 388 (900), "
            "Q4_K 362 (505), Q6_K 438 (575). Same-run served A/Bs: SmolLM2 Q4_1 at 8 streams 570 -> 636 tok/s "
            "and its 256-token prefill 968 -> 1176; the Q4_K_M file's prefill (mostly Q5_0: its 576-wide rows "
            "are not whole K-quant super-blocks) 600 -> 707, and 755 after rounding the Q8_K activations without "
            "a libm call. The Q8_0/Q4_0/Q5_0 scales now stay f16 as Q4_1's do, which Gemma 3's 178 MB Q8_0 "
            "output head (over half of its one-stream step, memory-bound) felt: 85 -> 92 tok/s. The SiLU gate "
            "is spread over the team from two rows, and mimalloc keeps freed memory 10 s instead of 1 s before "
            "returning it (the server took ~2,800 page faults a second at 8 streams, none after). That is why the "
            "resident memory below, taken right after load, rose: load-time buffers now go back 10 s later (here "
            "338 MiB at ready and 308 MiB 13 s later; the build before, 314 and 310).",
            "",
            "Q4_K_M work (2026-12-04, same Xeon). Q5_0 sums each block's products as one integer, as Q8_0 and "
            "Q4_0 do: ggml's lane order cost its kernel eight conversions and multiply-adds per block and column "
            "(kernel bench, 64 rows: 388 -> 243 us). Gemma 3's mean KLD moves 0.004378 -> 0.004475 against a "
            "bound of 0.004482 (its fidelity table): inside the contract, with little room, on a model where "
            "llama.cpp's own f32 runs, batched and one token at a time, are 0.004115 apart. The activation "
            "quantizers' parallel tasks each grew a Vec whose header shared a cache line with its neighbour's, "
            "so both threads wrote one line at every block (8% of a Q4_K_M prefill, now 2%); the Q8_K "
            "quantizer that feeds the K-quant products runs in AVX2 (6% of a prefill), and the Q8_0/Q8_1 loops "
            "are compiled for AVX2 so their block quantizer inlines. From three runs of four rows up (a prefill, "
            "a 16-row step) the Q8_0/Q4_0/Q5_0 kernels unpack a tile's weights once into L1 for all its runs "
            "(tried for the K-quants too: no served gain, dropped). Softmax and SiLU take glibc's `expf` eight "
            "lanes at a time: glibc's own algorithm (its table and cubic, in double, with the reduction fused as "
            "its FMA build fuses it), the same bits as libm on a sweep of a third of all floats (3-5% of a step "
            "was libm calls). Every step but Q5_0's keeps the bits (`omnibus compare` against the build before: "
            "mean KLD 0). Same-run served A/Bs, 256-token prefill: SmolLM2 Q4_K_M 822 -> 940-1021 (Q5_0) -> "
            "1034 -> 1122 -> 1144-1164 -> 1235-1245 -> 1292-1322 tok/s, Gemma 3 897-923 -> 1090-1102 -> 1183 -> "
            "1234; SmolLM2 Q4_K_M at 16 streams 566 -> 684-694 (Q5_0). Tried and dropped: FMA in the Q4_1 "
            "kernel's per-block finish (kernel -6-8%, but SmolLM2's mean KLD went 0.002293 -> 0.002419 against a "
            "bound of 0.002460, and a greedy token of the generation test flipped), and 512-bit weighted sums in "
            "attention (no served gain).",
            "",
            "Eight-row runs and the engine thread's serial work (2026-12-04, second session, same Xeon). The "
            "AVX-512 VNNI kernels for Q4_1, Q8_0, Q4_0 and Q5_0 take runs of eight rows instead of four: their "
            "32 registers hold eight rows' accumulators, so a 16-column block is loaded and unpacked once for "
            "eight rows (kernel bench, 1536x512 x 8 rows: Q5_0 30.6 -> 25.7 us, Q8_0 31.9 -> 25.2 us). The "
            "kernel on weights unpacked once per tile (prefill) keeps runs of four (eight were ~10% slower at 64 "
            "rows), and the K-quant kernels, whose ggml lane order needs eight accumulators a row, keep four. A "
            "call-graph profile of the engine thread at eight streams put 17% of its time outside the team's "
            "regions, with the other core waiting: RoPE (scalar, ~3%), the allocator zero-filling fresh "
            "per-layer buffers (~1.6%), and KV caches copied as they doubled from a 20-token prompt (~1.1%). "
            "RoPE now runs in AVX2 (two products and one add or subtract per value, unfused, as before), the "
            "buffers live for a step, and a cache starts with room for 128 positions: 17% -> 11%. In attention, "
            "a row's maximum score is taken eight lanes at a time and the values' weighted sum runs in 512-bit "
            "registers. Gemma's GELU gate rounds eight inputs to f16 with one `vcvtps2ph` (`half` converted one value at "
            "a time, through a call with a CPU-feature test), and the output head writes each sequence's logits "
            "into a vector of its own instead of one buffer copied out per sequence (8 MB a step for Gemma 3 at "
            "eight streams). None of this moves a bit (`omnibus compare` against the build before: mean KLD 0 on "
            "SmolLM2 Q4_1, SmolLM2 Q4_K_M and Gemma 3; unit tests against the scalar code). Same-run served "
            "A/Bs, SmolLM2 Q4_1 at 8 streams: 850-867 -> 913-970 (Q4_1 runs of eight) -> 958 (attention) -> "
            "983-995 (RoPE) -> 983-1019 tok/s (buffers); SmolLM2 Q4_K_M at 16 streams 820-831 -> 854 (Q5_0/Q8_0 "
            "runs of eight), 256-token prefill 1242-1255 -> 1267-1299 (attention); Gemma 3 at 8 streams +1% (GELU, "
            "within the noise), then 435-439 -> 445-451 tok/s (logits in parts). Tried and dropped: team "
            "regions for the norms and quantizers from 4K values (slower: a region's hand-off costs more than "
            "~2 us of work), and decode attention split into one task per key-value head (no gain).",
            "",
            "Wider prefill tiles (2026-12-04, third session, same Xeon). A microbenchmark put this core at two "
            "512-bit `vpdpbusd` a cycle (6.9 G a second), and the prefill kernel for Q8_0, Q5_0 and Q4_0 at a "
            "third of that: each activation broadcast fed one `vpdpbusd` on a 16-column tile, so the kernel issued "
            "more loads than products. Its tiles are now 32 columns (two weight vectors a step) with runs of six "
            "rows, the runs are looped inside a function compiled for AVX-512 with each run's rows passed as its "
            "first index (a row array built on the stack and read back whole held a sixth of the samples), and "
            "above 16 rows the tasks' column chunks are multiples of 32. The K-quant kernels got the same "
            "dispatch and, above 16 rows, each tile's weight vectors and scales unpacked once for all its runs "
            "(Q6_K's bit planes cost more to unpack than its products). Kernel bench, 1536x512 x 64 rows, "
            "alternated: Q5_0 175 -> 130 us, Q4_K 283 -> 263 us, Q6_K 371 -> 266 us. Served 256-token prefill: "
            "SmolLM2 Q4_K_M 1340 -> 1554 tok/s, Gemma 3 1406 -> 1557; SmolLM2 Q4_K_M at 16 streams 908 -> 970 "
            "(its joining prompts are prefills). No bit moved (`omnibus compare`: mean KLD 0 on both files; "
            "unit tests against the pair kernels and ggml's order). Tried and dropped: two chains of four "
            "`vpdpbusd` a row instead of one of eight (10% slower), runs of eight rows on 16-column tiles (4% "
            "slower), 128- and 256-row blocks (no gain), and the unpacked kernels from 9 rows (or, for the "
            "K-quants, from 5) in decode steps (no gain at 8 or 16 streams).",
            "",
            "Longer steps for a lone prompt, grouped attention (2026-12-04, fourth session, same Xeon). Every "
            "prompt was read 32 tokens a step, a bound meant for prompts that arrive together and for the streams "
            "running beside them; a lone 256-token prompt ran as eight 32-row steps, each unpacking every weight "
            "tile again (which is also why the 128- and 256-row blocks above gained nothing). A sequence alone in "
            "the engine, without prompt log-probabilities, now reads 256 tokens a step; the 32-token chunk holds "
            "whenever another sequence runs or waits, and an operator's `--prefill-chunk` always. A lone 256-token "
            "SmolLM2 Q4_K_M prompt, alternated: 1607, 1795, 1918 and 1984 tok/s in steps of 32, 64, 128 and 256. "
            "On AVX-512, attention takes a kv head's (row, query head) units four at a time, or two, where they "
            "share eight keys: their queries in the halves of 512-bit accumulators against each key chunk loaded "
            "once, and each value row shared by their weighted sums, so keys and values come from L2 a fourth as "
            "often; the softmax sums' f64 chains run side by side. The RMS norms are compiled for AVX2 (the f64 "
            "sums in two registers of four, in the same order), and the activation quantizers move their parts "
            "into the result in parallel instead of appending them on the engine thread. Served 256-token "
            "prefill, alternated, the session's first binary against its last: SmolLM2 Q4_K_M 1474 -> 2004, Gemma 3 "
            "1509 -> 1936, SmolLM2 Q4_1 1768 -> 2122 tok/s (medians of three; 8 streams of SmolLM2 Q4_1 unchanged, 1065 vs 1065). No bit moved (`omnibus compare` over held-out text: mean KLD 0 "
            "on all three files; unit tests of every AVX-512 grouping, across rows, partial head groups and "
            "windows, against the generic code).",
            "",
            "AMX, tried and left out (2026-12-04, fifth session, same Xeon). The guest kernel now grants the tile state (`ARCH_GET_XCOMP_SUPP` has bit 18, `ldtilecfg` and `tdpbusd` run: ~3.4 T int8 products a second on one core in a loop of full tiles), unlike the VMs of earlier sessions, where the first `ldtilecfg` faulted. A Q4_1 kernel took each block's exact integer sums for a run's rows from one `tdpbsud` (activations x 32 as the signed operand, the 16 columns' unpacked nibbles as the unsigned one) and kept the VNNI kernel's float scaling, so its bits were the same. Per-32-value scales force a tile product, a tile store and vector loads of the sums for every block of 16 columns, and tiles are not renamed, so each block paid the AMX latencies in series. Four blocks in four accumulators, with weights unpacked one stage ahead and sums read one stage behind, still gave parity at best: `cargo bench --bench hot_paths` 1536x512, 1 / 8 / 64 rows, VNNI 7.5 / 29.6 / 204 us against AMX 16.3 / 29.4 / 205-212 us, and served 8 streams 780 against 850 tok/s. At eight rows the step is bound by ALU work beside the products (the per-block scaling, six operations per row and 16 columns against eight `vpdpbusd`), not by the products alone, so SmolLM2's 4x batching gain stays out of reach of this design on two cores.",
            "",
            "Where the figures stop: a one-row step streams the 96 MB of weights (66 MB of Q4_1 layers, the "
            "30 MB Q8_0 head) at 31-34 GB/s (inter-token p50 2.7-3.0 ms in that day's A/Bs). At 8 rows the step is bound by the products, and the "
            "Q4_1 kernel, at ~42% of it (~55 products a cycle a core), spends as many instructions on each block's f32 scaling (convert, two "
            "multiplies and an add for the scale, a multiply and an add for the minimum) as on its eight "
            "`vpdpbusd`; ggml's order fixes those, and fusing them (FMA) would move bits. The 30 MB output head "
            "is memory-bound at every row count. (On the AMD EPYC host of the earlier runs, AVX2 only and before "
            "prefetch, `cargo bench --bench hot_paths -- 'smollm2 decode step'` gave 6.2 ms for one row, 18.2 ms "
            "for eight and 31.9 ms for sixteen.)",
            "",
            "| what | omnibus | llama.cpp |",
            "|---|---|---|",
            f"| resident memory after load (omnibus: both models; llama-server: one model, 16 slots), MiB | {m['rss_gen']:.0f} | {m['l_rss']:.0f} |",
            "",
        ]
    # The fidelity table is made by scripts/fidelity (tests/fidelity.rs), not by this script: kept in
    # benches/fidelity.md and carried over as it is.
    others = results.get("other-generation", [])
    # Other files measured before (`--gguf`) whose results are not here: their sections as they were.
    measured = {f"## Generation: {o['model']}, 2 threads" for o in others}
    lines += carried(lambda h: h.startswith("## Generation: ") and ".gguf, 2 threads" in h and h not in measured)
    for other in others:
        lines += [""] + generation_table(other["medians"], f"Generation: {other['model']}, 2 threads")
        lines += ["", f"Made by `scripts/bench --only generation --gguf models/...{other['model']}` on {other['date']}: "
                  f"{other['machine']}; median of {other['rounds']} rounds, llama.cpp on the same file in the same run."]
    # Hand-kept sections, made by tests rather than by this script, carried over as they are.
    for kept in ["fidelity.md", "device_generic.md"]:
        path = ROOT / "benches" / kept
        if path.exists():
            lines += ["", path.read_text().rstrip()]
    lines += [
        "",
        "## Re-running",
        "",
        "```sh",
        "./scripts/bench                       # installs the peers (PyPI), builds llama.cpp's tools, measures both parts",
        "./scripts/bench --only embeddings     # one part; the other part's last results stay",
        "./scripts/bench --only embeddings --corpus heldout   # the held-out texts: the last check of a change",
        "cargo bench --bench embed_forward     # in-process MiniLM forward: the corpus, mixed and uniform batches",
        "cargo bench --bench hot_paths         # criterion: batch selection, tokenization, kernels, decode steps",
        "scripts/fidelity [--remake]           # the fidelity table (benches/fidelity.md; --remake: llama.cpp's reference again)",
        "target/bench/venv/bin/python benches/peers/measure.py --work target/bench --render   # this file from the last results",
        "```",
        "",
        "Run it on a quiet machine: a compile beside a benchmark can cut a figure tenfold.",
        "",
    ]
    # Sections carried over end in their own blank line: one blank line between any two blocks.
    out.write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)))
    log(f"wrote {out}")


EMBEDDINGS_PROSE = (
    "How: on the CPU the encoder runs a batch's tokens packed end to end, one `[tokens, 384]` matrix for "
    "every linear layer (Q, K and V fused into one product), attention per text over its own length "
    "(`src/models/bert_packed.rs`), so a batch costs what its tokens cost, whatever the mix of lengths. The "
    "matrix products are our own f32 kernels on weights packed at load (`src/models/kernels/sgemm.rs`: AVX-512 or "
    "AVX2+FMA micro-kernels, chosen at run time, on the compute team), one FMA chain per output element in a "
    "fixed order, so a text's vector is bit-identical alone or in any batch. Compute threads flush subnormal "
    "floats to zero, and masked or underflowing attention weights are exactly zero."
)


if __name__ == "__main__":
    main()
