//! `aggregator`: a gRPC aggregation gateway. One call to
//! `aggregator.v1.Aggregator` fans out to every gRPC and HTTP/JSON upstream
//! of a named aggregation, concurrently and under the caller's deadline.
//!
//! # Layout
//!
//! - [`check`]: `aggregator check`: warnings about valid configs, probes.
//! - [`config`]: the TOML model and its validation into runtime specs;
//!   templates are compiled there, once.
//! - [`template`]: `{param}` placeholders and their context-aware escaping;
//!   `{$source.path}` references to other sources' results and the payload.
//! - [`transform`]: JMESPath filters (`transform`), bounded at load.
//! - [`server`]: `run(listener, config, shutdown)`: the gRPC server with
//!   health, reflection and graceful shutdown, and the layer order, socket
//!   in: connections (cap, timeouts, lingering close), requests per
//!   connection (idle, rapid resets), each stream's send bound, the gRPC
//!   edge (content type, deadline, reading the request within its limits).
//! - [`signals`]: SIGTERM/SIGINT (drain, then exit), SIGHUP and `--watch`
//!   (reload).
//! - [`health`]: `grpc.health.v1` statuses, per aggregation from breakers.
//! - [`api`]: the `Aggregate` / `FetchAll` handlers, protobuf <-> domain.
//! - [`gateway`]: resolves an aggregation, checks params, computes the deadline.
//! - [`deadline`]: the deadline as a value, and `grpc-timeout` parsing.
//! - [`request_id`]: every call's id, the caller's or a new one.
//! - [`fanout`]: concurrent dispatch; fail-fast vs best-effort; `min_success`.
//! - [`resilience`]: one state machine per file: bulkheads, retries,
//!   coalescing, circuit breakers, hedging.
//! - [`cache`]: a source's response cache (fresh, stale while revalidating,
//!   stale if error), in memory or in the store.
//! - [`ratelimit`]: `[rate_limits.NAME]`: GCRA per caller key.
//! - [`store`]: where caches and limits keep state: memory, or a Redis all
//!   replicas share, each operation within `store_timeout`.
//! - [`upstream`]: one source's client: gRPC (dynamic messages, reflection
//!   lookups shared and backed off) or HTTP (a capped pool per source).
//! - [`error`]: typed errors and the one mapping to `tonic::Status`, bounded
//!   in size; canonical code names and the ranking `min_success` uses.
//! - [`telemetry`]: logs (text or JSON, with what callers and upstreams sent
//!   escaped) and Prometheus metrics (calls, sources, resilience state).
//! - [`demo`]: the built-in demo upstreams.
//! - [`pb`]: generated protobuf code.

pub mod api;
pub mod cache;
pub mod check;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod error;
pub mod fanout;
pub mod gateway;
pub mod health;
pub mod pb;
pub mod ratelimit;
pub mod request_id;
pub mod resilience;
pub mod server;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod transform;
pub mod upstream;
