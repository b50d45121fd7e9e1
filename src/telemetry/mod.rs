//! What the gateway tells about itself: [`logs`] (one event per call, text
//! or JSON), [`metrics`] (Prometheus, at `[server] metrics_listen`),
//! [`traces`] (OpenTelemetry, over OTLP).

pub mod logs;
pub mod metrics;
pub mod traces;

pub use logs::{LogFormat, init};
