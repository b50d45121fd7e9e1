//! What the gateway tells about itself: [`logs`] (one event per call, text
//! or JSON), [`metrics`] (Prometheus, at `[server] metrics_listen`).

pub mod logs;
pub mod metrics;

pub use logs::{LogFormat, init};
