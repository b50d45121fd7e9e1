// Checks the gateway's public contract from Node (@grpc/grpc-js).
//
// Usage: node client.mjs HOST:PORT [PROTO_DIR]
//
// Loads proto/aggregator/v1/aggregator.proto at run time with
// @grpc/proto-loader (which bundles the google/protobuf well-known types).
// Expects the demo upstreams with a 50 ms delay behind the gateway and the
// aggregations of examples/gateway.toml. Prints `ok  - ...` per passing check
// and `not ok - ...` per failing one; exits 1 if any check failed.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const TIMEOUT_MS = 5000;

const [addr, protoArg] = process.argv.slice(2);
if (!addr) {
  console.error('usage: node client.mjs HOST:PORT [PROTO_DIR]');
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const protoDir = protoArg ?? path.resolve(here, '..', '..', 'proto');

const definition = protoLoader.loadSync('aggregator/v1/aggregator.proto', {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { Aggregator } = grpc.loadPackageDefinition(definition).aggregator.v1;

// Wire-compatible copies of google.rpc.Status, google.protobuf.Any and
// google.rpc.ErrorInfo, to read grpc-status-details-bin without googleapis.
const rpcTypes = protobuf.parse(`
  syntax = "proto3";
  package polyglot;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message HealthCheckRequest { string service = 1; }
  message HealthCheckResponse { int32 status = 1; }
`).root;
const Status = rpcTypes.lookupType('polyglot.Status');
const ErrorInfo = rpcTypes.lookupType('polyglot.ErrorInfo');
const HealthCheckRequest = rpcTypes.lookupType('polyglot.HealthCheckRequest');
const HealthCheckResponse = rpcTypes.lookupType('polyglot.HealthCheckResponse');
const SERVING = 1;

class CheckFailed extends Error {}

function expect(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

// google.protobuf.Struct / Value as decoded by proto-loader -> plain JSON.
function fromValue(value) {
  switch (value.kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
    case 'stringValue':
    case 'boolValue':
      return value[value.kind];
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue.values ?? []).map(fromValue);
    default:
      throw new CheckFailed(`google.protobuf.Value without a kind: ${JSON.stringify(value)}`);
  }
}

function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));
}

const client = new Aggregator(addr, grpc.credentials.createInsecure());

function call(method, request, timeoutMs = TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

/** Calls a method that must fail; resolves to the grpc-js ServiceError. */
async function callError(method, request, timeoutMs = TIMEOUT_MS) {
  let response;
  try {
    response = await call(method, request, timeoutMs);
  } catch (error) {
    if (error.code === undefined) throw error;
    return error;
  }
  throw new CheckFailed(`expected an error, got ${JSON.stringify(response)}`);
}

function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

const dashboard42 = { aggregation: 'user_dashboard', params: { user_id: '42' } };

const checks = [
  async function aggregate() {
    const response = await call('Aggregate', dashboard42);
    const data = fromStruct(response.data);
    expect(data.profile?.user_id === '42', `profile: ${JSON.stringify(data.profile)}`);
    const orders = data.orders ?? {};
    expect(
      Array.isArray(orders.orders) && orders.orders.length > 0 && orders.count === orders.orders.length,
      `orders: ${JSON.stringify(orders)}`,
    );
    expect(response.complete === true, 'complete is false');
    const sources = response.sources.map((s) => `${s.source}=${s.code}`);
    expect(sources.join(',') === 'profile=0,orders=0', `sources: ${sources}`);
    return 'Aggregate user_dashboard: merged profile and orders of user 42';
  },

  async function fetchAll() {
    const response = await call('FetchAll', dashboard42);
    const names = response.results.map((r) => r.source);
    expect(names.join(',') === 'profile,orders', `results order: ${names}`);
    expect(
      response.results.every((r) => r.code === 0),
      `codes: ${response.results.map((r) => r.code)}`,
    );
    expect(response.complete === true, 'complete is false');
    const profile = fromValue(response.results[0].data);
    expect(profile?.user_id === '42', `profile data: ${JSON.stringify(profile)}`);
    return 'FetchAll user_dashboard: results in order [profile, orders], all OK';
  },

  async function fetchSubset() {
    const response = await call('FetchAll', {
      ...dashboard42,
      sources: ['orders'],
      mode: 'MODE_BEST_EFFORT',
    });
    const names = response.results.map((r) => r.source);
    expect(names.join(',') === 'orders', `results: ${names}`);
    return 'FetchAll sources=[orders] MODE_BEST_EFFORT: only orders';
  },

  async function notFound() {
    // User 0 has no profile in the demo (but an empty order list).
    const error = await callError('Aggregate', {
      aggregation: 'user_dashboard',
      params: { user_id: '0' },
    });
    expect(error.code === grpc.status.NOT_FOUND, `code ${codeName(error.code)}: ${error.details}`);
    expect(error.details === "source 'profile': no user '0'", `message: ${error.details}`);
    const raw = error.metadata.get('grpc-status-details-bin');
    expect(raw.length === 1, `${raw.length} grpc-status-details-bin trailers`);
    const status = Status.decode(raw[0]);
    expect(status.code === grpc.status.NOT_FOUND, `Status.code ${status.code}`);
    const infos = status.details
      // protobufjs names fields in lowerCamelCase.
      .filter((d) => d.typeUrl === 'type.googleapis.com/google.rpc.ErrorInfo')
      .map((d) => ErrorInfo.decode(d.value));
    expect(infos.length === 1, `details: ${status.details.map((d) => d.typeUrl)}`);
    const [info] = infos;
    expect(
      info.domain === 'aggregator' && info.reason === 'SOURCE_FAILED',
      `ErrorInfo: ${JSON.stringify(info)}`,
    );
    expect(info.metadata.source === 'profile', `ErrorInfo.metadata: ${JSON.stringify(info.metadata)}`);
    return 'user 0: NOT_FOUND naming profile, ErrorInfo SOURCE_FAILED with metadata source=profile';
  },

  async function health() {
    // grpc.health.v1.Health/Check with wire-compatible message copies.
    const health = new grpc.Client(addr, grpc.credentials.createInsecure());
    try {
      for (const service of ['', 'aggregator.v1.Aggregator']) {
        const response = await new Promise((resolve, reject) =>
          health.makeUnaryRequest(
            '/grpc.health.v1.Health/Check',
            (message) => Buffer.from(HealthCheckRequest.encode(message).finish()),
            (bytes) => HealthCheckResponse.decode(bytes),
            HealthCheckRequest.create({ service }),
            { deadline: Date.now() + TIMEOUT_MS },
            (error, value) => (error ? reject(error) : resolve(value)),
          ),
        );
        expect(response.status === SERVING, `health of '${service}': status ${response.status}`);
      }
    } finally {
      health.close();
    }
    return "health Check '' and 'aggregator.v1.Aggregator': SERVING";
  },

  async function deadline() {
    const started = performance.now();
    const error = await callError('Aggregate', dashboard42, 20);
    const elapsed = performance.now() - started;
    expect(
      error.code === grpc.status.DEADLINE_EXCEEDED,
      `code ${codeName(error.code)}: ${error.details}`,
    );
    expect(elapsed < 1000, `answered after ${elapsed.toFixed(0)} ms`);
    // The gateway must still serve after abandoning the upstream calls.
    await call('Aggregate', dashboard42);
    return `20 ms deadline vs 50 ms upstreams: DEADLINE_EXCEEDED after ${elapsed.toFixed(0)} ms`;
  },
];

async function main() {
  // Connect first, so the 20 ms deadline is spent on the call, not on the handshake.
  await new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + TIMEOUT_MS, (error) =>
      error ? reject(new Error(`cannot connect to ${addr}: ${error.message}`)) : resolve(),
    ),
  );
  let failed = 0;
  for (const check of checks) {
    try {
      console.log(`ok  - ${await check()}`);
    } catch (error) {
      failed += 1;
      const detail = error instanceof CheckFailed ? error.message : (error.stack ?? String(error));
      console.log(`not ok - ${check.name}: ${detail}`);
    }
  }
  client.close();
  console.log(`node: ${checks.length - failed} passed, ${failed} failed`);
  return failed ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(`client.mjs: ${error.message}`);
    process.exit(1);
  },
);
