//! The bodies of PocketOS's fuzz targets: every parser that an
//! unprivileged local user, a LAN peer, a catalog or a USB stick can reach,
//! fed arbitrary bytes. `fuzz/` runs each under cargo-fuzz (libFuzzer, on
//! nightly: `just fuzz`); `tests/tests/fuzz_parsers.rs` runs the same
//! functions on stable as bounded random tests, mutating real inputs.
//!
//! A target returns normally for any input; a panic, an overflow, an
//! allocation beyond the parser's own limits or a broken round trip is a
//! bug.

use pocket_otad::bootenv::{grub, uboot};
use pocket_trust::{Envelope, Keyring, KeyringBody, Role, SecretKey};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::SystemTime;

/// One fuzz target: its name (the file under `fuzz/fuzz_targets/`) and
/// its body.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "pack",
        run: pack,
    },
    Target {
        name: "bundle",
        run: bundle,
    },
    Target {
        name: "envelope",
        run: envelope,
    },
    Target {
        name: "tensor_request",
        run: tensor_request,
    },
    Target {
        name: "uboot_env",
        run: uboot_env,
    },
    Target {
        name: "grub_env",
        run: grub_env,
    },
    Target {
        name: "webd_body",
        run: webd_body,
    },
    Target {
        name: "generate_request",
        run: generate_request,
    },
];

/// The key seeds of [`keyring`]: root, models, updates.
pub const KEY_SEEDS: [[u8; 32]; 3] = [[1; 32], [2; 32], [3; 32]];

/// A fixed keyring for the targets that verify signatures (the seeds'
/// keys): random bytes are refused by it, and inputs signed with those
/// keys (the test's seeds) get past it to what follows.
pub fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| {
        let [root, models, updates] = KEY_SEEDS.map(SecretKey::from_seed);
        let body = KeyringBody::new(
            &[
                (Role::Root, vec![root.public().clone()]),
                (Role::Models, vec![models.public().clone()]),
                (Role::Updates, vec![updates.public().clone()]),
            ],
            &BTreeMap::new(),
        )
        .expect("a keyring body");
        let env = Keyring::create(body, "1".parse().expect("a version"), &[root])
            .expect("a signed keyring");
        Keyring::anchor(env).expect("self-signed")
    })
}

/// A model pack as modeld reads one from a USB stick or a download:
/// prefix, header (signed manifest) and files; and a manifest's own
/// checks on a body that got past the signature.
pub fn pack(data: &[u8]) {
    let _ = pocket_models::read_pack(keyring(), data, SystemTime::now(), |_, _| Ok(()));
    if let Ok(m) = serde_json::from_slice::<pocket_models::PackManifest>(data) {
        if m.validate().is_ok() {
            let _ = (m.size_bytes(), m.memory_needed());
        }
    }
}

/// An update bundle's prefix and header as otad reads them, and a
/// manifest's checks and span arithmetic on a body past the signature.
pub fn bundle(data: &[u8]) {
    let mut reader = data;
    if let Ok(header) = pocket_ota::read_header(&mut reader) {
        if let Ok(vh) = pocket_ota::VerifiedHeader::verify(keyring(), &header, SystemTime::now()) {
            let _ = vh.check_compatible("pocketos-fuzz");
            let _ = vh.manifest().spans(vh.header_len);
        }
    }
    if let Ok(m) = serde_json::from_slice::<pocket_ota::BundleManifest>(data) {
        if m.validate().is_ok() {
            let header_len = 4096;
            let spans = m.spans(header_len);
            assert_eq!(spans.len(), m.payloads.len());
            let _ = (m.bundle_len(header_len), m.total_bytes());
            for p in &m.payloads {
                let _ = m.chunk_len(p, 0);
            }
        }
    }
}

/// Catalog and keyring envelopes as modeld and otad read them from a
/// catalog source or a USB stick: parsed, anchored, offered as a
/// rotation, verified as a catalog; and a catalog body's entry checks.
pub fn envelope(data: &[u8]) {
    let now = SystemTime::now();
    if let Ok(env) = Envelope::from_bytes("fuzz", data) {
        let _ = env.peek::<serde_json::Value>();
        let _ = Keyring::anchor(env.clone());
        let _ = keyring().rotate(env.clone());
        let _ = pocket_models::Catalog::verify(keyring(), &env, now);
    }
    if let Ok(c) = serde_json::from_slice::<pocket_models::Catalog>(data) {
        for e in &c.models {
            let _ = pocket_models::validate_name(&e.name);
            let _ = pocket_models::validate_path(&e.pack.path);
            let _ = e.memory_needed();
        }
    }
}

/// An `InferFd` request as npud checks it before reading a byte of the
/// caller's file: the tensor descriptors and the file's size (which the
/// caller chooses too) in D-Bus wire format (little endian, as the bus
/// delivers them), against a model with a float input of dynamic batch,
/// a Gather's index input and an input of a type npud cannot carry.
pub fn tensor_request(data: &[u8]) {
    use pocket_proto::runtime::{TensorRef, TensorSpec};
    let ctxt = zbus::zvariant::serialized::Context::new_dbus(zbus::zvariant::LE, 0);
    let bytes = zbus::zvariant::serialized::Data::new(data, ctxt);
    let Ok(((inputs, file_size), _)) = bytes.deserialize::<(HashMap<String, TensorRef>, u64)>()
    else {
        return;
    };
    let specs = [
        TensorSpec {
            name: "x".into(),
            dtype: "f32".into(),
            shape: vec![-1, 4],
        },
        TensorSpec {
            name: "indices".into(),
            dtype: "i64".into(),
            shape: vec![-1],
        },
        TensorSpec {
            name: "names".into(),
            dtype: "unsupported".into(),
            shape: vec![1],
        },
    ];
    let limit = 64 << 20;
    if let Ok(total) =
        pocket_npud::tensor::check_requests("fuzz", &specs, &inputs, file_size, limit)
    {
        assert!(total <= limit);
        for r in inputs.values() {
            assert!(
                r.offset
                    .checked_add(r.len)
                    .is_some_and(|end| end <= file_size),
                "{r:?} passed outside a file of {file_size} bytes"
            );
        }
    }
}

/// U-Boot environment copies as otad reads them from the boot medium
/// (redundant and single layouts): what decodes encodes back to an
/// environment that decodes the same.
pub fn uboot_env(data: &[u8]) {
    if let Some((flags, vars)) = uboot::decode_copy(data) {
        if let Ok(again) = uboot::encode_copy(&vars, flags, data.len()) {
            assert_eq!(uboot::decode_copy(&again), Some((flags, vars)));
        }
    }
    if let Some(vars) = uboot::decode_single(data) {
        if let Ok(again) = uboot::encode_single(&vars, data.len()) {
            assert_eq!(uboot::decode_single(&again), Some(vars));
        }
    }
}

/// A GRUB environment block as otad reads it from the ESP: what decodes
/// encodes back to a block that decodes the same.
pub fn grub_env(data: &[u8]) {
    if let Some(vars) = grub::decode(data) {
        if let Ok(again) = grub::encode(&vars) {
            assert_eq!(grub::decode(&again), Some(vars));
        }
    }
}

/// A request body as webd's page and LLM API parse it, up to the request
/// it would make of npud.
pub fn webd_body(data: &[u8]) {
    pocket_webd::parse_request_bodies(data);
}

/// A `Generate` request as any local user may send npud one, up to the
/// tokens and the output constraint it would run with, on the tiny fixture
/// model's tokenizer and chat template: what passes has a prompt, all in
/// the model's vocabulary.
pub fn generate_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((req, _)) = pocket_npud::interface::read_request(text) else {
        return;
    };
    let llm = tiny_llm();
    if let Ok((prompt, _)) = pocket_npud::interface::prompt(llm, &req) {
        let vocab = llm.shape.vocab_size;
        assert!(!prompt.is_empty());
        assert!(prompt.iter().all(|&t| (t as usize) < vocab), "{prompt:?}");
    }
}

/// The tiny fixture LLM's folder `target/llm/tiny-int4` read as npud
/// reads it (`models/llm/fixtures.sh target/llm` makes it; `just test`
/// does).
fn tiny_llm() -> &'static pocket_npud::llm::Llm {
    static LLM: OnceLock<pocket_npud::llm::Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/llm/tiny-int4");
        pocket_npud::llm::Llm::open(&dir).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (models/llm/fixtures.sh target/llm makes it)",
                dir.display()
            )
        })
    })
}
