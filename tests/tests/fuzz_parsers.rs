//! Every fuzz target (`crates/pocket-fuzz`) on stable, as a bounded random
//! test: real inputs (a signed pack, bundle, catalog and keyring, tensor
//! descriptors in wire format, bootloader environments, request bodies)
//! mutated at random, every target at once on its own thread.
//! `POCKET_FUZZ_SECS` sets how long (default 2; `just test`, and so CI,
//! gives 60). `just fuzz` runs the same targets under libFuzzer, starting
//! from the seeds this test leaves in `target/fuzz-seeds/<target>/`; a
//! failing input is saved in `target/fuzz-failures/`.

use pocket_fuzz::{Target, KEY_SEEDS, TARGETS};
use pocket_otad::bootenv::{grub, uboot, Vars};
use pocket_proto::runtime::TensorRef;
use pocket_tests::*;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Real inputs for each target, signed with the targets' fixed keys where
/// they verify signatures.
fn seeds(dir: &Path) -> HashMap<&'static str, Vec<Vec<u8>>> {
    let keys: Vec<PathBuf> = KEY_SEEDS
        .iter()
        .map(|s| {
            pocket_trust::SecretKey::from_seed(*s)
                .save(&dir.join("keys"))
                .unwrap()
                .0
        })
        .collect();
    let p = Publisher::new(&dir.join("publisher"));
    let packs = dir.join("packs");
    std::fs::create_dir_all(&packs).unwrap();
    let onnx = onnx_fixtures().join("mlp.onnx");
    let pack = packs.join("mlp.pack");
    p.pack_with(
        "mlp",
        "1.0",
        &[("mlp.onnx", &onnx)],
        &keys[1..2],
        None,
        &pack,
    );
    let site = dir.join("site");
    p.catalog_with(&packs, &site, "1", "30d", &keys[1..2]);
    let ring = dir.join("ring");
    pocket_publish::keyring_create(
        &[
            (
                pocket_trust::Role::Root,
                vec![keys[0].with_extension("pub")],
            ),
            (
                pocket_trust::Role::Models,
                vec![keys[1].with_extension("pub")],
            ),
            (
                pocket_trust::Role::Updates,
                vec![keys[2].with_extension("pub")],
            ),
        ],
        &[],
        &keys[0..1],
        "2",
        &ring,
    )
    .unwrap();
    let bundle = p
        .bundle_with(
            &dir.join("bundle"),
            "2.0",
            64 << 10,
            COMPATIBLE,
            1,
            4096,
            &keys[2..3],
            None,
        )
        .bundle;
    let bundle = std::fs::read(bundle).unwrap();
    let header = {
        let mut r = bundle.as_slice();
        pocket_ota::read_header(&mut r).unwrap()
    };
    let manifest = pocket_trust::Envelope::from_bytes("seed", &header)
        .unwrap()
        .peek::<serde_json::Value>()
        .unwrap()
        .body;
    let pack = std::fs::read(pack).unwrap();

    let tensors = |entries: &[(&str, &str, &[i64], u64, u64)], size: u64| {
        let map: HashMap<String, TensorRef> = entries
            .iter()
            .map(|(n, dtype, shape, offset, len)| {
                let r = TensorRef {
                    dtype: dtype.to_string(),
                    shape: shape.to_vec(),
                    offset: *offset,
                    len: *len,
                };
                (n.to_string(), r)
            })
            .collect();
        let ctxt = zbus::zvariant::serialized::Context::new_dbus(zbus::zvariant::LE, 0);
        zbus::zvariant::to_bytes(ctxt, &(map, size))
            .unwrap()
            .to_vec()
    };
    let vars: Vars = [
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "0"),
        ("BOOT_LAST_GOOD", "A"),
        ("bootcmd", "run pocketos_boot"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let grub_vars: Vars = [
        ("ORDER", "A B"),
        ("A_OK", "1"),
        ("A_TRY", "0"),
        ("LAST_GOOD", "A"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let bodies = [
        r#"{"model":"smollm2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":16,"stop":["\n"],"response_format":{"type":"json_object"}}"#,
        r#"{"model":"smollm2","prompt":["Once"],"max_tokens":8,"temperature":0.5,"seed":7}"#,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi","images":[]}],"options":{"num_predict":8,"top_k":40},"keep_alive":"5m","format":"json"}"#,
        r#"{"model":"smollm2","prompt":"Hi","system":"Be brief.","raw":false,"stream":false}"#,
        r#"{"password":"a long password","setup_code":"ABCD-EFGH"}"#,
        r#"{"model":"smollm2","insecure":false,"stream":true}"#,
    ];
    // npud's `Generate` requests: chats (with the template's special
    // tokens in the text), raw prompts, sampling, stops and output schemas.
    let generate = [
        r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4."},{"role":"user","content":"<|im_start|>And 3+3?"}],"temperature":0,"max_tokens":16,"stop":["\n","}"],"num_ctx":512}"#,
        r#"{"prompt":"Once upon a time 1234567 日本語 👩‍👩‍👧","raw":true,"temperature":1.0,"top_k":40,"top_p":0.95,"min_p":0.05,"seed":7,"repetition_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":0.5}"#,
        r#"{"prompt":"List colours.","response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object","properties":{"name":{"type":"string","maxLength":8},"n":{"type":"integer","minimum":0,"maximum":9},"tags":{"type":"array","items":{"enum":["a","b"]}}},"required":["name","n"],"additionalProperties":false}}}}"#,
        r#"{"messages":[{"role":"user","content":"Hi"}],"response_format":{"type":"json_object"}}"#,
    ];
    HashMap::from([
        (
            "pack",
            vec![pack.clone(), pack[..pack.len().min(4096)].to_vec()],
        ),
        (
            "bundle",
            vec![
                bundle[..bundle.len().min(64 << 10)].to_vec(),
                serde_json::to_vec(&manifest).unwrap(),
            ],
        ),
        (
            "envelope",
            vec![
                std::fs::read(site.join("catalog.json")).unwrap(),
                std::fs::read(ring.join("keyring.json")).unwrap(),
                header.clone(),
            ],
        ),
        (
            "tensor_request",
            vec![
                tensors(
                    &[
                        ("x", "f32", &[2, 4], 0, 32),
                        ("indices", "i64", &[3], 64, 24),
                    ],
                    4096,
                ),
                tensors(&[("x", "f32", &[1, 4], 4080, 16)], 4096),
                tensors(&[("names", "unsupported", &[1], 0, 8)], 4096),
            ],
        ),
        (
            "uboot_env",
            vec![
                uboot::encode_copy(&vars, 1, 8192).unwrap(),
                uboot::encode_single(&vars, 4096).unwrap(),
            ],
        ),
        ("grub_env", vec![grub::encode(&grub_vars).unwrap()]),
        (
            "webd_body",
            bodies.iter().map(|b| b.as_bytes().to_vec()).collect(),
        ),
        (
            "generate_request",
            generate.iter().map(|b| b.as_bytes().to_vec()).collect(),
        ),
    ])
}

/// One random change: a bit, a byte, a run removed, repeated or inserted,
/// a cut, or a piece of another seed spliced in.
fn mutate(rng: &mut rand::rngs::StdRng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = input.len();
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = *[0u8, 0xff, b'"', b'{', b'9', 0x80, b'\0']
                .get(rng.random_range(0..7))
                .unwrap();
        }
        2 if len > 0 => {
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=16)).min(len);
            input.drain(a..b);
        }
        3 if len > 0 => {
            let a = rng.random_range(0..len);
            let b = (a + rng.random_range(1..=64)).min(len);
            let run = input[a..b].to_vec();
            input.splice(a..a, run);
        }
        4 => {
            let at = rng.random_range(0..=len);
            let mut extra = vec![0u8; rng.random_range(1..=8)];
            rng.fill_bytes(&mut extra);
            input.splice(at..at, extra);
        }
        5 if len > 0 => input.truncate(rng.random_range(0..len)),
        _ => {
            let other = &others[rng.random_range(0..others.len())];
            if !other.is_empty() && len > 0 {
                let a = rng.random_range(0..other.len());
                let b = (a + rng.random_range(1..=32)).min(other.len());
                let at = rng.random_range(0..len);
                input.splice(at..at, other[a..b].iter().copied());
            }
        }
    }
}

/// Runs `target` on `input`; on a panic, saves the input and fails with
/// where it is.
fn run_one(target: &Target, input: &[u8], failures: &Path) {
    let run = target.run;
    if std::panic::catch_unwind(|| run(input)).is_err() {
        std::fs::create_dir_all(failures).unwrap();
        let path = failures.join(format!(
            "{}-{}",
            target.name,
            pocket_trust::sha256_hex(input)
        ));
        std::fs::write(&path, input).unwrap();
        panic!("fuzz target {} failed on {}", target.name, path.display());
    }
}

#[test]
fn every_parser_survives_mutated_real_inputs() {
    let secs: u64 = std::env::var("POCKET_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let tmp = tempfile::tempdir().unwrap();
    let seeds = seeds(tmp.path());
    // `generate_request` reads the tiny LLM fixture where it is built.
    assert_eq!(
        llm_folder("tiny-int4"),
        workspace_root().join("target/llm/tiny-int4")
    );
    let out = workspace_root().join("target/fuzz-seeds");
    let failures = workspace_root().join("target/fuzz-failures");
    for target in TARGETS {
        let dir = out.join(target.name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds[target.name].iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
    // Every target at once, each on its own thread for `secs` seconds: the
    // machine's cores share them, and the whole run takes `secs`.
    std::thread::scope(|scope| {
        for (n, target) in TARGETS.iter().enumerate() {
            let (inputs, failures) = (&seeds[target.name], &failures);
            scope.spawn(move || fuzz(target, inputs, failures, secs, n as u64));
        }
    });
}

/// Runs `target` on its seeds, then on mutations of them for `secs`
/// seconds, then on pure noise.
fn fuzz(target: &Target, inputs: &[Vec<u8>], failures: &Path, secs: u64, stream: u64) {
    for s in inputs {
        run_one(target, s, failures);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed + stream);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let mut input = inputs[rng.random_range(0..inputs.len())].clone();
        for _ in 0..rng.random_range(1..=8) {
            mutate(&mut rng, &mut input, inputs);
        }
        run_one(target, &input, failures);
        runs += 1;
    }
    // Pure noise too.
    for n in [0usize, 1, 7, 64, 4096] {
        let mut noise = vec![0u8; n];
        rng.fill_bytes(&mut noise);
        run_one(target, &noise, failures);
    }
    assert!(runs > 0);
    eprintln!("{}: {runs} mutated inputs in {secs} s", target.name);
}
