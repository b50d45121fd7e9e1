#!/usr/bin/env python3
"""The benchmark: the gateway against calling its upstreams directly.

Run through bench/run.sh, which builds the release binaries first. Starts the
demo upstreams and gateways as separate processes pinned with taskset, drives
them with the tonic load generator (bench/loadgen.rs) and, for saturation,
with h2load too (Debian nghttp2-client; skipped when missing), prints a table
and writes every figure to bench/results/. Only the Python standard library.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
FANOUT = [1, 2, 4, 8, 16]
IN_FLIGHT = 10_000
# Keeps the ready lines, drops the per-call INFO event (see the README).
QUIET_LOG = "warn,aggregator=info,aggregator::gateway=warn"

TARGETS = {
    "overhead_p50_us": 60,
    "overhead_p99_us": 250,
    "saturation_ratio": 0.40,
    "fanout16_p50_us": 5300,
    "rss_idle_mb": 15,
    "rss_10k_mb": 64,
    "rss_10k_http_mb": 100,
}


def cpus():
    return sorted(os.sched_getaffinity(0))


class Placement:
    """Which CPUs each role runs on; the same for the direct and gateway runs."""

    def __init__(self, spec):
        available = cpus()
        if spec == "none" or len(available) < 2 or not shutil.which("taskset"):
            self.load = self.upstreams = self.gateway = None
        else:
            # Two cores: the gateway gets one to itself; the load generator
            # and the upstreams share the other, in both kinds of run.
            first, second = available[0], available[1]
            self.load = self.upstreams = str(first)
            self.gateway = str(second)
        # Attribution run: everything on one CPU, so no call waits for an
        # idle CPU to wake up and what remains is work.
        self.one_cpu = str(available[0]) if self.gateway is not None else None

    def wrap(self, role, argv):
        cpu = getattr(self, role)
        return (["taskset", "-c", cpu] if cpu is not None else []) + argv

    def describe(self):
        if self.gateway is None:
            return "unpinned"
        return f"load generator and upstreams on CPU {self.load}, gateway on CPU {self.gateway}"


class Process:
    """A server process whose address comes from its JSON ready log line."""

    def __init__(self, argv, ready, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w+")
        env = dict(os.environ, RUST_LOG=QUIET_LOG)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.events = []
        self.fields = self._wait_ready(ready)

    def _wait_ready(self, message):
        # The line is written after the sockets are bound; read the log as it grows.
        with open(self.log_path) as reader:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                line = reader.readline()
                if not line:
                    if self.proc.poll() is not None:
                        sys.exit(f"bench: {self.proc.args} exited: {pathlib.Path(self.log_path).read_text()}")
                    time.sleep(0.01)
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.events.append(event)
                if event.get("message") == message:
                    return event
        sys.exit(f"bench: no '{message}' from {self.proc.args}")

    def metrics_url(self):
        """Where the process serves /metrics, if it does."""
        for event in self.events:
            if event.get("message") == "metrics at /metrics":
                return f"http://{event['addr']}/metrics"
        return None

    def calls(self, aggregation):
        """aggregator_calls_total for `aggregation`, by code."""
        text = urllib.request.urlopen(self.metrics_url(), timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r'aggregator_calls_total\{(.*)\} (\S+)', line)
            if m and f'aggregation="{aggregation}"' in m.group(1):
                code = re.search(r'code="([^"]+)"', m.group(1)).group(1)
                out[code] = out.get(code, 0) + float(m.group(2))
        return out

    @property
    def pid(self):
        return self.proc.pid

    def cpu_seconds(self):
        fields = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def rss_mb(self, key="VmRSS"):
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} for {self.pid}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.bin = str(ROOT / "target/release/aggregator")
        self.loadgen = str(ROOT / "target/release/examples/loadgen")
        self.otlp_sink = str(ROOT / "target/release/examples/otlp_sink")
        self.naive_bin = str(ROOT / "target/release/examples/naive")
        self.place = Placement(args.pin)
        self.processes = []
        self.upstream_procs = {}
        self.redis_procs = []
        self.results = {}
        self.open_files = open_files_limit()

    # ---- processes ----

    def upstreams(self, name, delay, role="upstreams"):
        p = Process(
            self.place.wrap(
                role,
                [self.bin, "--log-format", "json", "demo-upstreams",
                 "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--delay", delay],
            ),
            "demo upstreams ready",
            self.tmp / f"upstreams-{name}.log",
        )
        self.processes.append(p)
        self.upstream_procs[name] = p
        return p.fields["grpc"], p.fields["http"]

    def gateway(self, name, config, role="gateway"):
        path = self.tmp / f"{name}.toml"
        path.write_text(config)
        p = Process(
            self.place.wrap(role, [self.bin, "--log-format", "json", "--config", str(path)]),
            "aggregator ready",
            self.tmp / f"gateway-{name}.log",
        )
        self.processes.append(p)
        return p, "http://" + p.fields["addr"]

    def naive(self, name, grpc, http, role="gateway"):
        """The naive peer (bench/naive.rs) in front of these upstreams."""
        p = Process(
            self.place.wrap(role, [self.naive_bin, "--grpc", grpc, "--http", http]),
            "naive ready",
            self.tmp / f"naive-{name}.log",
        )
        self.processes.append(p)
        return p, "http://" + p.fields["addr"]

    def h2load(self, target, path, body, connections=8, streams=8, role="load"):
        """h2load (Debian nghttp2-client) posting the gRPC frame `body` to
        `path`, `connections` x `streams` in flight: {rps, requests}. It sees
        HTTP statuses only, not gRPC ones: the caller checks those through
        the gateway's metrics."""
        a = self.args
        body_file = self.tmp / f"body-{len(body)}-{hash(body) & 0xffff}.bin"
        body_file.write_bytes(body)
        argv = ["h2load", "-c", str(connections), "-m", str(streams), "-t", "1",
                "-D", f"{parse_seconds(a.duration) * 1000:.0f}ms",
                "--warm-up-time", f"{parse_seconds(a.warmup) * 1000:.0f}ms",
                "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
                target + path]
        out = subprocess.run(self.place.wrap(role, argv), check=True, capture_output=True, text=True).stdout
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
        total, succeeded = int(done.group(2)), int(done.group(3))
        if total == 0 or succeeded != total:
            sys.exit(f"bench: h2load against {path}: {succeeded} of {total} answered 2xx\n{out}")
        return {"rps": rps, "requests": total}

    def h2load_cpu(self, gw, target, aggregation):
        """An h2load saturating run of `aggregation` on gateway `gw`: the
        report with the gateway's CPU µs per call, every call checked OK in
        the gateway's metrics."""
        before, cpu = gw.calls(aggregation), gw.cpu_seconds()
        report = self.h2load(target, "/aggregator.v1.Aggregator/Aggregate", aggregate_body(aggregation))
        cpu = gw.cpu_seconds() - cpu
        after = gw.calls(aggregation)
        delta = {c: after.get(c, 0) - before.get(c, 0) for c in after}
        # When its time is up h2load drops the calls it has in flight: at
        # most its 64 streams end CANCELLED. Any other code fails the run.
        cancelled = delta.pop("CANCELLED", 0)
        if set(c for c, n in delta.items() if n) != {"OK"} or cancelled > 64:
            sys.exit(f"bench: h2load calls of {aggregation} ended with {delta}, {cancelled} cancelled")
        report["cpu_us_per_request"] = cpu * 1e6 / (delta["OK"] + cancelled)
        report["answered_ok"] = int(delta["OK"])
        return report

    def load(self, target, call, aggregation="", role="load", **opts):
        opts.setdefault("warmup", self.args.warmup)
        argv = [self.loadgen, "--target", target, "--call", call]
        if aggregation:
            argv += ["--aggregation", aggregation]
        for key, value in opts.items():
            argv += [f"--{key}", str(value)]
        out = subprocess.run(
            self.place.wrap(role, argv), check=True, capture_output=True, text=True
        ).stdout
        report = json.loads(out.strip().splitlines()[-1])
        # h2load-style tools count a non-OK grpc-status as success; this one
        # counts every status, and a benchmark run must be all OK.
        if report["ok"] != report["requests"] or report["requests"] == 0:
            sys.exit(f"bench: non-OK statuses from {call} {aggregation}: {report['codes']} {report['samples']}")
        return report

    def redis(self):
        """A redis-server on a free port, pinned with the upstreams: its
        URL, or None when redis-server is not installed."""
        if not shutil.which("redis-server"):
            return None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen(self.place.wrap("upstreams", argv), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        self.redis_procs.append(proc)
        for line in proc.stdout:
            if "Ready to accept connections" in line:
                # Drain the rest of its log so it never blocks on the pipe.
                subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
                return f"redis://127.0.0.1:{port}/0"
        sys.exit(f"bench: redis-server on port {port} exited before it was ready")

    # ---- scenarios ----

    def run(self):
        a = self.args
        grpc5, http5 = self.upstreams("5ms", "5ms")
        grpc0, http0 = self.upstreams("0ms", "0ms")
        config = gateway_config(
            [("d5", grpc5, http5), ("d0", grpc0, http0)],
            fanout=(grpc5, http5),
        )
        gw, target = self.gateway("main", config)
        time.sleep(0.2)  # let the process settle before reading its idle RSS
        self.results["rss_idle_mb"] = round(gw.rss_mb(), 1)
        # Learn each gRPC source's schema by reflection before measuring.
        for agg in ["dash_d5", "dash_d0", "chain_d0"] + [f"fan{n}" for n in FANOUT]:
            self.load(target, "aggregate", agg, concurrency=1, duration="200ms", warmup="0s")

        self.naive5 = self.naive("d5", grpc5, http5)[1]
        self.naive0 = self.naive("d0", grpc0, http0)
        self.overhead(target, "http://" + grpc5)
        self.saturation(gw, target, "http://" + grpc0)
        self.tracing(gw, target, grpc0, http0)
        self.coalescing(gw, target, grpc0, http0)
        self.chain(gw, target)
        self.cache(grpc0, http0)
        self.fanout(target)
        self.under_load(target, "http://" + grpc0)
        self.results["rss_peak_mb"] = round(gw.rss_mb("VmHWM"), 1)
        self.in_flight()

    def overhead(self, gateway, direct):
        """One call in flight; rounds alternate so drift hits both sides."""
        self.results["overhead"] = self.overhead_rounds(gateway, direct, "load", naive=self.naive5)
        if self.place.one_cpu is not None:
            grpc, http = self.upstreams("one_cpu", "5ms", role="one_cpu")
            _, target = self.gateway("one_cpu", gateway_config([("d5", grpc, http)]), role="one_cpu")
            self.load(target, "aggregate", "dash_d5", role="one_cpu", concurrency=1,
                      duration="200ms", warmup="0s")
            self.results["overhead_one_cpu"] = self.overhead_rounds(target, "http://" + grpc, "one_cpu")

    def overhead_rounds(self, gateway, direct, role, naive=None):
        a = self.args
        rows = {"direct": [], "gateway": []}
        if naive:
            rows["naive"] = []
        for _ in range(a.rounds):
            rows["direct"].append(
                self.load(direct, "profile", role=role, concurrency=1, duration=a.duration)
            )
            rows["gateway"].append(
                self.load(gateway, "aggregate", "dash_d5", role=role, concurrency=1, duration=a.duration)
            )
            if naive:
                rows["naive"].append(
                    self.load(naive, "aggregate", "dash_d5", role=role, concurrency=1, duration=a.duration)
                )
        med = lambda side, key: statistics.median(r[key] for r in rows[side])
        out = {side: {k: med(side, k) for k in ("p50_us", "p90_us", "p99_us", "rps")} for side in rows}
        out["overhead_p50_us"] = round(med("gateway", "p50_us") - med("direct", "p50_us"), 1)
        out["overhead_p99_us"] = round(med("gateway", "p99_us") - med("direct", "p99_us"), 1)
        if naive:
            out["naive_overhead_p50_us"] = round(med("naive", "p50_us") - med("direct", "p50_us"), 1)
            out["naive_overhead_p99_us"] = round(med("naive", "p99_us") - med("direct", "p99_us"), 1)
        # A p99 of fewer calls than this is the slowest one or two: noise,
        # not a percentile. It is not reported, rather than judged.
        calls = min(r["requests"] for side in rows.values() for r in side)
        out["calls_per_round"] = calls
        if calls < MIN_P99_CALLS:
            out["overhead_p99_us"] = None
        # The gateway is one more hop than the direct call: an overhead below
        # zero means the two runs did not measure the same thing.
        for key in ("overhead_p50_us", "overhead_p99_us"):
            if out[key] is not None and out[key] < 0:
                sys.exit(
                    f"bench: negative {key} ({out[key]} µs, {role}): gateway {out['gateway']}, "
                    f"direct {out['direct']}; a broken measurement, not a result"
                )
        out["rounds"] = rows
        return out

    def saturation(self, gw, gateway, direct):
        a = self.args
        opts = dict(concurrency=a.saturation_concurrency, connections=4, duration=a.duration)
        rows = {"direct": [], "gateway": [], "naive": []}
        cpu_us, naive_cpu_us = [], []
        naive_proc, naive = self.naive0
        for _ in range(a.rounds):
            rows["direct"].append(self.load(direct, "profile", **opts))
            report, cpu = self.cpu_per_call(gw, gateway, opts)
            cpu_us.append(cpu)
            rows["gateway"].append(report)
            report, cpu = self.cpu_per_call(naive_proc, naive, opts)
            naive_cpu_us.append(cpu)
            rows["naive"].append(report)
        h2 = self.h2load_saturation(gw, gateway, direct)
        direct_rps = statistics.median(r["rps"] for r in rows["direct"])
        gateway_rps = statistics.median(r["rps"] for r in rows["gateway"])
        naive_rps = statistics.median(r["rps"] for r in rows["naive"])
        self.results["saturation"] = {
            "direct_rps": round(direct_rps),
            "gateway_rps": round(gateway_rps),
            "naive_rps": round(naive_rps),
            "ratio": round(gateway_rps / direct_rps, 3),
            "ratio_to_naive": round(gateway_rps / naive_rps, 3),
            "gateway_cpu_us_per_request": round(statistics.median(cpu_us), 1),
            "naive_cpu_us_per_request": round(statistics.median(naive_cpu_us), 1),
            "concurrency": a.saturation_concurrency,
            "rounds": rows,
            "h2load": h2,
        }

    def h2load_saturation(self, gw, gateway, direct):
        """The same saturation, driven by h2load -c 8 -m 8 (the pattern that
        once cost 2.5x the CPU per call): ours, the naive peer, direct."""
        if not shutil.which("h2load"):
            return None
        naive_proc, naive = self.naive0
        rows = {"gateway": [], "naive": [], "direct": []}
        for _ in range(self.args.rounds):
            rows["direct"].append(self.h2load(direct, "/demo.v1.Profiles/GetProfile", profile_body()))
            rows["gateway"].append(self.h2load_cpu(gw, gateway, "dash_d0"))
            cpu = naive_proc.cpu_seconds()
            report = self.h2load(naive, "/aggregator.v1.Aggregator/Aggregate", aggregate_body("dash_d0"))
            a = self.args
            total = report["requests"] * (1 + parse_seconds(a.warmup) / parse_seconds(a.duration))
            report["cpu_us_per_request"] = (naive_proc.cpu_seconds() - cpu) * 1e6 / total
            rows["naive"].append(report)
        med = lambda side, key: statistics.median(r[key] for r in rows[side])
        return {
            "gateway_rps": round(med("gateway", "rps")),
            "naive_rps": round(med("naive", "rps")),
            "direct_rps": round(med("direct", "rps")),
            "ratio": round(med("gateway", "rps") / med("direct", "rps"), 3),
            "ratio_to_naive": round(med("gateway", "rps") / med("naive", "rps"), 3),
            "gateway_cpu_us_per_request": round(med("gateway", "cpu_us_per_request"), 1),
            "naive_cpu_us_per_request": round(med("naive", "cpu_us_per_request"), 1),
            "rounds": rows,
        }

    def cpu_per_call(self, gw, gateway, opts, aggregation="dash_d0"):
        """One saturating run of an Aggregate (the 2-source one by default):
        its report, and the gateway's CPU µs per call."""
        before = gw.cpu_seconds()
        report = self.load(gateway, "aggregate", aggregation, **opts)
        # The warmup's calls are in the CPU time too; count them by rate.
        a = self.args
        total = report["requests"] * (1 + parse_seconds(a.warmup) / parse_seconds(a.duration))
        return report, (gw.cpu_seconds() - before) * 1e6 / total

    def chain(self, gw, gateway):
        """CPU per call of a two-level chain (orders reads the profile's
        user_id, so starts after it) next to the flat 2-source Aggregate over
        the same upstreams; rounds alternate so drift hits both."""
        a = self.args
        opts = dict(concurrency=a.saturation_concurrency, connections=4, duration=a.duration)
        flat, chain = [], []
        for _ in range(a.rounds):
            flat.append(self.cpu_per_call(gw, gateway, opts)[1])
            chain.append(self.cpu_per_call(gw, gateway, opts, "chain_d0")[1])
        self.results["chain"] = {
            "flat_cpu_us_per_request": round(statistics.median(flat), 1),
            "chain_cpu_us_per_request": round(statistics.median(chain), 1),
        }

    def cache(self, grpc, http):
        """CPU per call of the 2-source Aggregate answered from each source's
        cache (every call asks for the same user: after the first, all hits),
        with the memory store and with Redis."""
        a = self.args
        opts = dict(concurrency=a.saturation_concurrency, connections=4, duration=a.duration)
        stores = [("memory", "")]
        redis = self.redis()
        if redis:
            stores.append(("redis", f'store = "{redis}"\nstore_timeout = "100ms"\n'))
        out = {}
        for name, server in stores:
            config = gateway_config([("d0", grpc, http)], cache=True, server=server)
            gw, target = self.gateway(f"cache_{name}", config)
            self.load(target, "aggregate", "dash_d0", concurrency=1, duration="200ms", warmup="0s")
            runs = [self.cpu_per_call(gw, target, opts) for _ in range(a.rounds)]
            out[name] = {
                "cpu_us_per_request": round(statistics.median(c for _, c in runs), 1),
                "rps": round(statistics.median(r["rps"] for r, _ in runs)),
            }
            gw.stop()
        self.results["cache"] = out

    def tracing(self, gw, gateway, grpc, http):
        """The same saturating load on a second gateway that samples every
        call and exports its spans to a real OTLP receiver; rounds alternate
        with the untraced gateway so drift hits both."""
        a = self.args
        sink = Process(self.place.wrap("upstreams", [self.otlp_sink]), "otlp sink ready",
                       self.tmp / "otlp-sink.log")
        self.processes.append(sink)
        config = gateway_config([("d0", grpc, http)]) + (
            f'\n[telemetry]\notlp_endpoint = "http://{sink.fields["addr"]}"\nsample_ratio = 1.0\n'
        )
        traced, target = self.gateway("traced", config)
        self.load(target, "aggregate", "dash_d0", concurrency=1, duration="200ms", warmup="0s")
        opts = dict(concurrency=a.saturation_concurrency, connections=4, duration=a.duration)
        off, on, calls = [], [], 0
        for _ in range(a.rounds):
            off.append(self.cpu_per_call(gw, gateway, opts)[1])
            report, cpu = self.cpu_per_call(traced, target, opts)
            on.append(cpu)
            calls += report["requests"] * (1 + parse_seconds(a.warmup) / parse_seconds(a.duration))
        traced.stop()  # flushes the last batch before the sink stops
        sink.stop()
        spans = None
        for line in pathlib.Path(sink.log_path).read_text().splitlines():
            if '"otlp sink stopped"' in line:
                spans = json.loads(line)["spans"]
        if not spans:
            sys.exit(f"bench: the OTLP sink received no spans: {pathlib.Path(sink.log_path).read_text()}")
        off_us, on_us = statistics.median(off), statistics.median(on)
        self.results["tracing"] = {
            "cpu_us_per_request_off": round(off_us, 1),
            "cpu_us_per_request_on": round(on_us, 1),
            "cost_us": round(on_us - off_us, 1),
            # A call is one server span and a client span per upstream request
            # (2 here); fewer means the batch queue was full and spans were dropped.
            "spans_received_per_call": round(spans / calls, 2),
        }

    def coalescing(self, gw, gateway, grpc, http):
        """What coalescing costs when there is nothing to share: the same
        saturating load, every call for another user, on a second gateway
        with coalescing on; rounds alternate with the gateway without it."""
        a = self.args
        on_gw, target = self.gateway("coalescing", gateway_config([("d0", grpc, http)], coalesce=True))
        self.load(target, "aggregate", "dash_d0", concurrency=1, duration="200ms", warmup="0s")
        opts = dict(concurrency=a.saturation_concurrency, connections=4, duration=a.duration,
                    users=1_000_000)
        off, on = [], []
        for _ in range(a.rounds):
            off.append(self.cpu_per_call(gw, gateway, opts)[1])
            on.append(self.cpu_per_call(on_gw, target, opts)[1])
        joined = metric_sum(on_gw, "aggregator_coalesce_joined_calls")
        on_gw.stop()
        if joined:
            sys.exit(f"bench: {joined:.0f} calls were coalesced, with a distinct user for every call")
        off_us, on_us = statistics.median(off), statistics.median(on)
        self.results["coalescing"] = {
            "cpu_us_per_request_off": round(off_us, 1),
            "cpu_us_per_request_on": round(on_us, 1),
            "cost_percent": round(100 * (on_us - off_us) / off_us, 1),
        }

    def fanout(self, gateway):
        a = self.args
        out = {}
        for n in FANOUT:
            latency = self.load(gateway, "aggregate", f"fan{n}", concurrency=1, duration=a.duration)
            throughput = self.load(
                gateway, "aggregate", f"fan{n}", concurrency=256, connections=4, duration=a.duration
            )
            out[str(n)] = {
                "p50_us": latency["p50_us"],
                "p99_us": latency["p99_us"],
                "rps_at_256_in_flight": round(throughput["rps"]),
            }
        self.results["fanout"] = out

    def under_load(self, gateway, direct):
        a = self.args
        saturated = self.results["saturation"]["gateway_rps"]
        out = {}
        for share in (25, 50):
            rate = max(1, int(saturated * share / 100))
            opts = dict(rate=rate, concurrency=10000, connections=4, duration=a.duration)
            g = self.load(gateway, "aggregate", "dash_d0", **opts)
            d = self.load(direct, "profile", **opts)
            out[f"{share}%"] = {
                "rate": rate,
                "gateway": {k: g[k] for k in ("p50_us", "p99_us", "rps")},
                "direct": {k: d[k] for k in ("p50_us", "p99_us", "rps")},
            }
        self.results["under_load"] = out

    def in_flight(self):
        """Peak RSS of a fresh gateway holding 10,000 calls on 2 s upstreams;
        the gRPC upstream (a plain tonic server holding the same calls on one
        connection) is measured as a reference."""
        grpc, http = self.upstreams("slow", "2s")
        gw, target = self.gateway("slow", gateway_config([("slow", grpc, http)]))
        upstream = self.upstream_procs["slow"]
        opts = dict(concurrency=IN_FLIGHT, connections=64, duration="6s", warmup="0s", timeout="30s")
        grpc_only = self.load(target, "aggregate", "grpc_slow", **opts)
        rss_grpc = gw.rss_mb("VmHWM")
        rss_upstream = upstream.rss_mb("VmHWM")
        self.results["in_flight_10k"] = {
            "in_flight": IN_FLIGHT,
            "grpc_only": {"peak_rss_mb": round(rss_grpc, 1), "rps": round(grpc_only["rps"])},
            "grpc_upstream_peak_rss_mb": round(rss_upstream, 1),
        }
        # HTTP/1 holds one upstream connection per call in flight: the gateway
        # and the upstream each need a descriptor per call (limits are per process).
        if self.open_files < IN_FLIGHT + 1000:
            self.results["in_flight_10k"]["grpc_and_http"] = None
            return
        both = self.load(target, "aggregate", "dash_slow", **opts)
        self.results["in_flight_10k"]["grpc_and_http"] = {
            "peak_rss_mb": round(gw.rss_mb("VmHWM"), 1),
            "rps": round(both["rps"]),
        }
        # The same with `http2 = true` on the HTTP source, on a fresh gateway:
        # the calls share one upstream connection.
        gw2, target2 = self.gateway("slow_h2", gateway_config([("h2", grpc, http)], http2=True))
        self.load(target2, "aggregate", "dash_h2", concurrency=1, duration="200ms", warmup="0s")
        both = self.load(target2, "aggregate", "dash_h2", **opts)
        self.results["in_flight_10k"]["grpc_and_http2"] = {
            "peak_rss_mb": round(gw2.rss_mb("VmHWM"), 1),
            "rps": round(both["rps"]),
        }

    def stop(self):
        for p in reversed(self.processes):
            p.stop()
        for p in self.redis_procs:
            p.terminate()
            p.wait()


def metric_sum(process, name):
    """The sum of every series of metric `name` that `process` exports."""
    text = urllib.request.urlopen(process.metrics_url(), timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(name + r"(\{| )", line))


def _field(number, data):
    """A length-delimited protobuf field."""
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def grpc_frame(message):
    return b"\x00" + len(message).to_bytes(4, "big") + message


def aggregate_body(aggregation, user="42"):
    """An AggregateRequest {aggregation, params: {user_id}} as a gRPC frame."""
    entry = _field(1, b"user_id") + _field(2, user.encode())
    return grpc_frame(_field(1, aggregation.encode()) + _field(2, entry))


def profile_body(user="42"):
    """A demo.v1 GetProfileRequest {user_id} as a gRPC frame."""
    return grpc_frame(_field(1, user.encode()))


def open_files_limit():
    """Raises this process's open-files limit (inherited by every process it
    starts) as far as allowed, and returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def parse_seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text)
    if not m:
        raise ValueError(f"duration {text!r}: use e.g. 5s or 500ms")
    return float(m[1]) / (1000 if m[2] == "ms" else 1)


def gateway_config(sets, fanout=None, http2=False, cache=False, server="", coalesce=False):
    """One gRPC and one HTTP source per upstream set, a 2-source aggregation
    over each, and 16 alternating sources for the fan-out aggregations; with
    `cache`, every source caches its answers for an hour. `server` adds
    lines to [server]; `coalesce` turns request coalescing on."""
    # Every call asks for the same user: coalescing would answer most of
    # them from another's request, so it is off to measure the full path.
    # HTTP sources may open a connection per call in flight (10,000 in the
    # in-flight run), as before the per-source cap existed.
    out = ['[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"\ndrain_timeout = "1s"\n' + server +
           '[defaults]\ncoalesce = ' + ("true" if coalesce else "false") + '\nmax_connections = 20000\n']
    cached = 'cache = { ttl = "1h" }\n' if cache else ""


    def grpc(name, addr):
        out.append(
            f'[sources.{name}]\nkind = "grpc"\nendpoint = "http://{addr}"\n'
            f'method = "demo.v1.Profiles/GetProfile"\nrequest = {{ user_id = "{{user_id}}" }}\n'
            + cached
        )

    def http(name, addr):
        out.append(f'[sources.{name}]\nkind = "http"\nurl = "http://{addr}/users/{{user_id}}/orders"\n'
                   + ("http2 = true\n" if http2 else "") + cached)

    def aggregation(name, sources):
        names = ", ".join(f'"{s}"' for s in sources)
        out.append(f'[aggregations.{name}]\nsources = [{names}]\ntimeout = "30s"\n')

    for tag, grpc_addr, http_addr in sets:
        grpc(f"profile_{tag}", grpc_addr)
        http(f"orders_{tag}", http_addr)
        aggregation(f"dash_{tag}", [f"profile_{tag}", f"orders_{tag}"])
        aggregation(f"grpc_{tag}", [f"profile_{tag}"])
        # The same two calls as a chain: orders reads the profile's answer.
        out.append(f'[sources.chained_orders_{tag}]\nkind = "http"\n'
                   f'url = "http://{http_addr}/users/{{$profile_{tag}.user_id}}/orders"\n')
        aggregation(f"chain_{tag}", [f"profile_{tag}", f"chained_orders_{tag}"])
    if fanout:
        grpc_addr, http_addr = fanout
        for i in range(1, max(FANOUT) + 1):
            (grpc if i % 2 else http)(f"f{i}", grpc_addr if i % 2 else http_addr)
        for n in FANOUT:
            aggregation(f"fan{n}", [f"f{i}" for i in range(1, n + 1)])
    return "\n".join(out)


def machine():
    model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // (1024 * 1024)
    return {
        "cpu": model,
        "cpus": len(cpus()),
        "memory_gib": mem,
        "kernel": platform.release(),
        "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip(),
    }


# Calls per round below which a p99 is not reported (see overhead_rounds).
MIN_P99_CALLS = 500


def p99_text(o):
    if o["overhead_p99_us"] is None:
        return f"n/a ({o['calls_per_round']} calls per round, too few for a p99)"
    return f"{o['overhead_p99_us']:.0f} µs"


def verdict(value, target, higher_is_better=False):
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def table(r, place):
    o, s, f, u, m = r["overhead"], r["saturation"], r["fanout"], r["under_load"], r["in_flight_10k"]
    one = r.get("overhead_one_cpu")
    t = r["tracing"]
    k = r["coalescing"]
    c = r["chain"]
    rows = [
        ("Overhead p50, 1 in flight, 5 ms upstreams",
         f"{o['overhead_p50_us']:.0f} µs (gateway {o['gateway']['p50_us']:.0f}, direct {o['direct']['p50_us']:.0f})",
         f"≤ {TARGETS['overhead_p50_us']} µs", verdict(o["overhead_p50_us"], TARGETS["overhead_p50_us"])),
        ("Overhead p99",
         f"{p99_text(o)} (gateway {o['gateway']['p99_us']:.0f}, direct {o['direct']['p99_us']:.0f})",
         f"≤ {TARGETS['overhead_p99_us']} µs", verdict(o["overhead_p99_us"], TARGETS["overhead_p99_us"])),
        ("Same for the naive peer: p50 / p99",
         f"{o['naive_overhead_p50_us']:.0f} / {o['naive_overhead_p99_us']:.0f} µs", "", ""),
    ]
    if one:
        rows += [
            ("Same, everything on one CPU (attribution)",
             f"p50 {one['overhead_p50_us']:.0f} µs, p99 {p99_text(one)} "
             f"(gateway {one['gateway']['p50_us']:.0f}/{one['gateway']['p99_us']:.0f}, "
             f"direct {one['direct']['p50_us']:.0f}/{one['direct']['p99_us']:.0f})",
             "", ""),
        ]
    rows += [
        ("Saturation, 2-source Aggregate vs direct gRPC",
         f"{s['gateway_rps']}/s vs {s['direct_rps']}/s = {s['ratio']:.2f}",
         f"≥ {TARGETS['saturation_ratio']:.2f}",
         verdict(s["ratio"], TARGETS["saturation_ratio"], higher_is_better=True)),
        ("Saturation, ours vs the naive peer (bench/naive.rs)",
         f"{s['gateway_rps']}/s vs {s['naive_rps']}/s = {s['ratio_to_naive']:.2f}", "", ""),
        ("Gateway CPU per 2-source Aggregate (metrics on)",
         f"{s['gateway_cpu_us_per_request']:.0f} µs (naive peer {s['naive_cpu_us_per_request']:.0f} µs)", "", ""),
    ]
    h2 = s.get("h2load")
    rows += [
        ("Same under h2load -c 8 -m 8: ours / naive / direct",
         f"{h2['gateway_rps']}/s / {h2['naive_rps']}/s / {h2['direct_rps']}/s "
         f"(ours {h2['ratio_to_naive']:.2f}x naive, {h2['ratio']:.2f}x direct)"
         if h2 else "skipped: h2load (nghttp2-client) is not installed", "", ""),
        ("Gateway CPU per 2-source Aggregate under h2load",
         f"{h2['gateway_cpu_us_per_request']:.0f} µs (naive peer {h2['naive_cpu_us_per_request']:.0f} µs)"
         if h2 else "", "", ""),
        ("Same, every call traced to an OTLP receiver",
         f"{t['cpu_us_per_request_on']:.0f} µs against {t['cpu_us_per_request_off']:.0f} µs untraced "
         f"({t['cost_us']:+.0f} µs; {t['spans_received_per_call']} spans received per call)",
         "", ""),
        ("Same, coalescing on with nothing to share (every call another user)",
         f"{k['cpu_us_per_request_on']:.0f} µs against {k['cpu_us_per_request_off']:.0f} µs off "
         f"({k['cost_percent']:+.1f}%)", "≤ +5%", verdict(k["cost_percent"], 5)),
        ("Gateway CPU per call, two-level chain vs flat 2-source",
         f"{c['chain_cpu_us_per_request']:.0f} µs vs {c['flat_cpu_us_per_request']:.0f} µs "
         f"({c['chain_cpu_us_per_request'] - c['flat_cpu_us_per_request']:+.0f} µs)", "", ""),
    ]
    cache = r.get("cache", {})
    for store, label in [("memory", "in memory"), ("redis", "in Redis")]:
        row = cache.get(store)
        rows.append((
            f"Gateway CPU per 2-source Aggregate, both cache hits {label}",
            f"{row['cpu_us_per_request']:.0f} µs ({row['rps']}/s at saturation; "
            f"uncached {s['gateway_cpu_us_per_request']:.0f} µs)"
            if row else "skipped: redis-server is not installed",
            "", ""))
    for n in FANOUT:
        row = f[str(n)]
        target = f"≤ {TARGETS['fanout16_p50_us'] / 1000:.1f} ms" if n == 16 else ""
        rows.append((
            f"Fan-out {n:>2} x 5 ms: p50 / p99, rate at 256 in flight",
            f"{row['p50_us'] / 1000:.2f} / {row['p99_us'] / 1000:.2f} ms, {row['rps_at_256_in_flight']}/s",
            target,
            verdict(row["p50_us"], TARGETS["fanout16_p50_us"]) if n == 16 else "",
        ))
    for share, row in u.items():
        g, d = row["gateway"], row["direct"]
        rows.append((
            f"Open loop at {share} of saturation ({row['rate']}/s): p50 / p99",
            f"gateway {g['p50_us']:.0f} / {g['p99_us']:.0f} µs, direct {d['p50_us']:.0f} / {d['p99_us']:.0f} µs",
            "", "",
        ))
    rows += [
        ("RSS idle", f"{r['rss_idle_mb']:.1f} MB", f"≤ {TARGETS['rss_idle_mb']} MB",
         verdict(r["rss_idle_mb"], TARGETS["rss_idle_mb"])),
        ("Peak RSS over the runs above", f"{r['rss_peak_mb']:.1f} MB", "", ""),
        ("Peak RSS, 10k in flight, 1 gRPC source",
         f"{m['grpc_only']['peak_rss_mb']:.1f} MB (the tonic upstream holding them: "
         f"{m['grpc_upstream_peak_rss_mb']:.1f} MB)",
         f"≤ {TARGETS['rss_10k_mb']} MB", verdict(m["grpc_only"]["peak_rss_mb"], TARGETS["rss_10k_mb"])),
        ("Peak RSS, 10k in flight, gRPC + HTTP/1 sources",
         f"{m['grpc_and_http']['peak_rss_mb']:.1f} MB (HTTP/1: one upstream connection per call)"
         if m["grpc_and_http"] else "skipped: the open-files limit is below 11,000",
         "", ""),
        ("Peak RSS, 10k in flight, gRPC + HTTP source with http2 = true",
         f"{m['grpc_and_http2']['peak_rss_mb']:.1f} MB (one upstream connection for all)"
         if m.get("grpc_and_http2") else "skipped: the open-files limit is below 11,000",
         f"≤ {TARGETS['rss_10k_http_mb']} MB",
         verdict(m["grpc_and_http2"]["peak_rss_mb"], TARGETS["rss_10k_http_mb"])
         if m.get("grpc_and_http2") else ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"placement: {place.describe()}", ""]
    header = ("Measure", "Result", "Target", "")
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("-|-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", default="5s", help="length of each measured run")
    parser.add_argument("--warmup", default="1s")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/gateway rounds")
    parser.add_argument("--saturation-concurrency", type=int, default=128)
    parser.add_argument("--pin", choices=["auto", "none"], default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench/results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as tmp:
        bench = Bench(args, pathlib.Path(tmp))
        started = time.monotonic()
        try:
            bench.run()
        finally:
            bench.stop()
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "placement": bench.place.describe(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "targets": TARGETS,
            "results": bench.results,
            "seconds": round(time.monotonic() - started),
        }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(bench.results, bench.place))
    print(f"\nmachine: {results['machine']['cpu']}, {results['machine']['cpus']} CPUs; "
          f"took {results['seconds']} s; written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
