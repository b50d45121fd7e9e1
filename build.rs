//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes the
//! descriptor sets that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for (file, descriptor) in [
        (
            "proto/aggregator/v1/aggregator.proto",
            "aggregator_descriptor.bin",
        ),
        ("proto/demo/v1/demo.proto", "demo_descriptor.bin"),
    ] {
        let fds = protox::compile([file], ["proto"])?;
        std::fs::write(out.join(descriptor), prost::Message::encode_to_vec(&fds))?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .compile_fds(fds)?;
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
