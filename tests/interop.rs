//! Interop: Python's grpcio (a gRPC stack other than tonic) drives the real server through health,
//! reflection v1/v1alpha, Predict and a streamed Generate cancelled halfway; and the README's ghz
//! examples are checked against the descriptors the server reflects. `scripts/test` installs the
//! pinned Python packages into `.venv-test`.
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;

#[tokio::test]
async fn python_grpcio_drives_the_server_through_reflection() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test (it installs tests/interop/requirements.txt)",
        python.display()
    );
    let server = Server::start(&[]).await;
    let addr = server.addr.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(root.join("tests/interop/interop.py"))
            .arg(addr)
            .arg(root.join("README.md"))
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "interop failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("interop: all checks passed"), "{stdout}");
}
