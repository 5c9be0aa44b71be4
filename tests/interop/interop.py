#!/usr/bin/env python3
"""Drives an omnibus server from Python's grpcio (not tonic), knowing nothing but what the server reflects.

Checks: health; reflection v1 and v1alpha list the services and describe every message; the JSON bodies
of the README's ghz examples parse into the reflected message types; Predict; a streamed Generate that
ends with exactly one end message; a stream cancelled halfway that frees its sequence on the server; a
stream past grpcio's own deadline ended by the server with DEADLINE_EXCEEDED before grpcio's timer.

Usage: interop.py HOST:PORT README.md
"""
import json
import re
import sys
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

addr, readme = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(addr)
grpc.channel_ready_future(channel).result(timeout=30)


def check(cond, msg):
    if not cond:
        print("FAIL:", msg, file=sys.stderr)
        sys.exit(1)
    print("ok:", msg)


# Health, whole server and per service.
health = health_pb2_grpc.HealthStub(channel)
for service in ["", "omnibus.v1.Inference"]:
    status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
    check(status == health_pb2.HealthCheckResponse.SERVING, f"health {service!r} is SERVING")

# Reflection: v1 and v1alpha have the same messages; only the service path differs.
def reflect(version, request):
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]))))

pools = {}
for version in ["v1", "v1alpha"]:
    listed = reflect(version, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    check({"omnibus.v1.Inference", "grpc.health.v1.Health"} <= names, f"reflection {version} lists {sorted(names)}")
    files = reflect(version, reflection_pb2.ServerReflectionRequest(file_containing_symbol="omnibus.v1.Inference"))
    pool = descriptor_pool.DescriptorPool()
    protos = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in files.file_descriptor_response.file_descriptor_proto]
    pending = {p.name: p for p in protos}
    while pending:  # add files after their dependencies
        for name, p in list(pending.items()):
            if all(d not in pending for d in p.dependency):
                pool.Add(p)
                del pending[name]
    pools[version] = pool

pool = pools["v1"]
svc = pool.FindServiceByName("omnibus.v1.Inference")
check({m.name for m in svc.methods} >= {"Predict", "Generate", "ListModels"}, "the service describes its methods")
cls = {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"omnibus.v1.{n}"))
       for n in ["PredictRequest", "PredictResponse", "GenerateRequest", "GenerateResponse", "ListModelsRequest",
                 "ListModelsResponse"]}
for version, p in pools.items():
    for m in svc.methods:
        for t in (m.input_type, m.output_type):
            check(p.FindMessageTypeByName(t.full_name) is not None, f"{version} describes {t.full_name}")

# The README's ghz examples: every -d body parses into the message its --call names.
text = open(readme).read()
examples = re.findall(r"ghz[^\n]*--call (\S+)[^']*?-d '([^']*)'", text, re.S)
check(len(examples) >= 2, f"found {len(examples)} ghz examples in the README")
for call, body in examples:
    method = svc.methods_by_name[call.split(".")[-1]]
    msg = message_factory.GetMessageClass(method.input_type)()
    json_format.Parse(body, msg)
    check(msg.ByteSize() > 0, f"ghz body for {call} parses: {json.loads(body)}")

def unary(name, req_cls, resp_cls):
    return channel.unary_unary(f"/omnibus.v1.Inference/{name}", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)

predict = unary("Predict", cls["PredictRequest"], cls["PredictResponse"])
resp = predict(cls["PredictRequest"](inputs=["hello from python", "second"]), timeout=30)
check(len(resp.outputs) == 2 and len(resp.outputs[0].values) == 384, "Predict returns two 384-wide vectors")
try:
    predict(cls["PredictRequest"](inputs=[]), timeout=30)
    check(False, "an empty Predict must fail")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in e.details(), f"empty Predict: {e.code()}")

generate = channel.unary_stream("/omnibus.v1.Inference/Generate",
                                request_serializer=cls["GenerateRequest"].SerializeToString,
                                response_deserializer=cls["GenerateResponse"].FromString)
msgs = list(generate(cls["GenerateRequest"](prompt="Rust is a programming language that", max_new_tokens=8), timeout=60))
kinds = [m.WhichOneof("kind") for m in msgs]
check(kinds == ["token"] * 8 + ["end"], f"Generate streams 8 tokens then one end: {kinds}")

list_models = unary("ListModels", cls["ListModelsRequest"], cls["ListModelsResponse"])
def running():
    models = list_models(cls["ListModelsRequest"](), timeout=10).models
    return [m for m in models if m.name.startswith("SmolLM2")][0].load.running

# Greedy SmolLM2 keeps counting past 400 tokens: no end of sequence cuts these streams short.
LONG = "Count from 1 to 1000, separated by commas: 1, 2, 3,"
stream = generate(cls["GenerateRequest"](prompt=LONG, max_new_tokens=2000), timeout=120)
for _ in range(3):
    next(stream)
check(running() == 1, "the long stream is running")
stream.cancel()
deadline = time.time() + 10
while running() != 0 and time.time() < deadline:
    time.sleep(0.02)
check(running() == 0, "cancelling halfway freed the sequence")
# grpcio's own deadline (not tonic's): the server ends the stream first, with its own message; grpcio's
# timer would say just "Deadline Exceeded".
started = time.time()
try:
    for _ in generate(cls["GenerateRequest"](prompt=LONG, max_new_tokens=2000),
                      timeout=0.8):
        pass
    check(False, "a 2000-token stream with a 0.8 s deadline must not finish")
except grpc.RpcError as e:
    # The server's messages start "deadline exceeded" (while streaming, or while still queued).
    check(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and e.details().startswith("deadline exceeded"),
          f"the server ended the stream at grpcio's deadline: {e.code()} {e.details()!r} "
          f"after {time.time() - started:.3f} s")
print("interop: all checks passed")
