//! SPIR-V manifests: every way a manifest can be wrong is an error naming the file and the field
//! (exit 2 from the CLI), and a manifest of a wrong kernel fails its cases. The shader is one of
//! vkdecode's own (the f32 fill kernel: it writes seeded random values into a buffer), written to
//! a temporary file: as an "attention kernel" it is wrong by construction, which the judge must
//! say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vkdecode::cases::grid::grid;
use vkdecode::cases::{Case, RunError};
use vkdecode::gpu::Context;
use vkdecode::implementation::{Judged, judge_case};
use vkdecode::manifest::Manifest;

/// A folder holding the fill shader's SPIR-V, and the manifest text around it with `{push}` and
/// `{bindings}` replaced.
fn workspace(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("manifest-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("fill.spv"), &vkdecode::shaders::FILL_F32.spirv[..]).unwrap();
    dir
}

const GOOD: &str = r#"
name = "fill-as-attention"
kernel = "attention"
let = ["n = B * T * H * D"]

[capabilities]
dtypes = ["f32"]

[[shaders]]
name = "fill"
spirv = "fill.spv"

[[buffers]]
name = "out"
role = "out"

[[passes]]
shader = "fill"
bindings = ["out"]
push = [
    { name = "n", type = "u32", value = "n" },
    { name = "seed", type = "u32", value = "7" },
    { name = "scale", type = "f32", value = "1.0" },
    { name = "offset", type = "f32", value = "0.0" },
]
grid = ["div_ceil(n, 256)", "1", "1"]
"#;

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("m.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load_error(name: &str, text: &str) -> String {
    let dir = workspace(name);
    match Manifest::load(&write(&dir, text)) {
        Ok(_) => panic!("{name}: the manifest loaded"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_names(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "`{message}` does not name `{p}`");
    }
}

#[test]
fn a_manifest_of_a_wrong_kernel_fails_its_cases() {
    let dir = workspace("wrong-kernel");
    let m = Arc::new(Manifest::load(&write(&dir, GOOD)).unwrap());
    let kernel = m.kernel(None).unwrap();
    let ctx = Context::shared().unwrap();
    let case = grid()
        .into_iter()
        .map(|g| g.case)
        .find(|c| matches!(c, Case::Attention(a) if a.dtype == vkdecode::kernels::Dtype::F32))
        .unwrap();
    match judge_case(&ctx, &kernel, &case, None).unwrap() {
        Judged::Ran(o) => assert!(!o.passed && o.mismatches > 0, "{o:?}"),
        Judged::Unsupported(r) => panic!("unsupported: {r}"),
    }
}

#[test]
fn malformed_toml_names_the_line() {
    let e = load_error("malformed", &GOOD.replace("kernel = \"attention\"", "kernel = attention"));
    assert_names(&e, &["m.toml", "(toml)", "line 3"]);
}

#[test]
fn an_unknown_field_is_rejected_by_name() {
    let e = load_error("unknown-field", &GOOD.replace("name = \"out\"\n", "name = \"out\"\nsize = 4\n"));
    assert_names(&e, &["unknown field `size`"]);
}

#[test]
fn a_push_block_of_the_wrong_size_names_the_field_and_both_sizes() {
    let e = load_error("push-size", &GOOD.replace("    { name = \"offset\", type = \"f32\", value = \"0.0\" },\n", ""));
    assert_names(&e, &["passes[0].push", "12 bytes", "16 bytes"]);
}

#[test]
fn a_binding_the_shader_lacks_names_both_sides() {
    let e = load_error("binding", &GOOD.replace("bindings = [\"out\"]", "bindings = [\"out\", \"out\"]"));
    assert_names(&e, &["passes[0].bindings[1]", "declares no binding 1"]);
}

#[test]
fn a_spec_constant_the_shader_lacks_is_named() {
    let e = load_error("spec", &GOOD.replace("grid = [", "spec = [{ id = 3, value = \"1\" }]\ngrid = ["));
    assert_names(&e, &["passes[0].spec[0]", "id 3"]);
}

#[test]
fn an_unknown_variable_is_named_with_its_field() {
    let e = load_error("variable", &GOOD.replace("value = \"7\"", "value = \"sead\""));
    assert_names(&e, &["passes[0]", "`sead`"]);
}

#[test]
fn an_expression_that_overflows_names_the_field_and_the_operation() {
    let dir = workspace("overflow");
    let text = GOOD.replace("value = \"7\"", "value = \"H * 4294967296 * 4294967296\"");
    let m = Arc::new(Manifest::load(&write(&dir, &text)).unwrap());
    let kernel = m.kernel(None).unwrap();
    let ctx = Context::shared().unwrap();
    let case = grid().into_iter().map(|g| g.case).find(|c| c.dtype() == vkdecode::kernels::Dtype::F32).unwrap();
    match judge_case(&ctx, &kernel, &case, None) {
        Err(e @ RunError::Manifest { .. }) => assert_names(&e.to_string(), &["passes[0].push (seed)", "overflow"]),
        other => panic!("expected a manifest error, got {other:?}"),
    }
}

#[test]
fn a_missing_device_feature_is_named() {
    let dir = workspace("feature");
    let text = GOOD.replace("spirv = \"fill.spv\"", "spirv = \"fill.spv\"\nrequired_subgroup_size = \"subgroup_size\"");
    let m = Manifest::load(&write(&dir, &text)).unwrap();
    let mut info = Context::shared().unwrap().info().clone();
    info.subgroup_size_control = false;
    let e = m.check_device(&info).unwrap_err().to_string();
    assert_names(&e, &["shaders (fill)", "subgroupSizeControl"]);
}

#[test]
fn an_unset_variable_in_a_path_is_named() {
    let dir = workspace("unset");
    let text = GOOD.replace("spirv = \"fill.spv\"", "spirv = \"${VKDECODE_SURELY_UNSET}/fill.spv\"");
    let e = match Manifest::load_with(&write(&dir, &text), &BTreeMap::new()) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert_names(&e, &["shaders[0] (fill).spirv", "VKDECODE_SURELY_UNSET"]);
}

/// The CLI: a bad manifest and an overflowing expression each exit 2 naming the field; the wrong
/// kernel's cases fail (exit 1).
#[test]
fn the_cli_exits_2_on_a_bad_manifest_and_1_on_failing_cases() {
    let dir = workspace("cli");
    let run = |text: &str| {
        let path = write(&dir, text);
        let out = Command::new(env!("CARGO_BIN_EXE_vkdecode"))
            .args(["check", "--no-corpus", "--filter", "grid/attention/f32/h4-kv4", "--manifest"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stderr, _) = run(&GOOD.replace("    { name = \"offset\", type = \"f32\", value = \"0.0\" },\n", ""));
    assert_eq!(code, Some(2), "{stderr}");
    assert_names(&stderr, &["passes[0].push"]);
    let (code, stderr, _) = run(&GOOD.replace("value = \"7\"", "value = \"H * 4294967296 * 4294967296\""));
    assert_eq!(code, Some(2), "{stderr}");
    assert_names(&stderr, &["passes[0].push (seed)", "overflow"]);
    let (code, stderr, stdout) = run(GOOD);
    assert_eq!(code, Some(1), "{stderr}{stdout}");
    assert_names(&stdout, &["FAIL", "grid/attention/f32/h4-kv4"]);
}
