#!/usr/bin/env python3
"""Checks the gateway's public contract from Python (grpcio).

Usage: client.py HOST:PORT [PROTO_DIR]

Stubs are generated from the project's own .proto files at run time, so the
checks always follow the contract in proto/. Expects the demo upstreams with
a 50 ms delay behind the gateway and the aggregations of examples/gateway.toml.
Prints `ok  - ...` per passing check and `not ok - ...` per failing one;
exits 1 if any check failed.
"""

import importlib.resources
import pathlib
import sys
import tempfile
import time
import traceback

import grpc
from google.protobuf import descriptor_pool, json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

SERVICE = "aggregator.v1.Aggregator"
TIMEOUT = 5.0


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def generate_stubs(proto_dir, out_dir):
    # The well-known types (struct, duration) come with grpcio-tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "aggregator/v1/aggregator.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"client.py: protoc failed ({rc}) on {proto_dir}/aggregator/v1/aggregator.proto")
    sys.path.insert(0, str(out_dir))


def rpc_error(call, *args, **kwargs):
    """Calls a unary method that must fail; returns the grpc.RpcError."""
    try:
        response = call(*args, **kwargs)
    except grpc.RpcError as error:
        return error
    raise CheckFailed(f"expected an error, got a response: {response}")


def error_info(error):
    """The google.rpc.Status in grpc-status-details-bin and its one ErrorInfo."""
    raw = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    expect(len(raw) == 1, f"expected one grpc-status-details-bin trailer, got {len(raw)}")
    status = status_pb2.Status.FromString(raw[0])
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    expect(len(infos) == 1, f"expected one ErrorInfo detail, got {status}")
    return status, infos[0]


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    addr = sys.argv[1]
    proto_dir = (
        pathlib.Path(sys.argv[2])
        if len(sys.argv) == 3
        else pathlib.Path(__file__).resolve().parents[2] / "proto"
    )

    with tempfile.TemporaryDirectory(prefix="polyglot-py-") as out_dir:
        generate_stubs(proto_dir, out_dir)
        from aggregator.v1 import aggregator_pb2 as pb
        from aggregator.v1 import aggregator_pb2_grpc as pb_grpc

        channel = grpc.insecure_channel(addr)
        try:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        except grpc.FutureTimeoutError:
            sys.exit(f"client.py: cannot connect to {addr}")
        stub = pb_grpc.AggregatorStub(channel)
        dashboard_42 = dict(aggregation="user_dashboard", params={"user_id": "42"})

        def aggregate():
            response = stub.Aggregate(pb.AggregateRequest(**dashboard_42), timeout=TIMEOUT)
            data = json_format.MessageToDict(response.data)
            expect(data["profile"]["user_id"] == "42", f"profile: {data['profile']}")
            orders = data["orders"]
            expect(
                orders["count"] == len(orders["orders"]) > 0,
                f"orders.count {orders['count']} vs {len(orders['orders'])} orders",
            )
            expect(response.complete, "complete is false")
            sources = [(s.source, s.code) for s in response.sources]
            expect(sources == [("profile", 0), ("orders", 0)], f"sources: {sources}")
            expect(
                not any(s.HasField("data") for s in response.sources),
                "AggregateResponse.sources carry data",
            )
            return "Aggregate user_dashboard: merged profile and orders of user 42"

        def fetch_all():
            response = stub.FetchAll(pb.FetchAllRequest(**dashboard_42), timeout=TIMEOUT)
            names = [r.source for r in response.results]
            expect(names == ["profile", "orders"], f"results order: {names}")
            expect(all(r.code == 0 for r in response.results), f"codes: {response.results}")
            expect(response.complete, "complete is false")
            profile = json_format.MessageToDict(response.results[0].data)
            expect(profile.get("user_id") == "42", f"profile data: {profile}")
            expect(
                all(r.attempts == 1 for r in response.results),
                f"attempts: {[r.attempts for r in response.results]}",
            )
            return "FetchAll user_dashboard: results in order [profile, orders], all OK"

        def fetch_subset():
            response = stub.FetchAll(
                pb.FetchAllRequest(**dashboard_42, sources=["orders"], mode=pb.MODE_BEST_EFFORT),
                timeout=TIMEOUT,
            )
            names = [r.source for r in response.results]
            expect(names == ["orders"], f"results: {names}")
            return "FetchAll sources=[orders] MODE_BEST_EFFORT: only orders"

        def not_found():
            # User 0 has no profile in the demo (but an empty order list).
            error = rpc_error(
                stub.Aggregate,
                pb.AggregateRequest(aggregation="user_dashboard", params={"user_id": "0"}),
                timeout=TIMEOUT,
            )
            expect(error.code() == grpc.StatusCode.NOT_FOUND, f"code {error.code()}: {error.details()}")
            expect(
                error.details() == "source 'profile': no user '0'",
                f"message: {error.details()!r}",
            )
            status, info = error_info(error)
            expect(status.code == grpc.StatusCode.NOT_FOUND.value[0], f"Status.code {status.code}")
            expect(status.message == error.details(), f"Status.message {status.message!r}")
            expect(
                (info.domain, info.reason) == ("aggregator", "SOURCE_FAILED"),
                f"ErrorInfo: {info}",
            )
            expect(info.metadata["source"] == "profile", f"ErrorInfo.metadata: {dict(info.metadata)}")
            return "user 0: NOT_FOUND, ErrorInfo SOURCE_FAILED with metadata source=profile"

        def degraded():
            # User 7's orders answer HTTP 503; orders is optional in user_profile.
            response = stub.Aggregate(
                pb.AggregateRequest(aggregation="user_profile", params={"user_id": "7"}),
                timeout=TIMEOUT,
            )
            expect(not response.complete, "complete is true")
            sources = [(s.source, s.code) for s in response.sources]
            expect(
                sources == [("profile", 0), ("orders", grpc.StatusCode.UNAVAILABLE.value[0])],
                f"sources: {sources}",
            )
            data = json_format.MessageToDict(response.data)
            expect(data["profile"]["user_id"] == "7", f"data: {data}")
            return "user 7 via user_profile: OK, complete=false, orders UNAVAILABLE"

        def health():
            health_stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE):
                response = health_stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT
                )
                expect(
                    response.status == health_pb2.HealthCheckResponse.SERVING,
                    f"health of {service!r}: {response}",
                )
            return f"health Check '' and '{SERVICE}': SERVING"

        def reflection_v1alpha():
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            expect({SERVICE, "grpc.health.v1.Health"} <= services, f"services: {services}")
            pool = descriptor_pool.DescriptorPool(database)
            methods = {m.name for m in pool.FindServiceByName(SERVICE).methods}
            expect(methods == {"Aggregate", "FetchAll"}, f"methods: {methods}")
            # Clients without googleapis protos can still decode error details.
            pool.FindMessageTypeByName("google.rpc.ErrorInfo")
            return "reflection v1alpha: services listed, Aggregator methods and google.rpc.ErrorInfo resolved"

        def reflection_v1():
            # grpcio-reflection ships only the v1alpha client; the v1 messages
            # are identical on the wire, so the v1alpha ones serve for v1.
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            responses = list(
                info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
            )
            expect(len(responses) == 1, f"{len(responses)} responses")
            services = {s.name for s in responses[0].list_services_response.service}
            expect(SERVICE in services, f"services: {services}")
            return "reflection v1: list_services includes aggregator.v1.Aggregator"

        def deadline():
            started = time.monotonic()
            error = rpc_error(stub.Aggregate, pb.AggregateRequest(**dashboard_42), timeout=0.02)
            elapsed = time.monotonic() - started
            expect(
                error.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                f"code {error.code()}: {error.details()}",
            )
            expect(elapsed < 1.0, f"answered after {elapsed:.3f} s")
            # The gateway must still serve after abandoning the upstream calls.
            stub.Aggregate(pb.AggregateRequest(**dashboard_42), timeout=TIMEOUT)
            return f"20 ms deadline vs 50 ms upstreams: DEADLINE_EXCEEDED after {elapsed * 1000:.0f} ms"

        checks = [
            aggregate,
            fetch_all,
            fetch_subset,
            not_found,
            degraded,
            health,
            reflection_v1alpha,
            reflection_v1,
            deadline,
        ]
        failed = 0
        for check in checks:
            try:
                print(f"ok  - {check()}", flush=True)
            except CheckFailed as error:
                failed += 1
                print(f"not ok - {check.__name__}: {error}", flush=True)
            except Exception:  # an unexpected RpcError or KeyError is a failure too
                failed += 1
                print(f"not ok - {check.__name__}:", flush=True)
                traceback.print_exc(file=sys.stdout)
        channel.close()

    print(f"python: {len(checks) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
