//! Compiles Tollgate's node-to-node protocol with protox (no system `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tollgate_peer.proto");
    let descriptors = protox::compile(["proto/tollgate_peer.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
