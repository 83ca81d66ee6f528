use pocket_publish::PackSpec;
use pocket_trust::Role;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// The seeded ONNX fixture models (`models/fixtures/gen_fixtures.py`),
/// generated once per test binary. Returns their directory.
pub fn onnx_fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pocket-fixtures-{}", std::process::id()));
        let status = Command::new("python3")
            .arg(crate::workspace_root().join("models/fixtures/gen_fixtures.py"))
            .arg(&dir)
            .status()
            .expect("python3 is installed");
        assert!(
            status.success(),
            "fixture generation failed (pip install onnx numpy)"
        );
        dir
    })
    .clone()
}

/// A file of `size` pseudo-random bytes from `seed`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut left = size;
    let mut buf = Vec::with_capacity(1 << 16);
    while left > 0 {
        buf.clear();
        while buf.len() < (1 << 16) && (buf.len() as u64) < left {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(left.min(buf.len() as u64) as usize);
        std::io::Write::write_all(&mut out, &buf).expect("write");
        left -= buf.len() as u64;
    }
}

/// A publisher: its keys, a keyring trusting them, and helpers to sign
/// packs and catalogs with the real `pocket-publish` code.
#[derive(Debug)]
pub struct Publisher {
    pub dir: PathBuf,
    pub root_key: PathBuf,
    pub models_key: PathBuf,
    pub updates_key: PathBuf,
    pub keyring_dir: PathBuf,
}

fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    pocket_trust::SecretKey::generate()
        .save(dir)
        .expect("save key")
}

impl Publisher {
    /// Fresh keys and a keyring with one key per role.
    pub fn new(dir: &Path) -> Publisher {
        let keys = dir.join("keys");
        let (root_key, root_pub) = keygen(&keys);
        let (models_key, models_pub) = keygen(&keys);
        let (updates_key, updates_pub) = keygen(&keys);
        let keyring_dir = dir.join("keyring");
        pocket_publish::keyring_create(
            &[
                (Role::Root, vec![root_pub]),
                (Role::Models, vec![models_pub]),
                (Role::Updates, vec![updates_pub]),
            ],
            &[],
            std::slice::from_ref(&root_key),
            "1",
            &keyring_dir,
        )
        .expect("keyring");
        Publisher {
            dir: dir.to_path_buf(),
            root_key,
            models_key,
            updates_key,
            keyring_dir,
        }
    }

    /// The publisher of an existing key directory: `root/`, `models/` and
    /// `updates/` with one `pocket-publish keygen` secret key each, and the
    /// `keyring/` they make (what `image/build.sh` writes).
    pub fn open(dir: &Path) -> Publisher {
        let secret = |role: &str| {
            std::fs::read_dir(dir.join(role))
                .unwrap_or_else(|e| panic!("{}/{role}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "secret"))
                .unwrap_or_else(|| panic!("no secret key in {}/{role}", dir.display()))
        };
        Publisher {
            dir: dir.to_path_buf(),
            root_key: secret("root"),
            models_key: secret("models"),
            updates_key: secret("updates"),
            keyring_dir: dir.join("keyring"),
        }
    }

    /// A new key pair in this publisher's key directory: (secret, public).
    pub fn new_key(&self) -> (PathBuf, PathBuf) {
        keygen(&self.dir.join("keys"))
    }

    /// Signs a pack of `files` as `name` `version` with `keys`.
    pub fn pack_with(
        &self,
        name: &str,
        version: &str,
        files: &[(&str, &Path)],
        keys: &[PathBuf],
        expires: Option<&str>,
        out: &Path,
    ) {
        let spec = PackSpec {
            name: name.into(),
            version: version.into(),
            description: format!("{name} test model"),
            entry: None,
            memory_bytes: None,
            files: files
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_path_buf()))
                .collect(),
            llm: None,
        };
        pocket_publish::model_pack(&spec, keys, expires, out, SystemTime::now()).expect("pack");
    }

    /// A pack of one file signed by the models key that says it needs
    /// `memory_bytes` when loaded, written into `packs_dir`.
    pub fn pack_needing(
        &self,
        packs_dir: &Path,
        name: &str,
        file: &Path,
        memory_bytes: u64,
    ) -> PathBuf {
        let spec = PackSpec {
            name: name.into(),
            version: "1.0".into(),
            description: String::new(),
            entry: None,
            memory_bytes: Some(memory_bytes),
            files: vec![("model.onnx".into(), file.to_path_buf())],
            llm: None,
        };
        self.sign_spec(packs_dir, &spec)
    }

    /// A pack signed by the models key, written into `packs_dir`.
    pub fn pack(
        &self,
        packs_dir: &Path,
        name: &str,
        version: &str,
        files: &[(&str, &Path)],
    ) -> PathBuf {
        std::fs::create_dir_all(packs_dir).expect("packs dir");
        let out = packs_dir.join(format!("{name}-{version}.pack"));
        self.pack_with(
            name,
            version,
            files,
            std::slice::from_ref(&self.models_key),
            None,
            &out,
        );
        out
    }

    /// A pack of an LLM folder made as `pocket-publish model pack --dir`
    /// makes it (checked, with its shape), signed by the models key,
    /// written into `packs_dir`.
    pub fn pack_folder(&self, packs_dir: &Path, name: &str, folder: &Path) -> PathBuf {
        let spec =
            pocket_publish::folder_spec(name, "1.0", &format!("{name} test LLM"), folder, None)
                .expect("a model folder");
        self.sign_spec(packs_dir, &spec)
    }

    /// A pack of every file in `folder` with no check at all (entry
    /// `model.onnx`): what a careless or hostile publisher could sign.
    pub fn pack_folder_unchecked(&self, packs_dir: &Path, name: &str, folder: &Path) -> PathBuf {
        let spec = PackSpec {
            name: name.into(),
            version: "1.0".into(),
            description: String::new(),
            entry: Some("model.onnx".into()),
            memory_bytes: None,
            files: crate::folder_files(folder),
            llm: None,
        };
        self.sign_spec(packs_dir, &spec)
    }

    fn sign_spec(&self, packs_dir: &Path, spec: &PackSpec) -> PathBuf {
        std::fs::create_dir_all(packs_dir).expect("packs dir");
        let out = packs_dir.join(format!("{}-{}.pack", spec.name, spec.version));
        pocket_publish::model_pack(
            spec,
            std::slice::from_ref(&self.models_key),
            None,
            &out,
            SystemTime::now(),
        )
        .expect("pack");
        out
    }

    /// Signs `out/catalog.json` over the packs in `packs_dir`.
    pub fn catalog_with(
        &self,
        packs_dir: &Path,
        out: &Path,
        version: &str,
        expires: &str,
        keys: &[PathBuf],
    ) {
        pocket_publish::catalog_build(packs_dir, keys, expires, version, out, SystemTime::now())
            .expect("catalog");
    }

    pub fn catalog(&self, packs_dir: &Path, out: &Path, version: &str) {
        self.catalog_with(
            packs_dir,
            out,
            version,
            "30d",
            std::slice::from_ref(&self.models_key),
        );
    }
}

/// A seeded ONNX model whose weights take about `mb` MiB (the fixture
/// script's `big.onnx`), generated once per size. Returns its path.
pub fn onnx_big_fixture(mb: u32) -> PathBuf {
    static DONE: std::sync::Mutex<Vec<(u32, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().expect("fixture lock");
    if let Some((_, p)) = done.iter().find(|(m, _)| *m == mb) {
        return p.clone();
    }
    let dir = std::env::temp_dir().join(format!("pocket-fixtures-{}-big{mb}", std::process::id()));
    let status = Command::new("python3")
        .arg(crate::workspace_root().join("models/fixtures/gen_fixtures.py"))
        .arg(&dir)
        .arg(format!("--big-mb={mb}"))
        .status()
        .expect("python3 is installed");
    assert!(status.success(), "fixture generation failed");
    let p = dir.join("big.onnx");
    done.push((mb, p.clone()));
    p
}

/// The pinned `libonnxruntime.so` for this machine, fetched and checked by
/// `daemons/npud/fetch-onnxruntime.sh` (once; it is cached under target/).
pub fn onnxruntime_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let out = Command::new(crate::workspace_root().join("daemons/npud/fetch-onnxruntime.sh"))
            .output()
            .expect("run fetch-onnxruntime.sh");
        assert!(
            out.status.success(),
            "fetch-onnxruntime.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// Runs `models/fixtures/reference.py` (the onnxruntime Python package) on
/// `model` with pocketctl-format `inputs`; returns its outputs document.
pub fn reference_outputs(model: &Path, inputs: &serde_json::Value) -> serde_json::Value {
    let tmp = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(tmp.path(), inputs.to_string()).expect("write inputs");
    let out = Command::new("python3")
        .arg(crate::workspace_root().join("models/fixtures/reference.py"))
        .arg(model)
        .arg(tmp.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "reference.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

/// Seeded pseudo-random f32 data.
pub fn seeded_data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Asserts that every output in `want` (a reference from
/// [`reference_outputs`]) matches `got` (pocketctl run --json) to `tol`.
pub fn assert_close(got: &serde_json::Value, want: &serde_json::Value, tol: f64) {
    for (name, w) in want["outputs"].as_object().unwrap() {
        let g = &got["outputs"][name];
        assert_eq!(g["dtype"], w["dtype"], "{name}");
        assert_eq!(g["shape"], w["shape"], "{name}");
        let (g, w) = (g["data"].as_array().unwrap(), w["data"].as_array().unwrap());
        assert_eq!(g.len(), w.len(), "{name}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            match (a.as_f64(), b.as_f64()) {
                (Some(a), Some(b)) => assert!((a - b).abs() <= tol, "{name}[{i}]: {a} vs {b}"),
                _ => assert_eq!(a, b, "{name}[{i}]"),
            }
        }
    }
}
