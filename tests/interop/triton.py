"""tritonclient (NVIDIA's Open Inference Protocol client, not written by us) against a running omnibus.

Checks server and model liveness and metadata, ModelInfer on the embedding model (compared with the
vectors Predict returned, passed in as JSON), and ModelStreamInfer on the generation model (the text
compared with Generate's). Usage: triton.py HOST:PORT EXPECTED.json
"""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main():
    addr, expected_path = sys.argv[1], sys.argv[2]
    expected = json.load(open(expected_path))
    c = grpcclient.InferenceServerClient(url=addr)
    assert c.is_server_live(), "server live"
    assert c.is_server_ready(), "server ready"
    emb, gen = expected["embedder"], expected["generator"]
    assert c.is_model_ready(emb) and c.is_model_ready(gen), "models ready"
    meta = c.get_server_metadata()
    assert meta.name == "omnibus", meta
    mm = c.get_model_metadata(emb)
    assert mm.inputs[0].name == "TEXT" and mm.inputs[0].datatype == "BYTES", mm
    assert list(mm.outputs[0].shape) == [-1, len(expected["vectors"][0])], mm

    # ModelInfer: a batch of texts as a BYTES tensor (tritonclient sends raw_input_contents).
    texts = np.array([t.encode() for t in expected["texts"]], dtype=np.object_)
    inp = grpcclient.InferInput("TEXT", [len(texts)], "BYTES")
    inp.set_data_from_numpy(texts)
    out = c.infer(emb, [inp], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    got = out.as_numpy("EMBEDDING")
    want = np.array(expected["vectors"], dtype=np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got, want), float(np.abs(got - want).max())
    print("triton: ModelInfer equals Predict for", len(texts), "texts")

    # ModelStreamInfer: one response per token (decoupled), the last flagged final.
    responses = queue.Queue()
    c.start_stream(callback=lambda result, error: responses.put((result, error)))
    prompt = np.array([expected["prompt"].encode()], dtype=np.object_)
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(prompt)
    c.async_stream_infer(gen, [t], request_id="t1", parameters={"max_tokens": expected["max_tokens"]},
                         enable_empty_final_response=True)
    text, tokens = "", 0
    while True:
        result, error = responses.get(timeout=60)
        assert error is None, error
        r = result.get_response()
        assert r.id == "t1", r.id
        if r.parameters.get("triton_final_response") and r.parameters["triton_final_response"].bool_param:
            break
        text += result.as_numpy("text_output")[0].decode()
        tokens += 1
    c.stop_stream()
    assert text == expected["text"], (text, expected["text"])
    print(f"triton: ModelStreamInfer streamed {tokens} tokens equal to Generate's")

    # The repository extension: the index, a reload of the embedding model (a hot swap to the same
    # files) with the same answers after it, and an unload and load of the generation model.
    states = {(m.name, m.version): m.state for m in c.get_model_repository_index().models}
    assert states.get((emb, "1")) == "READY" and states.get((gen, "1")) == "READY", states
    c.load_model(emb)
    out = c.infer(emb, [inp], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")])
    assert np.array_equal(out.as_numpy("EMBEDDING"), want), "same answers after the reload"
    assert out.get_response().model_version == "1", out.get_response().model_version
    c.unload_model(gen)
    assert not c.is_model_ready(gen), "unloaded"
    c.load_model(gen)
    assert c.is_model_ready(gen), "loaded again"
    print("triton: repository index, load_model and unload_model work")
    print("triton: all checks passed")


if __name__ == "__main__":
    main()
