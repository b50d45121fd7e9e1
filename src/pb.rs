//! Generated protobuf and gRPC code, kept in one place; the rest of the crate
//! works on its own types and converts at the edge (`api`, `demo`).

#![allow(clippy::all, missing_docs)]

pub mod aggregator {
    pub mod v1 {
        tonic::include_proto!("aggregator.v1");
    }
}

pub mod demo {
    pub mod v1 {
        tonic::include_proto!("demo.v1");
    }
}

/// Encoded descriptors of `aggregator.v1`, served by reflection.
pub const AGGREGATOR_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aggregator_descriptor.bin"));

/// Encoded descriptors of `demo.v1`, served by the demo upstream's reflection.
pub const DEMO_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo_descriptor.bin"));
