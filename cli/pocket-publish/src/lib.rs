//! The publisher's operations behind `pocket-publish`, as functions so that
//! tests and benchmarks can build fixtures without a subprocess.

use anyhow::{bail, Context, Result};
use pocket_models::{CatalogEntry, PackFile, PackManifest, PackRef};
use pocket_trust::{Envelope, Keyring, KeyringBody, PublicKey, Role, SecretKey, Version};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

fn load_keys(paths: &[PathBuf]) -> Result<Vec<SecretKey>> {
    paths
        .iter()
        .map(|p| SecretKey::load(p).map_err(Into::into))
        .collect()
}

fn expiry(text: Option<&str>, now: SystemTime) -> Result<Option<SystemTime>> {
    text.map(|t| pocket_trust::parse_expiry(t, now))
        .transpose()
        .map_err(Into::into)
}

/// Writes `out/keyring.json`.
pub fn keyring_create(
    members: &[(Role, Vec<PathBuf>)],
    thresholds: &[String],
    keys: &[PathBuf],
    version: &str,
    out: &Path,
) -> Result<()> {
    let members = members
        .iter()
        .map(|(role, paths)| {
            let pubs = paths
                .iter()
                .map(|p| PublicKey::load(p))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((*role, pubs))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut th = BTreeMap::new();
    for t in thresholds {
        let (role, n) = t
            .split_once('=')
            .with_context(|| format!("threshold {t:?} is not ROLE=N"))?;
        th.insert(role.parse::<Role>()?, n.parse::<usize>()?);
    }
    let body = KeyringBody::new(&members, &th)?;
    let env = Keyring::create(body, version.parse()?, &load_keys(keys)?)?;
    // Refuse to write a keyring that no box would accept as an anchor.
    Keyring::anchor(env.clone()).context("the keyring is not signed by its own root keys")?;
    std::fs::create_dir_all(out)?;
    write_atomic(&out.join(pocket_trust::KEYRING_FILE), &env.to_bytes())
}

/// What a model pack is built from.
#[derive(Debug, Clone)]
pub struct PackSpec {
    pub name: String,
    pub version: String,
    pub description: String,
    pub entry: Option<String>,
    pub memory_bytes: Option<u64>,
    /// (path inside the pack, file on disk)
    pub files: Vec<(String, PathBuf)>,
    /// Set for a language model (an onnxruntime-genai folder).
    pub llm: Option<pocket_models::LlmInfo>,
}

/// A pack of an onnxruntime-genai folder: every file in it, checked as
/// npud checks it at load (the configuration parses and is plausible, the
/// decoder is there, the tokenizer loads, the chat template renders), with
/// the shape the memory checks need. `memory_bytes` defaults to the files'
/// size (the weights); the KV cache is counted from the shape.
pub fn folder_spec(
    name: &str,
    version: &str,
    description: &str,
    dir: &Path,
    memory_bytes: Option<u64>,
) -> Result<PackSpec> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e?;
        let ty = e.file_type()?;
        let file_name = e.file_name();
        let Some(n) = file_name.to_str() else {
            bail!("{}: a file name that is not UTF-8", dir.display());
        };
        if !ty.is_file() {
            bail!(
                "{}: {n} is not a regular file (a model folder holds only files)",
                dir.display()
            );
        }
        files.push((n.to_string(), e.path()));
    }
    files.sort();
    let llm = pocket_npud::llm::Llm::open(dir)
        .with_context(|| format!("{} is not a model folder npud can run", dir.display()))?;
    let entry = llm.shape.filename.clone();
    if !files.iter().any(|(n, _)| *n == entry) {
        bail!("{}: the decoder {entry} is missing", dir.display());
    }
    let s = &llm.shape;
    Ok(PackSpec {
        name: name.into(),
        version: version.into(),
        description: description.into(),
        entry: Some(entry),
        memory_bytes,
        files,
        llm: Some(pocket_models::LlmInfo {
            context_length: s.context_length as u64,
            layers: s.layers as u64,
            kv_heads: s.kv_heads as u64,
            head_size: s.head_size as u64,
            kv_dtype: "f32".into(),
        }),
    })
}

/// Writes a signed pack to `out` and returns its manifest.
pub fn model_pack(
    spec: &PackSpec,
    keys: &[PathBuf],
    expires: Option<&str>,
    out: &Path,
    now: SystemTime,
) -> Result<PackManifest> {
    let mut files = Vec::new();
    for (path, src) in &spec.files {
        let (size, sha256) = hash_file(src)?;
        files.push(PackFile {
            path: path.clone(),
            size,
            sha256,
        });
    }
    let entry = match &spec.entry {
        Some(e) => e.clone(),
        None => files
            .iter()
            .find(|f| f.path.ends_with(".onnx"))
            .or(files.first())
            .map(|f| f.path.clone())
            .context("a pack needs at least one file")?,
    };
    let size: u64 = files.iter().map(|f| f.size).sum();
    let manifest = PackManifest {
        name: spec.name.clone(),
        description: spec.description.clone(),
        kind: if spec.llm.is_some() { "llm" } else { "onnx" }.into(),
        entry,
        memory_bytes: spec
            .memory_bytes
            .unwrap_or(if spec.llm.is_some() { size } else { size * 2 }),
        llm: spec.llm.clone(),
        files,
    };
    manifest.validate()?;
    let env = pocket_models::sign_pack(
        &manifest,
        spec.version.parse()?,
        expiry(expires, now)?,
        &load_keys(keys)?,
    )?;
    let header = env.to_bytes();
    let tmp = tmp_path(out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    w.write_all(&pocket_models::encode_prefix(header.len() as u64))?;
    w.write_all(&header)?;
    for ((_, src), f) in spec.files.iter().zip(&manifest.files) {
        let copied = std::io::copy(&mut std::fs::File::open(src)?, &mut w)?;
        if copied != f.size {
            bail!("{} changed while it was being packed", src.display());
        }
    }
    w.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(manifest)
}

/// What `catalog_build` wrote.
#[derive(Debug)]
pub struct BuiltCatalog {
    /// How many models the catalog lists.
    pub models: usize,
    /// Entries of the packs directory that are not `*.pack` files, left out.
    pub skipped: Vec<PathBuf>,
}

/// Signs `out/catalog.json` over every `*.pack` in `packs`, and places the
/// packs under `out/packs/`. Anything else in `packs` is left out and
/// named in the result; a directory with no pack at all is an error, not an
/// empty catalog.
pub fn catalog_build(
    packs: &Path,
    keys: &[PathBuf],
    expires: &str,
    version: &str,
    out: &Path,
    now: SystemTime,
) -> Result<BuiltCatalog> {
    let packs_out = out.join("packs");
    std::fs::create_dir_all(&packs_out)?;
    let mut entries = Vec::new();
    let mut dir: Vec<_> = std::fs::read_dir(packs)
        .with_context(|| format!("reading {}", packs.display()))?
        .collect::<Result<_, _>>()?;
    dir.sort_by_key(|e| e.file_name());
    let mut skipped = Vec::new();
    for de in dir {
        let path = de.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pack") || !path.is_file() {
            skipped.push(path);
            continue;
        }
        let (header, size) = read_header(&path)?;
        let env = Envelope::from_bytes("model pack header", &header)?;
        let signed = env.peek::<PackManifest>()?;
        signed.body.validate()?;
        let file_name = format!("{}-{}.pack", signed.body.name, signed.version);
        let dest = packs_out.join(&file_name);
        if !same_file(&path, &dest) {
            let _ = std::fs::remove_file(&dest);
            if std::fs::hard_link(&path, &dest).is_err() {
                std::fs::copy(&path, &dest)?;
            }
        }
        entries.push(CatalogEntry {
            name: signed.body.name.clone(),
            version: signed.version.clone(),
            description: signed.body.description.clone(),
            size_bytes: signed.body.size_bytes(),
            memory_bytes: signed.body.memory_bytes,
            llm: signed.body.llm.clone(),
            pack: PackRef {
                path: format!("packs/{file_name}"),
                size,
                header_size: header.len() as u64,
                header_sha256: pocket_trust::sha256_hex(&header),
            },
        });
    }
    if entries.is_empty() {
        let names: Vec<String> = skipped.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{} holds no model pack (*.pack){}: no catalog written",
            packs.display(),
            if names.is_empty() {
                String::new()
            } else {
                format!("; left out: {}", names.join(", "))
            }
        );
    }
    let version: Version = version.parse()?;
    let models = entries.len();
    let env = Envelope::sign(
        pocket_models::CATALOG_KIND,
        version,
        Some(pocket_trust::parse_expiry(expires, now)?),
        pocket_models::Catalog { models: entries },
        &load_keys(keys)?,
    )?;
    write_atomic(&out.join(pocket_models::CATALOG_FILE), &env.to_bytes())?;
    Ok(BuiltCatalog { models, skipped })
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn read_header(path: &Path) -> Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut prefix = [0u8; pocket_models::PACK_PREFIX_LEN];
    f.read_exact(&mut prefix)?;
    let len = pocket_models::parse_prefix(&prefix)?;
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    Ok((header, size))
}

/// What an update bundle is built from.
#[derive(Debug, Clone)]
pub struct BundleArgs {
    pub rootfs: PathBuf,
    pub components: Vec<(String, PathBuf)>,
    pub version: String,
    pub compatible: String,
    pub security_version: u64,
    pub chunk_size: u64,
    pub expires: Option<String>,
}

/// Writes a signed update bundle to `out` and returns its manifest.
pub fn bundle_create(
    args: &BundleArgs,
    keys: &[PathBuf],
    out: &Path,
    now: SystemTime,
) -> Result<pocket_ota::BundleManifest> {
    let spec = pocket_ota::BundleSpec {
        rootfs: &args.rootfs,
        components: args
            .components
            .iter()
            .map(|(n, p)| (n.clone(), p.as_path()))
            .collect(),
        version: args.version.parse()?,
        compatible: args.compatible.clone(),
        security_version: args.security_version,
        chunk_size: args.chunk_size,
        expires: expiry(args.expires.as_deref(), now)?,
    };
    Ok(pocket_ota::create(&spec, &load_keys(keys)?, out)?)
}

/// Verifies `file` (a keyring, a catalog, a model pack or an update
/// bundle) and says what it is.
pub fn verify(file: &Path, keyring_dir: &Path, now: SystemTime) -> Result<String> {
    let keyring = Keyring::load_dir(keyring_dir)?;
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut magic = [0u8; 8];
    let has_magic = f.read_exact(&mut magic).is_ok();
    if has_magic && &magic == pocket_ota::BUNDLE_MAGIC {
        let vh = pocket_ota::verify_file(file, &keyring, now)?;
        let m = vh.manifest();
        return Ok(format!(
            "update bundle {} for {} (security version {}, {} payload(s), {} bytes)",
            vh.version(),
            m.compatible,
            m.security_version,
            m.payloads.len(),
            m.total_bytes()
        ));
    }
    let is_pack = has_magic && &magic == pocket_models::PACK_MAGIC;
    if is_pack {
        let f = std::io::BufReader::new(std::fs::File::open(file)?);
        let m = pocket_models::read_pack(&keyring, f, now, |_, _| Ok(()))?;
        return Ok(format!(
            "model pack {} {} ({} files, {} bytes)",
            m.body.name,
            m.version,
            m.body.files.len(),
            m.body.size_bytes()
        ));
    }
    let env = Envelope::from_bytes("signed metadata", &std::fs::read(file)?)?;
    let kind = env.peek::<serde_json::Value>()?.kind;
    match kind.as_str() {
        pocket_models::CATALOG_KIND => {
            let c = pocket_models::Catalog::verify(&keyring, &env, now)?;
            Ok(format!(
                "catalog version {} with {} model(s)",
                c.version,
                c.body.models.len()
            ))
        }
        "keyring" => {
            if env.signed == keyring.envelope().signed {
                return Ok(format!(
                    "keyring version {} (the anchor itself)",
                    keyring.version()
                ));
            }
            let next = keyring.rotate(env)?;
            Ok(format!(
                "keyring version {}, a valid rotation",
                next.version()
            ))
        }
        other => bail!(
            "{} is {other:?} metadata, which this tool does not verify",
            file.display()
        ),
    }
}

/// Size and sha256 of a file, read once.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
