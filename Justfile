# PocketOS: one place for every command a developer or CI runs.
# Quick start: `just demo` (the main job), `just test` (everything CI runs).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Everything CI runs: lints, then every test.
default: test

alias check := test

# Install what the tests and the demo need (apt and pip packages) when missing.
deps:
    tests/install-deps.sh

# Build every binary (tests start the real daemons).
build:
    cargo build --workspace --bins

# fmt, clippy -D warnings, cargo deny, shellcheck; then every test against
# a private dbus-daemon, the real daemons and a 127.0.0.1 HTTP server.
test: deps lint build
    cargo test --workspace

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    if command -v cargo-deny >/dev/null; then cargo deny --log-level error check bans licenses sources; else echo "cargo-deny not installed (cargo install --locked cargo-deny): skipped"; fi
    shellcheck $(git ls-files '*.sh' '.ci/run' 'daemons/*/data/S*')

# The main job: a PocketOS box on this machine, a signed catalog on
# 127.0.0.1, one-command model installs through pocketctl.
demo: deps build
    ./target/debug/pocket-devbox demo

# Keep a dev box up (private bus, daemons, catalog) for manual pocketctl use.
up: deps build
    ./target/debug/pocket-devbox up

# Benchmarks against baselines run in the same process; results go in
# docs/performance.md.
bench: deps
    cargo build --release --workspace --bins
    cargo bench -p pocket-tests --bench install
    cargo bench -p pocket-tests --bench infer
    cargo bench -p pocket-tests --bench power
    cargo bench -p pocket-tests --bench update

# Generate the seeded ONNX fixture models into DIR.
fixtures DIR:
    python3 models/fixtures/gen_fixtures.py {{DIR}}

fmt:
    cargo fmt --all
