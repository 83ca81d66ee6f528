//! LLM fixtures and what the reference implementations make of them
//! (`models/llm/`): SmolLM2-135M-Instruct from its pinned wheel and a tiny
//! seeded llama, each as an onnxruntime-genai folder in both KV layouts.

use crate::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The folder holding the LLM fixtures, built once (`models/llm/fixtures.sh`).
pub fn llm_fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = workspace_root().join("target/llm");
        let st = Command::new(workspace_root().join("models/llm/fixtures.sh"))
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .expect("run models/llm/fixtures.sh");
        assert!(st.success(), "models/llm/fixtures.sh failed");
        out
    })
    .clone()
}

/// One of the fixture folders: `tiny-fp32`, `tiny-int4`, `smollm2-fp32`,
/// `smollm2-int4`.
pub fn llm_folder(name: &str) -> PathBuf {
    llm_fixtures().join(name)
}

/// Starts the workspace's Python `script`, its stdin and stdout piped to
/// the caller.
pub fn spawn_python(script: &str) -> std::process::Child {
    Command::new("python3")
        .arg(workspace_root().join(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

/// Runs `models/llm/reference.py` on `request` (see its doc).
pub fn llm_reference(request: &Value) -> Value {
    let mut child = spawn_python("models/llm/reference.py");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        request.to_string().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "reference.py failed");
    serde_json::from_slice(&out.stdout).expect("reference.py prints JSON")
}

/// Every file of a model folder, as `(name, path)` for a pack.
pub fn folder_files(folder: &Path) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(folder)
        .expect("model folder")
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    files.sort();
    files
}
