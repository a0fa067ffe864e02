//! Compiles the example's shader (`shaders/examples/naive_attention.comp` at the repository root,
//! where the project keeps its GLSL; vkdecode's own build.rs reads only `shaders/*.comp`) to
//! SPIR-V in OUT_DIR with the shaderc project's `glslc` (`GLSLC` overrides the path);
//! `src/lib.rs` embeds it with `include_bytes!`. A crate of your own keeps its shaders beside it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "../../shaders/examples/naive_attention.comp";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=GLSLC");
    let glslc = std::env::var("GLSLC").unwrap_or_else(|_| "glslc".to_string());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("naive_attention.spv");
    let output = Command::new(&glslc)
        .args(["-fshader-stage=compute", "--target-env=vulkan1.2", "-O", "-Werror", src, "-o"])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{glslc}` (apt-get install glslc, or set GLSLC): {e}"));
    if !output.status.success() {
        panic!("glslc failed on {src}:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}
