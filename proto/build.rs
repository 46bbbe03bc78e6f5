//! Compiles Weft's own protos with tonic; protoc comes vendored so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.enable_type_names();
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/identity.proto",
            "proto/federation.proto",
            "proto/admin.proto",
            "proto/xds.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
