//! npud with the real ONNX Runtime library, models installed by the real
//! modeld, and the real pocketctl: outputs match the onnxruntime Python
//! reference, and every failure is a clear error from a daemon that stays up.

use nix::fcntl::SealFlag;
use pocket_proto::runtime::{Runtime1Proxy, TensorFile, TensorRef};
use pocket_tests::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A world with every fixture model installed, and npud running
/// with `npud_extra` config.
fn world(npud_extra: &str) -> World {
    let mut w = World::start();
    let fx = onnx_fixtures();
    for m in ["wide", "typed", "scaled", "doubled", "gathered", "named"] {
        w.publisher.pack(
            &w.packs,
            m,
            "1.0",
            &[(&format!("{m}.onnx"), &fx.join(format!("{m}.onnx")))],
        );
    }
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for m in [
        "mlp",
        "attention",
        "wide",
        "typed",
        "scaled",
        "doubled",
        "gathered",
        "named",
    ] {
        w.ctl(&["model", "install", m]).ok();
    }
    w.start_npud(npud_extra);
    w
}

fn run(w: &World, model: &str, inputs: &Value) -> Output {
    let text = inputs.to_string();
    if text.len() < 64 * 1024 {
        return w.ctl(&["run", model, "--input", &text, "--json"]);
    }
    let file = w.tmp.path().join("inputs.json");
    std::fs::write(&file, text).unwrap();
    w.ctl(&[
        "run",
        model,
        "--input-file",
        file.to_str().unwrap(),
        "--json",
    ])
}

/// Runs mlp on the same seeded input with pocketctl: whether npud answers.
fn run_mlp(w: &World) -> Output {
    run(
        w,
        "mlp",
        &json!({"x": {"shape": [1, 16], "data": seeded_data(16, 1)}}),
    )
}

#[test]
fn outputs_match_the_onnxruntime_reference() {
    let w = world("");
    let fx = onnx_fixtures();
    let cases = [
        (
            "mlp",
            json!({"x": {"shape": [1, 16], "data": seeded_data(16, 1)}}),
        ),
        (
            "attention",
            json!({"x": {"shape": [1, 8, 16], "data": seeded_data(128, 2)}}),
        ),
        // 1.2 MB in and out: both travel in memfds.
        (
            "wide",
            json!({"x": {"shape": [1, 300000], "data": seeded_data(300000, 3)}}),
        ),
        (
            "typed",
            json!({
                "a": {"shape": [3], "dtype": "i64", "data": [1, -2, 9_000_000_000i64]},
                "b": {"shape": [3], "dtype": "i32", "data": [1, 2, -3]},
                "c": {"shape": [3], "dtype": "u8", "data": [1, 2, 200]},
                "d": {"shape": [3], "dtype": "bool", "data": [true, false, true]},
                "e": {"shape": [3], "dtype": "f16", "data": [0.5, 1.5, -2.0]},
                "f": {"shape": [3], "dtype": "f64", "data": [0.1, 0.2, 0.3]},
            }),
        ),
    ];
    for (model, inputs) in cases {
        let got = run(&w, model, &inputs).ok().json();
        let want = reference_outputs(&fx.join(format!("{model}.onnx")), &inputs);
        assert_close(&got, &want, 1e-5);
        assert_eq!(got["provider"], "cpu", "{model}");
        assert!(got["latency_ms"].as_f64().unwrap() >= 0.0);
    }
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    assert_eq!(loaded.as_array().unwrap().len(), 4);
    let status = w.ctl(&["status", "--json"]).ok().json();
    assert_eq!(status["daemons"]["npud"]["status"], "ok");
}

#[test]
fn concurrent_requests_are_served_safely() {
    let w = world("");
    let inputs = json!({"x": {"shape": [1, 8, 16], "data": seeded_data(128, 5)}});
    let want = reference_outputs(&onnx_fixtures().join("attention.onnx"), &inputs);
    let children: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new(bin_path("pocketctl"))
                .args(["run", "attention", "--json", "--input", &inputs.to_string()])
                .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_close(&serde_json::from_slice(&out.stdout).unwrap(), &want, 1e-5);
    }
}

#[test]
fn providers_are_reported_honestly() {
    // Prefers an NPU this machine lacks; CPU fallback allowed and said so.
    // A vendor plugin EP library that is not there is reported, not fatal.
    let w = world(
        "providers = [\"qnn\", \"cpu\"]\nallow_cpu_fallback = true\n[[ep_libraries]]\nname = \"vendor_npu\"\npath = \"/nonexistent/libvendor_npu_ep.so\"",
    );
    let p = w.ctl(&["runtime", "providers", "--json"]).ok().json();
    let devices = p["devices"].as_array().unwrap();
    assert!(
        devices
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("CPUExecutionProvider: ")),
        "{p}"
    );
    assert!(p["plugins"].as_array().unwrap().is_empty());
    let status = w.ctl(&["status", "--json"]).ok().json();
    let s = status["daemons"]["npud"]["status"].as_str().unwrap();
    assert!(
        s.contains(
            "plugin EP library vendor_npu (/nonexistent/libvendor_npu_ep.so) not registered"
        ),
        "{s}"
    );
    assert!(p["library"].as_array().unwrap().contains(&json!("cpu")));
    assert!(!p["library"].as_array().unwrap().contains(&json!("qnn")));
    assert_eq!(p["selected"], "cpu");
    // A load that requires qnn falls back, visibly.
    let l = w
        .ctl(&["runtime", "load", "mlp", "--provider", "qnn", "--json"])
        .ok()
        .json();
    assert_eq!(l["provider"], "cpu (fallback from qnn)");
    let out = run_mlp(&w).ok().json();
    assert_eq!(out["provider"], "cpu (fallback from qnn)");

    // Without fallback, a required accelerator that is missing is an error.
    let mut w = world("providers = [\"qnn\"]\nallow_cpu_fallback = false");
    let refused = w.ctl(&["runtime", "load", "mlp"]);
    refused.fails_with(
        "execution provider qnn is not available on this device (ONNX Runtime offers: ",
    );
    refused.fails_with("cpu); CPU fallback is not allowed (ProviderUnavailable)");
    run_mlp(&w).fails_with("(ProviderUnavailable)");
    w.ctl(&["runtime", "providers"]).ok();

    // Provider names are matched without case: "CPU" is the CPU, not a
    // missing accelerator to fall back from.
    w.npud = None;
    w.start_npud("providers = [\"CPU\"]\nallow_cpu_fallback = false");
    let p = w.ctl(&["runtime", "providers", "--json"]).ok().json();
    assert_eq!(p["selected"], "cpu", "{p}");
    assert_eq!(p["preferred"], json!(["cpu"]), "{p}");
    assert_eq!(run_mlp(&w).ok().json()["provider"], "cpu");
    // A provider a caller names that npud does not know is a clear error.
    let unknown = w.ctl(&["runtime", "load", "mlp", "--provider", "npu"]);
    unknown.fails_with("unknown execution provider \"npu\"; known providers: qnn, acl, rknpu, nnapi, xnnpack, cpu (InvalidArgument)");

    // One in the config stops npud at start, naming the known ones.
    let config = w.tmp.path().join("unknown-provider.toml");
    std::fs::write(&config, "providers = [\"npu\", \"cpu\"]\n").unwrap();
    let out = std::process::Command::new(bin_path("pocket-npud"))
        .arg("--config")
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", w.bus.address())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("unknown execution provider \"npu\"; known providers: qnn, acl, rknpu, nnapi, xnnpack, cpu"),
        "{err}"
    );
}

#[test]
fn bad_requests_are_clear_errors_and_npud_stays_up() {
    let w = world("");
    let x = seeded_data(16, 1);
    run(&w, "mlp", &json!({"input": {"shape": [1, 16], "data": x}}))
        .fails_with("model \"mlp\" has no input \"input\" (its inputs: x) (InvalidArgument)");
    run(
        &w,
        "mlp",
        &json!({"x": {"shape": [1, 15], "data": &x[..15]}}),
    )
    .fails_with("input \"x\": expected shape [1, 16], got [1, 15] (InvalidArgument)");
    run(
        &w,
        "mlp",
        &json!({"x": {"shape": [1, 16], "dtype": "i64", "data": vec![1; 16]}}),
    )
    .fails_with("input \"x\": expected f32 elements, got i64 (InvalidArgument)");
    run(
        &w,
        "mlp",
        &json!({"x": {"shape": [1, 16], "data": &x[..4]}}),
    )
    .fails_with("input \"x\": shape [1, 16] of f32 needs 64 bytes, got 16");
    run(&w, "mlp", &json!({})).fails_with("input \"x\" (f32 [1, 16]) is missing");
    run(&w, "nosuch", &json!({})).fails_with("model \"nosuch\" is not installed (NotFound)");
    w.ctl(&["runtime", "unload", "attention"])
        .fails_with("not loaded");
    run(&w, "mlp", &json!({"x": {"shape": [1, 16], "data": x}})).ok();
}

#[test]
fn corrupt_model_and_missing_library_degrade_without_crashing() {
    let mut w = World::start();
    // A signed pack whose model file is not ONNX: installs, but cannot load.
    let junk = w.tmp.path().join("junk.onnx");
    random_file(&junk, 4096, 9);
    w.publisher
        .pack(&w.packs, "junk", "1.0", &[("junk.onnx", &junk)]);
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    w.ctl(&["model", "install", "junk"]).ok();
    w.ctl(&["model", "install", "mlp"]).ok();
    w.start_npud("");
    run(&w, "junk", &json!({})).fails_with("model \"junk\" cannot be loaded");
    w.ctl(&["runtime", "load", "junk"]).fails_with("(Corrupt)");
    run_mlp(&w).ok();

    // No library at the configured path: npud runs, degraded, and says why.
    w.npud = None;
    w.start_npud("onnxruntime_library = \"/nonexistent/libonnxruntime.so\"");
    let status = w.ctl(&["status", "--json"]).ok().json();
    let s = status["daemons"]["npud"]["status"].as_str().unwrap();
    assert!(s.starts_with("degraded: ONNX Runtime is not available: /nonexistent/libonnxruntime.so does not exist"), "{s}");
    w.ctl(&["runtime", "load", "mlp"])
        .fails_with("(RuntimeUnavailable)");
    run_mlp(&w).fails_with("ONNX Runtime is not available");

    // A file that is not a shared library: the same, not a crash.
    w.npud = None;
    let fake = w.tmp.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap();
    w.start_npud(&format!("onnxruntime_library = \"{}\"", fake.display()));
    w.ctl(&["runtime", "load", "mlp"])
        .fails_with("(RuntimeUnavailable)");
    w.ctl(&["runtime", "providers", "--json"]).ok();
}

#[test]
fn memory_budget_refuses_evicts_least_recently_used_and_idles_out() {
    let mut w = World::start();
    let fx = onnx_fixtures();
    let mib = 1u64 << 20;
    w.publisher
        .pack_needing(&w.packs, "a", &fx.join("mlp.onnx"), 600 * 1024);
    w.publisher
        .pack_needing(&w.packs, "b", &fx.join("mlp.onnx"), 600 * 1024);
    w.publisher
        .pack_needing(&w.packs, "huge", &fx.join("mlp.onnx"), 3 * mib);
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for m in ["a", "b", "huge"] {
        w.ctl(&["model", "install", m]).ok();
    }
    w.start_npud("memory_budget_mb = 1\nkeep_alive_secs = 2");
    w.ctl(&["runtime", "load", "huge"])
        .fails_with("model \"huge\" needs 3 MiB of memory but only 1 MiB of the 1 MiB budget is free (InsufficientMemory)");
    w.ctl(&["runtime", "load", "a"]).ok();
    w.ctl(&["runtime", "load", "b"]).ok();
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    let names: Vec<&str> = loaded
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b"], "a was not evicted to make room for b");
    wait_for(
        "keep-alive unload",
        std::time::Duration::from_secs(10),
        || {
            let l = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
            l.as_array().unwrap().is_empty().then_some(())
        },
    );
}

#[test]
fn removing_a_loaded_model_unloads_it_first() {
    let mut w = world("");
    let installed = w.installed().len();
    run_mlp(&w).ok();
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    assert!(loaded
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "mlp"));
    w.ctl(&["model", "remove", "mlp"]).ok();
    let loaded = w.ctl(&["runtime", "loaded", "--json"]).ok().json();
    assert!(
        !loaded
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "mlp"),
        "{loaded}"
    );
    run_mlp(&w).fails_with("model \"mlp\" is not installed (NotFound)");
    // With npud gone, removal does not depend on it.
    run(
        &w,
        "attention",
        &json!({"x": {"shape": [1, 8, 16], "data": seeded_data(128, 2)}}),
    )
    .ok();
    w.npud = None;
    w.ctl(&["model", "remove", "attention"]).ok();
    assert_eq!(w.installed().len(), installed - 2);
}

#[test]
fn inference_holds_performance_on_powerd_and_releases_it_when_idle() {
    let mut w = world("performance_hold_secs = 2");
    let board = SimBoard::rk3588(&w.tmp.path().join("sys"));
    let infer = |w: &World| {
        run_mlp(w).ok();
    };
    // npud found no powerd at its first inference; it follows powerd's bus
    // name and asks again as soon as powerd appears.
    infer(&w);
    w.start_powerd(board.root(), "");
    wait_for(
        "npud to hold performance",
        std::time::Duration::from_secs(10),
        || {
            infer(&w);
            (w.ctl(&["power", "get"]).ok().stdout.trim() == "performance").then_some(())
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let holds = rt.block_on(async {
        let conn = w.bus.connect().await;
        let p = zbus::Proxy::new(
            &conn,
            "net.hadess.PowerProfiles",
            "/net/hadess/PowerProfiles",
            "net.hadess.PowerProfiles",
        )
        .await
        .unwrap();
        let holds: Vec<std::collections::HashMap<String, zbus::zvariant::OwnedValue>> =
            p.get_property("ActiveProfileHolds").await.unwrap();
        holds
    });
    assert_eq!(holds.len(), 1);
    assert_eq!(
        String::try_from(holds[0]["ApplicationId"].clone()).unwrap(),
        "org.pocketos.Runtime1"
    );
    // powerd restarts while npud holds: the new powerd knows no holds and
    // npud, which saw it go, holds again at its next inference.
    w.powerd = None;
    w.start_powerd(board.root(), "");
    assert_eq!(w.ctl(&["power", "get"]).ok().stdout.trim(), "balanced");
    infer(&w);
    assert_eq!(w.ctl(&["power", "get"]).ok().stdout.trim(), "performance");
    wait_for(
        "the hold to be released when idle",
        std::time::Duration::from_secs(10),
        || (w.ctl(&["power", "get"]).ok().stdout.trim() == "balanced").then_some(()),
    );
}

#[test]
fn infer_fd_checks_sizes_before_reading() {
    let w = world("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = pocket_proto::runtime::Runtime1Proxy::new(&conn)
            .await
            .unwrap();
        let file = memfd(SealFlag::empty());
        file.set_len(64).unwrap();
        // Claims a terabyte of input in a 64-byte file.
        let refs = std::collections::HashMap::from([(
            "x".to_string(),
            pocket_proto::runtime::TensorRef {
                dtype: "f32".into(),
                shape: vec![1, 16],
                offset: 0,
                len: 1 << 40,
            },
        )]);
        use std::os::fd::AsFd;
        let err = npud
            .infer_fd("mlp", refs, zbus::zvariant::Fd::from(file.as_fd()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs 64 bytes, got 1099511627776"), "{err}");
        // A shape whose size overflows is refused, not a crash.
        let huge = std::collections::HashMap::from([(
            "x".to_string(),
            pocket_proto::runtime::Tensor {
                dtype: "f32".into(),
                shape: vec![i64::MAX / 2, 4],
                data: vec![],
            },
        )]);
        let err = npud.infer("scaled", huge).await.unwrap_err().to_string();
        assert!(err.contains("is too large"), "{err}");
        // The same through a tensor file: refused before anything is read.
        let err = npud
            .infer_fd(
                "scaled",
                one_ref("x", "f32", vec![i64::MAX / 2, 4], 0, u64::MAX),
                zbus::zvariant::Fd::from(file.as_fd()),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is too large"), "{err}");
    });
    run_mlp(&w).ok();
}

#[test]
fn pocketctl_repeats_a_run_as_any_user() {
    let w = world("");
    let inputs = json!({"x": {"shape": [1, 16], "data": seeded_data(16, 9)}});
    let want = reference_outputs(&onnx_fixtures().join("mlp.onnx"), &inputs);
    let got = run_pocketctl(
        &w.bus,
        RunAs::Nobody { extra_gid: None },
        &[
            "run",
            "mlp",
            "--input",
            &inputs.to_string(),
            "--repeat",
            "20",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_close(&got, &want, 1e-5);
    assert_eq!(got["runs"], 20);
    let p50 = got["round_trip_ms"]["p50"].as_f64().unwrap();
    let p99 = got["round_trip_ms"]["p99"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "{got}");
    let zero = w.ctl(&[
        "run",
        "mlp",
        "--input",
        &inputs.to_string(),
        "--repeat",
        "0",
    ]);
    assert!(
        !zero.status.success() && zero.stderr.contains("--repeat"),
        "{}",
        zero.stderr
    );
}

/// A memfd with `seals` added.
fn memfd(seals: SealFlag) -> std::fs::File {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let file = std::fs::File::from(
        memfd_create(
            c"test-tensors",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap(),
    );
    add_seals(&file, seals);
    file
}

fn add_seals(file: &std::fs::File, seals: SealFlag) {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).unwrap();
}

/// The seals on `file`.
fn seals(file: &std::fs::File) -> SealFlag {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    SealFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap())
}

/// One input `name` of `dtype` and `shape`, `len` bytes at `offset`.
fn one_ref(
    name: &str,
    dtype: &str,
    shape: Vec<i64>,
    offset: u64,
    len: u64,
) -> HashMap<String, TensorRef> {
    HashMap::from([(
        name.to_string(),
        TensorRef {
            dtype: dtype.into(),
            shape,
            offset,
            len,
        },
    )])
}

/// How many descriptors npud holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `x` as an f32 tensor of `shape`.
fn f32_tensor(x: &[f32], shape: Vec<i64>) -> pocket_proto::runtime::Tensor {
    pocket_proto::runtime::Tensor {
        dtype: "f32".into(),
        shape,
        data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A view's bytes as f32 numbers.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_tensor_file_is_copied_out_and_answered_with_a_sealed_file_of_npuds() {
    use std::os::unix::fs::MetadataExt;
    let w = world("max_request_mb = 1");
    let fx = onnx_fixtures();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        // Aligned and one byte off, sealed and not: every answer matches the
        // reference, comes in a file of npud's that no one can change, and
        // leaves the caller's file as it was.
        for (seed, seal, offset) in [
            (11, SealFlag::empty(), 0u64),
            (12, SealFlag::F_SEAL_SHRINK, 1),
            (13, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW, 0),
        ] {
            let file = memfd(SealFlag::empty());
            let x = seeded_data(16, seed);
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all_at(&bytes, offset).unwrap();
            add_seals(&file, seal);
            let size = file.metadata().unwrap().len();
            let refs = one_ref("x", "f32", vec![1, 16], offset, 64);
            let (outs, fd, _, _) = npud
                .infer_fd("mlp", refs, zbus::zvariant::Fd::from(file.as_fd()))
                .await
                .unwrap();
            let out = std::fs::File::from(OwnedFd::from(fd));
            assert_ne!(out.metadata().unwrap().ino(), file.metadata().unwrap().ino());
            let sealed = seals(&out);
            assert!(
                sealed.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
                "{sealed:?}"
            );
            assert_eq!(file.metadata().unwrap().len(), size, "the caller's file never grows");
            let y = &outs["y"];
            let mut buf = vec![0u8; y.len as usize];
            out.read_exact_at(&mut buf, y.offset).unwrap();
            let got = json!({"outputs": {"y": {"dtype": "f32", "shape": y.shape, "data": f32s(&buf)}}});
            let want = reference_outputs(
                &fx.join("mlp.onnx"),
                &json!({"x": {"shape": [1, 16], "data": x}}),
            );
            assert_close(&got, &want, 1e-5);
        }
        // Bytes outside the file: a clear error, not a crash.
        let file = memfd(SealFlag::empty());
        file.set_len(64).unwrap();
        let err = npud
            .infer_fd(
                "mlp",
                one_ref("x", "f32", vec![1, 16], 1 << 30, 64),
                zbus::zvariant::Fd::from(file.as_fd()),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("lie outside the file"), "{err}");
        // A file that is not a memfd (its reads could block) is refused.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(64).unwrap();
        let err = npud
            .infer_fd(
                "mlp",
                one_ref("x", "f32", vec![1, 16], 0, 64),
                zbus::zvariant::Fd::from(plain.as_fd()),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a memfd"), "{err}");

        // TensorFile: rows that change, and every element type.
        let mut file = TensorFile::new().unwrap();
        for rows in [5i64, 300, 2] {
            let x = seeded_data(rows as usize * 4, 60 + rows as u64);
            let t = f32_tensor(&x, vec![rows, 4]);
            let (outs, _, _) = file.infer(&npud, "scaled", &[("x", &t)]).await.unwrap();
            let y = &outs["y"];
            let got = json!({"outputs": {"y": {"dtype": y.dtype, "shape": y.shape, "data": f32s(&y.data)}}});
            let want = reference_outputs(
                &fx.join("scaled.onnx"),
                &json!({"x": {"shape": [rows, 4], "data": x}}),
            );
            assert_close(&got, &want, 1e-5);
        }
        let le = |v: &[&[u8]]| v.concat();
        let typed = |dtype: &str, data: Vec<u8>| pocket_proto::runtime::Tensor {
            dtype: dtype.into(),
            shape: vec![3],
            data,
        };
        let ins = [
            ("a", typed("i64", le(&[&1i64.to_le_bytes(), &(-2i64).to_le_bytes(), &9_000_000_000i64.to_le_bytes()]))),
            ("b", typed("i32", le(&[&1i32.to_le_bytes(), &2i32.to_le_bytes(), &(-3i32).to_le_bytes()]))),
            ("c", typed("u8", vec![1, 2, 200])),
            ("d", typed("bool", vec![1, 0, 1])),
            // 0.5, 1.5, -2.0 as f16
            ("e", typed("f16", le(&[&0x3800u16.to_le_bytes(), &0x3e00u16.to_le_bytes(), &0xc000u16.to_le_bytes()]))),
            ("f", typed("f64", le(&[&0.1f64.to_le_bytes(), &0.2f64.to_le_bytes(), &0.3f64.to_le_bytes()]))),
        ];
        let refs: Vec<(&str, &pocket_proto::runtime::Tensor)> =
            ins.iter().map(|(n, t)| (*n, t)).collect();
        let (outs, _, _) = file.infer(&npud, "typed", &refs).await.unwrap();
        let want = [
            ("a2", "i64", le(&[&2i64.to_le_bytes(), &(-4i64).to_le_bytes(), &18_000_000_000i64.to_le_bytes()])),
            ("b2", "i32", le(&[&2i32.to_le_bytes(), &4i32.to_le_bytes(), &(-6i32).to_le_bytes()])),
            ("c2", "u8", vec![2, 4, 144]),
            ("d2", "bool", vec![0, 1, 0]),
            // 1.0, 3.0, -4.0 as f16
            ("e2", "f16", le(&[&0x3c00u16.to_le_bytes(), &0x4200u16.to_le_bytes(), &0xc400u16.to_le_bytes()])),
            ("f2", "f64", le(&[&0.2f64.to_le_bytes(), &0.4f64.to_le_bytes(), &0.6f64.to_le_bytes()])),
        ];
        for (name, dtype, bytes) in want {
            let y = &outs[name];
            assert_eq!((y.dtype.as_str(), &y.shape[..]), (dtype, &[3i64][..]), "{name}");
            assert_eq!(&y.data[..], &bytes[..], "{name}");
        }
        // An output longer than the model declares is answered whole.
        for n in [3i64, 5, 4] {
            let x = seeded_data(n as usize, 40 + n as u64);
            let t = f32_tensor(&x, vec![n]);
            let (outs, _, _) = file.infer(&npud, "doubled", &[("x", &t)]).await.unwrap();
            assert_eq!(outs["y"].shape, vec![2 * n]);
            assert_eq!(f32s(&outs["y"].data), [x.clone(), x].concat());
        }
        // Past max_request_mb (1 MiB here): refused with the reason before
        // a byte is read.
        let x = seeded_data(81_920 * 4, 4);
        let t = f32_tensor(&x, vec![81_920, 4]);
        let err = file
            .infer(&npud, "scaled", &[("x", &t)])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("InvalidArgument") && err.contains("max_request_mb"),
            "{err}"
        );
    });
    run_mlp(&w).ok();
}

/// Hardening: a caller flips its input (an index) while npud runs the
/// model on it. npud copies inputs out of the caller's file before ONNX
/// Runtime reads them, so each answer is right for one value of the input
/// or a clear error, and npud stays up. A second process does the flipping,
/// through its own mapping of the file.
#[test]
fn inputs_flipped_during_infer_fd_cannot_crash_npud_or_leak_bytes() {
    let w = world("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    const N: usize = 256;
    let file = memfd(SealFlag::F_SEAL_SHRINK);
    let good: Vec<u8> = (0..N).flat_map(|_| 5i64.to_le_bytes()).collect();
    file.write_all_at(&good, 0).unwrap();
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
    let flip_secs = 10;
    let mut flipper = std::process::Command::new("python3")
        .args([
            "-c",
            FLIPPER,
            &path,
            &(N * 8).to_string(),
            &flip_secs.to_string(),
        ])
        .spawn()
        .expect("python3");
    let (mut right, mut refused) = (0, 0);
    let row5: Vec<f32> = (40..48).map(|v| v as f32).collect();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(flip_secs) {
            let refs = one_ref("idx", "i64", vec![N as i64], 0, (N * 8) as u64);
            match npud
                .infer_fd("gathered", refs, zbus::zvariant::Fd::from(file.as_fd()))
                .await
            {
                Ok(reply) => {
                    let (outs, _, _) = pocket_proto::runtime::read_outputs(reply).unwrap();
                    let y = f32s(&outs["y"].data);
                    assert_eq!(y.len(), N * 8);
                    // Every index was 5 or out of bounds; an answer means
                    // every one ONNX Runtime read was 5.
                    for row in y.chunks(8) {
                        assert_eq!(row, &row5[..], "a row from outside the table");
                    }
                    right += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("out of data bounds"), "{e}");
                    refused += 1;
                }
            }
        }
    });
    assert!(flipper.wait().unwrap().success());
    assert!(right + refused > 20, "{right} answers, {refused} refusals");
    eprintln!("{right} right answers, {refused} clear refusals");
    // npud is the same process, and answers.
    let npud = w.npud.as_ref().unwrap();
    assert!(!npud.log_text().contains("panicked"), "{}", npud.log_text());
    run_mlp(&w).ok();
}

/// Flips 8-byte words of a file between 5 and 2^40 for some seconds:
/// `python3 -c FLIPPER PATH LEN SECS`.
const FLIPPER: &str = r#"
import mmap, os, struct, sys, time
path, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, n)
good = struct.pack("<q", 5) * (n // 8)
bad = struct.pack("<q", 1 << 40) * (n // 8)
end = time.time() + secs
while time.time() < end:
    m[0:n] = bad
    m[0:n] = good
"#;

/// Hardening: a caller cannot choose how much npud maps or holds. Inputs at
/// the end of a huge sparse file, from three callers at once, cost npud
/// only their own bytes; the file never grows.
#[test]
fn a_caller_cannot_make_npud_map_or_hold_its_file() {
    let w = world("");
    let pid = w.npud.as_ref().unwrap().pid();
    run_mlp(&w).ok();
    let before = rss_kib(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let far = 1000u64 << 20;
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let mut files = Vec::new();
        for seed in 0..3u64 {
            let file = memfd(SealFlag::F_SEAL_SHRINK);
            let x = seeded_data(16, 20 + seed);
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all_at(&bytes, far).unwrap();
            files.push((file, x));
        }
        let mut calls = Vec::new();
        for (file, _) in &files {
            let refs = one_ref("x", "f32", vec![1, 16], far, 64);
            calls.push(npud.infer_fd("mlp", refs, zbus::zvariant::Fd::from(file.as_fd())));
        }
        let fx = onnx_fixtures();
        for ((file, x), reply) in files.iter().zip(futures_util::future::join_all(calls).await) {
            let (outs, _, _) = pocket_proto::runtime::read_outputs(reply.unwrap()).unwrap();
            let got = json!({"outputs": {"y": {"dtype": "f32", "shape": outs["y"].shape, "data": f32s(&outs["y"].data)}}});
            let want = reference_outputs(
                &fx.join("mlp.onnx"),
                &json!({"x": {"shape": [1, 16], "data": x}}),
            );
            assert_close(&got, &want, 1e-5);
            assert_eq!(file.metadata().unwrap().len(), far + 64, "the file never grows");
        }
        // An input past the end of the file: an error, and still no growth.
        let short = memfd(SealFlag::F_SEAL_SHRINK);
        short.set_len(64).unwrap();
        let err = npud
            .infer_fd(
                "mlp",
                one_ref("x", "f32", vec![1, 16], far, 64),
                zbus::zvariant::Fd::from(short.as_fd()),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("lie outside the file"), "{err}");
        assert_eq!(short.metadata().unwrap().len(), 64);
    });
    let after = rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "npud grew from {before} KiB to {after} KiB"
    );
    // And it maps none of the callers' files, not even untouched.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("memfd:test-tensors"), "{maps}");
}

/// Hardening: one memfd used by two callers for two models at once. Each
/// answer comes in a file of its own, so neither can read the other's
/// outputs being written, and both are right.
#[test]
fn one_tensor_file_for_two_models_at_once_gives_two_right_answers() {
    use std::os::unix::fs::MetadataExt;
    let w = world("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let file = memfd(SealFlag::F_SEAL_SHRINK);
        let x = seeded_data(16, 31);
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        file.write_all_at(&bytes, 0).unwrap();
        for _ in 0..20 {
            let mlp = npud.infer_fd(
                "mlp",
                one_ref("x", "f32", vec![1, 16], 0, 64),
                zbus::zvariant::Fd::from(file.as_fd()),
            );
            let scaled = npud.infer_fd(
                "scaled",
                one_ref("x", "f32", vec![4, 4], 0, 64),
                zbus::zvariant::Fd::from(file.as_fd()),
            );
            let (a, b) = futures_util::future::join(mlp, scaled).await;
            let (a, b) = (a.unwrap(), b.unwrap());
            let ino = |fd: &zbus::zvariant::OwnedFd| {
                let f = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
                f.metadata().unwrap().ino()
            };
            let caller = file.metadata().unwrap().ino();
            assert!(ino(&a.1) != caller && ino(&b.1) != caller && ino(&a.1) != ino(&b.1));
            let (a, _, _) = pocket_proto::runtime::read_outputs(a).unwrap();
            let (b, _, _) = pocket_proto::runtime::read_outputs(b).unwrap();
            let want: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
            assert_eq!(f32s(&b["y"].data), want);
            let want = reference_outputs(
                &onnx_fixtures().join("mlp.onnx"),
                &json!({"x": {"shape": [1, 16], "data": x}}),
            );
            let got = json!({"outputs": {"y": {"dtype": "f32", "shape": a["y"].shape, "data": f32s(&a["y"].data)}}});
            assert_close(&got, &want, 1e-5);
        }
    });
}

/// Hardening: npud has no second D-Bus implementation to attack: there is
/// no private channel, every call comes through dbus-daemon and its limits
/// (message size, unfinished messages, descriptors per message,
/// connections per user). Descriptors sent with calls npud refuses are
/// closed, and Load keeps working for everyone.
#[test]
fn npud_serves_only_the_bus_and_closes_what_callers_send() {
    let w = world("");
    let pid = w.npud.as_ref().unwrap().pid();
    run_mlp(&w).ok();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = open_fds(pid);
    rt.block_on(async {
        let conn = w.bus.connect().await;
        use pocket_proto::runtime::{BUS_NAME, INTERFACE, PATH};
        let reply = conn
            .call_method(Some(BUS_NAME), PATH, Some(INTERFACE), "OpenChannel", &())
            .await;
        let err = reply.unwrap_err().to_string();
        assert!(err.contains("UnknownMethod"), "OpenChannel is gone: {err}");
        // 64 calls with 16 descriptors each, in bodies npud refuses.
        let memfds: Vec<std::fs::File> = (0..16).map(|_| memfd(SealFlag::empty())).collect();
        for _ in 0..64 {
            let fds: Vec<zbus::zvariant::Fd<'_>> = memfds
                .iter()
                .map(|f| zbus::zvariant::Fd::from(f.as_fd()))
                .collect();
            let reply = conn
                .call_method(Some(BUS_NAME), PATH, Some(INTERFACE), "InferFd", &(fds,))
                .await;
            let err = reply.unwrap_err().to_string();
            assert!(err.contains("Signature mismatch"), "{err}");
        }
    });
    // The reply to a refused call can reach the caller before npud has
    // dropped that call's message and the descriptors in it: a loaded
    // machine is given a few seconds for them to be closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = open_fds(pid);
    while after > before + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = open_fds(pid);
    }
    assert!(
        after <= before + 2,
        "npud holds {after} descriptors, {before} before"
    );
    w.ctl(&["runtime", "unload", "mlp"]).ok();
    w.ctl(&["runtime", "load", "mlp"]).ok();
    run_mlp(&w).ok();
}

/// A model input of a type npud cannot carry (a string) is reported as
/// `unsupported`; a caller naming that type for it gets a clear error, and
/// npud keeps serving. (Before, the size lookup behind the type check
/// panicked: found by the `tensor_request` fuzz target.)
#[test]
fn an_input_of_a_type_npud_cannot_carry_is_refused_not_a_crash() {
    let w = world("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npu = pocket_proto::runtime::Runtime1Proxy::new(&conn)
            .await
            .unwrap();
        npu.load("named", "").await.unwrap();
        let loaded = npu.loaded().await.unwrap();
        let spec = loaded.iter().find(|m| m.name == "named").unwrap();
        assert_eq!(spec.inputs[0].dtype, "unsupported", "{spec:?}");
        for _ in 0..3 {
            let inputs = HashMap::from([(
                "names".to_string(),
                pocket_proto::runtime::Tensor {
                    dtype: "unsupported".into(),
                    shape: vec![1],
                    data: vec![0; 8],
                },
            )]);
            let e = tokio::time::timeout(Duration::from_secs(10), npu.infer("named", inputs))
                .await
                .expect("npud answers")
                .unwrap_err();
            assert!(
                e.to_string()
                    .contains("inputs of type unsupported cannot be given"),
                "{e}"
            );
        }
    });
    run_mlp(&w).ok();
}
