//! npud with the real ONNX Runtime library, models installed by the real
//! modeld, and the real pocketctl: outputs match the onnxruntime Python
//! reference, and every failure is a clear error from a daemon that stays up.

use pocket_tests::*;
use serde_json::{json, Value};

/// A world with mlp, attention, wide and typed installed, and npud running
/// with `npud_extra` config.
fn world(npud_extra: &str) -> World {
    let mut w = World::start();
    let fx = onnx_fixtures();
    for m in ["wide", "typed", "scaled", "doubled"] {
        w.publisher.pack(
            &w.packs,
            m,
            "1.0",
            &[(&format!("{m}.onnx"), &fx.join(format!("{m}.onnx")))],
        );
    }
    w.republish(&w.packs.clone(), "2");
    w.start_modeld();
    for m in ["mlp", "attention", "wide", "typed", "scaled", "doubled"] {
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
    let w = world("providers = [\"qnn\"]\nallow_cpu_fallback = false");
    let refused = w.ctl(&["runtime", "load", "mlp"]);
    refused.fails_with(
        "execution provider qnn is not available on this device (ONNX Runtime offers: ",
    );
    refused.fails_with("cpu); CPU fallback is not allowed (ProviderUnavailable)");
    run_mlp(&w).fails_with("(ProviderUnavailable)");
    w.ctl(&["runtime", "providers"]).ok();
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
        let file = tempfile::tempfile().unwrap();
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
                shape: vec![1, i64::MAX],
                data: vec![],
            },
        )]);
        assert!(npud.infer("wide", huge).await.is_err());
    });
    run_mlp(&w).ok();
}

#[test]
fn a_private_channel_serves_the_same_runtime_until_the_client_closes_it() {
    use pocket_proto::runtime::{open_channel, Runtime1Proxy, Tensor};
    let w = world("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let channel = open_channel(&npud).await.expect("OpenChannel");
        let bytes: Vec<u8> = seeded_data(16, 7)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let inputs = std::collections::HashMap::from([(
            "x".to_string(),
            Tensor {
                dtype: "f32".into(),
                shape: vec![1, 16],
                data: bytes,
            },
        )]);
        // The same answers as over the bus, for a model the channel loads
        // itself (asking modeld on the bus where it is).
        let (on_channel, provider, _) = channel.infer("mlp", inputs.clone()).await.unwrap();
        let (on_bus, _, _) = npud.infer("mlp", inputs).await.unwrap();
        assert_eq!(provider, "cpu");
        assert_eq!(on_channel["y"].data, on_bus["y"].data);
        assert_eq!(on_channel["y"].shape, on_bus["y"].shape);
        let loaded: Vec<String> = channel
            .loaded()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(loaded, ["mlp"]);
        assert_eq!(channel.status().await.unwrap(), "ok");
        let err = channel
            .infer("no-such-model", Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-model"), "{err}");

        // At most MAX_CHANNELS at once; closing them gives the room back.
        let mut open = vec![channel];
        let refused = loop {
            match open_channel(&npud).await {
                Ok(c) => open.push(c),
                Err(e) => break e.to_string(),
            }
            assert!(open.len() <= 64, "more than 64 channels open");
        };
        assert_eq!(open.len(), 64);
        assert!(refused.contains("close one first"), "{refused}");
        for c in open.drain(..) {
            c.inner().connection().clone().close().await.unwrap();
        }
        let start = std::time::Instant::now();
        let again = loop {
            if let Ok(c) = open_channel(&npud).await {
                break c;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(again.status().await.unwrap(), "ok");
    });
    // And npud still answers on the bus.
    run_mlp(&w).ok();
}

#[test]
fn a_blocking_channel_gives_the_bus_answers_and_errors() {
    use pocket_proto::runtime::{Channel, Runtime1Proxy, TensorFile};
    use std::borrow::Cow;
    let w = world("");
    let fx = onnx_fixtures();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let npud = rt.block_on(async {
        let conn = w.bus.connect().await;
        Runtime1Proxy::new(&conn).await.unwrap()
    });
    // Opened through the bus; every call after that is plain blocking I/O
    // on this thread.
    let mut channel = rt.block_on(Channel::open(&npud)).expect("OpenChannel");
    let x = seeded_data(16, 11);
    let inputs = std::collections::HashMap::from([("x".to_string(), f32_tensor(&x, vec![1, 16]))]);
    for _ in 0..3 {
        let (on_channel, provider, latency) = channel.infer("mlp", &inputs).unwrap();
        let (on_bus, _, _) = rt.block_on(npud.infer("mlp", inputs.clone())).unwrap();
        assert_eq!(provider, "cpu");
        assert!(latency > 0.0);
        assert_eq!(on_channel, on_bus);
    }
    let want = reference_outputs(
        &fx.join("mlp.onnx"),
        &json!({"x": {"shape": [1, 16], "data": x}}),
    );
    let (outs, _, _) = channel.infer("mlp", &inputs).unwrap();
    let got = json!({"outputs": {"y": {"dtype": outs["y"].dtype, "shape": outs["y"].shape, "data": f32s(&outs["y"].data)}}});
    assert_close(&got, &want, 1e-5);

    // npud's errors arrive with their names and messages, and the channel
    // goes on answering.
    let error = |e: zbus::Error| match e {
        zbus::Error::MethodError(name, text, _) => (name.to_string(), text.unwrap_or_default()),
        other => panic!("not an error reply: {other}"),
    };
    let (name, text) = error(channel.infer("no-such-model", &inputs).unwrap_err());
    assert_eq!(name, "org.pocketos.Error.NotFound");
    assert!(text.contains("no-such-model"), "{text}");
    let wrong =
        std::collections::HashMap::from([("nope".to_string(), f32_tensor(&x, vec![1, 16]))]);
    let (name, text) = error(channel.infer("mlp", &wrong).unwrap_err());
    assert_eq!(name, "org.pocketos.Error.InvalidArgument");
    assert!(text.contains("\"nope\""), "{text}");

    // A tensor file on the same channel: the descriptor goes with the call,
    // ONNX Runtime writes the output into the file, read there.
    let mut file = TensorFile::new().unwrap();
    for rows in [5i64, 300, 2] {
        let x = seeded_data(rows as usize * 4, 60 + rows as u64);
        let t = f32_tensor(&x, vec![rows, 4]);
        let ran = file.run_on(&mut channel, "scaled", &[("x", &t)]).unwrap();
        let y = &ran.outputs["y"];
        assert!(matches!(y.data, Cow::Borrowed(_)), "read in place");
        let got =
            json!({"outputs": {"y": {"dtype": y.dtype, "shape": y.shape, "data": f32s(&y.data)}}});
        let want = reference_outputs(
            &fx.join("scaled.onnx"),
            &json!({"x": {"shape": [rows, 4], "data": x}}),
        );
        assert_close(&got, &want, 1e-5);
    }
    let (outs, _, _) = channel.infer("mlp", &inputs).unwrap();
    assert_eq!(outs, channel.infer("mlp", &inputs).unwrap().0);
    drop(channel);

    // A second channel, called the wrong way by hand: each call gets an
    // error reply, and the channel goes on. Calls other than Infer and
    // InferFd are answered by npud's object server behind the channel.
    use pocket_proto::runtime::{INTERFACE, PATH};
    let fd: std::os::fd::OwnedFd = rt.block_on(npud.open_channel()).unwrap().into();
    let mut peer =
        pocket_proto::peer::PeerClient::handshake(std::os::unix::net::UnixStream::from(fd))
            .unwrap();
    let mismatched = peer.call::<_, (String,)>(PATH, INTERFACE, "Infer", &("mlp", 7u32));
    let (name, text) = error(mismatched.unwrap_err());
    assert_eq!(name, "org.freedesktop.DBus.Error.InvalidArgs");
    assert!(text.contains("Infer"), "{text}");
    let unknown = peer.call::<_, ()>(PATH, INTERFACE, "NoSuchMethod", &());
    let (name, _) = error(unknown.unwrap_err());
    assert_eq!(name, "org.freedesktop.DBus.Error.UnknownMethod");
    // Calls that expect no reply get none, and hold nothing up.
    for (path, iface, member) in [
        (PATH, "org.freedesktop.DBus.Peer", "Ping"),
        (PATH, INTERFACE, "NoSuchMethod"),
    ] {
        let quiet = zbus::Message::method_call(path, member)
            .unwrap()
            .interface(iface)
            .unwrap()
            .with_flags(zbus::message::Flags::NoReplyExpected)
            .unwrap()
            .build(&())
            .unwrap();
        peer.send(&quiet).unwrap();
    }
    let status: zbus::zvariant::OwnedValue = peer
        .call(
            PATH,
            "org.freedesktop.DBus.Properties",
            "Get",
            &(INTERFACE, "Status"),
        )
        .unwrap();
    assert_eq!(String::try_from(status).unwrap(), "ok");
    let (outs, provider, _): pocket_proto::runtime::InferReply = peer
        .call(PATH, INTERFACE, "Infer", &("mlp", &inputs))
        .unwrap();
    assert_eq!(provider, "cpu");
    assert_eq!(
        outs,
        rt.block_on(npud.infer("mlp", inputs.clone())).unwrap().0
    );
    drop(peer);
    run_mlp(&w).ok();
}

#[test]
fn pocketctl_repeats_a_run_on_a_private_channel_as_any_user() {
    let w = world("");
    let inputs = json!({"x": {"shape": [1, 16], "data": seeded_data(16, 9)}});
    let want = reference_outputs(&onnx_fixtures().join("mlp.onnx"), &inputs);
    // Not npud's user: the channel's handshake checks the caller of
    // OpenChannel, not the socket pair's creator.
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

#[test]
fn a_sealed_tensor_file_is_read_in_place_and_gets_the_outputs_back() {
    use pocket_proto::runtime::{Runtime1Proxy, TensorRef};
    use std::collections::HashMap;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::{FileExt, MetadataExt};

    let w = world("");
    let fx = onnx_fixtures();
    let inode = |f: &std::fs::File| f.metadata().unwrap().ino();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let sealed = sealed_memfd();
        let unsealed = tempfile::tempfile().unwrap();
        // Aligned (read in place) and one byte off (copied), sealed and
        // not: every answer matches the reference.
        for (seed, file, offset) in [
            (11, &sealed, 0u64),
            (12, &sealed, 1),
            (13, &sealed, 0),
            (14, &unsealed, 0),
        ] {
            let x = seeded_data(16, seed);
            let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all_at(&bytes, offset).unwrap();
            let refs = HashMap::from([(
                "x".to_string(),
                TensorRef {
                    dtype: "f32".into(),
                    shape: vec![1, 16],
                    offset,
                    len: 64,
                },
            )]);
            let (outs, fd, _, _) = npud
                .infer_fd("mlp", refs, zbus::zvariant::Fd::from(file.as_fd()))
                .await
                .unwrap();
            let out = std::fs::File::from(OwnedFd::from(fd));
            // The sealed file comes back with the outputs in it, past the
            // inputs; any other file gets a new one.
            assert_eq!(inode(&out) == inode(file), std::ptr::eq(file, &sealed));
            let y = &outs["y"];
            if std::ptr::eq(file, &sealed) {
                assert!(y.offset >= offset + 64 && y.offset % 64 == 0, "{y:?}");
            }
            let mut buf = vec![0u8; y.len as usize];
            out.read_exact_at(&mut buf, y.offset).unwrap();
            let got: Vec<f64> = buf
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            let got = serde_json::json!({"outputs": {"y": {"dtype": "f32", "shape": y.shape, "data": got}}});
            let want = reference_outputs(
                &fx.join("mlp.onnx"),
                &serde_json::json!({"x": {"shape": [1, 16], "data": x}}),
            );
            assert_close(&got, &want, 1e-5);
        }
        // Bytes outside the sealed file: a clear error, not a crash.
        let refs = HashMap::from([(
            "x".to_string(),
            TensorRef {
                dtype: "f32".into(),
                shape: vec![1, 16],
                offset: 1 << 30,
                len: 64,
            },
        )]);
        let err = npud
            .infer_fd("mlp", refs, zbus::zvariant::Fd::from(sealed.as_fd()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("lie outside the file"), "{err}");
    });
    run_mlp(&w).ok();
}

/// A memfd sealed against shrinking: a tensor file npud maps.
fn sealed_memfd() -> std::fs::File {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::os::fd::AsRawFd;
    let file = std::fs::File::from(
        memfd_create(
            c"test-tensors",
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap(),
    );
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK),
    )
    .unwrap();
    file
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
fn a_tensor_file_gets_its_outputs_written_in_place() {
    use pocket_proto::runtime::{open_channel, Runtime1Proxy, TensorFile};
    use std::borrow::Cow;
    let w = world("");
    let fx = onnx_fixtures();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let bus = Runtime1Proxy::new(&conn).await.unwrap();
        let channel = open_channel(&bus).await.unwrap();
        let mut file = TensorFile::new().unwrap();
        // `scaled` (y[rows,4] = 3x): the output's shape follows from the
        // input's named dimension, so ONNX Runtime writes it into the file
        // and the client reads it there. The file grows and is mapped again
        // as the rows change; bus and channel alike.
        for (rows, npud) in [(5i64, &channel), (2, &bus), (300, &channel), (7, &bus)] {
            let x = seeded_data(rows as usize * 4, rows as u64);
            let t = f32_tensor(&x, vec![rows, 4]);
            let ran = file.run(npud, "scaled", &[("x", &t)]).await.unwrap();
            let y = &ran.outputs["y"];
            assert!(matches!(y.data, Cow::Borrowed(_)), "read in place");
            let got = json!({"outputs": {"y": {"dtype": y.dtype, "shape": y.shape, "data": f32s(&y.data)}}});
            let want = reference_outputs(
                &fx.join("scaled.onnx"),
                &json!({"x": {"shape": [rows, 4], "data": x}}),
            );
            assert_close(&got, &want, 1e-5);
        }
        // `typed`: six outputs of six element types, each in its own slot.
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
        let ran = file.run(&channel, "typed", &refs).await.unwrap();
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
            let y = &ran.outputs[name];
            assert!(matches!(y.data, Cow::Borrowed(_)), "{name} read in place");
            assert_eq!((y.dtype.as_str(), &y.shape[..]), (dtype, &[3i64][..]), "{name}");
            assert_eq!(&y.data[..], &bytes[..], "{name}");
        }
        // `doubled` says y[n] but returns 2n elements: ONNX Runtime refuses
        // to write that into an n-element slot, npud runs it again the
        // usual way (and from then on), and every answer is still right.
        for n in [3i64, 5, 4] {
            let x = seeded_data(n as usize, 40 + n as u64);
            let t = f32_tensor(&x, vec![n]);
            let (outs, _, _) = file.infer(&channel, "doubled", &[("x", &t)]).await.unwrap();
            let y = &outs["y"];
            assert_eq!(y.shape, vec![2 * n]);
            assert_eq!(f32s(&y.data), [x.clone(), x].concat());
        }
    });
    let log = w.npud.as_ref().unwrap().log_text();
    assert_eq!(
        log.matches("outputs are copied from now on").count(),
        1,
        "{log}"
    );
    run_mlp(&w).ok();
}

#[test]
fn a_tensor_file_past_the_request_limit_is_refused_before_it_is_read() {
    use pocket_proto::runtime::{Runtime1Proxy, TensorFile};
    let w = world("max_request_mb = 1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = w.bus.connect().await;
        let npud = Runtime1Proxy::new(&conn).await.unwrap();
        let mut file = TensorFile::new().unwrap();
        // 640 KiB in: fits; its 640 KiB out would not, so npud copies it
        // into the file itself past the inputs (which stay as they were)
        // instead of mapping more.
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let x = seeded_data(40_960 * 4, 3);
        let t = f32_tensor(&x, vec![40_960, 4]);
        let sealed = sealed_memfd();
        sealed.write_all_at(&t.data, 0).unwrap();
        let len = t.data.len() as u64;
        let refs = std::collections::HashMap::from([(
            "x".to_string(),
            pocket_proto::runtime::TensorRef {
                dtype: "f32".into(),
                shape: t.shape.clone(),
                offset: 0,
                len,
            },
        )]);
        let (outs, _, _, _) = npud
            .infer_fd("scaled", refs, zbus::zvariant::Fd::from(sealed.as_fd()))
            .await
            .unwrap();
        let y = &outs["y"];
        assert!(y.offset >= len && y.offset % 64 == 0, "{y:?}");
        let mut got = vec![0u8; y.len as usize];
        sealed.read_exact_at(&mut got, y.offset).unwrap();
        let want: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
        assert_eq!(f32s(&got), want);
        let mut input = vec![0u8; len as usize];
        sealed.read_exact_at(&mut input, 0).unwrap();
        assert_eq!(input, t.data, "the inputs are left as they were");
        // The same through TensorFile.
        let (outs, _, _) = file.infer(&npud, "scaled", &[("x", &t)]).await.unwrap();
        assert_eq!(f32s(&outs["y"].data), want);
        // 1.25 MiB in: refused with the reason, before a byte is mapped.
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
