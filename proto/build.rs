//! Compiles Weft's own protos with tonic; protoc comes vendored so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.enable_type_names();
    // Weft's xDS types travel as resources (the directory): their type URLs are the standard
    // `type.googleapis.com/<full name>`.
    config.type_name_domain([".weft.xds.v1"], "type.googleapis.com");
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
