//! Generates the gRPC code from `proto/ringcast.proto` with a vendored `protoc`,
//! so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/ringcast.proto"],
        &["proto"],
    )?;
    Ok(())
}
