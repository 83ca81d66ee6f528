//! `pocket-publish`: the build-host side of PocketOS trust.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pocket-publish",
    version,
    about = "Sign what PocketOS boxes trust"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a key pair: DIR/<keyid>.secret and DIR/<keyid>.pub
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Keyrings: the trusted keys of each role
    Keyring {
        #[command(subcommand)]
        cmd: KeyringCmd,
    },
    /// Model packs
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Model catalogs
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
    /// Update bundles
    Bundle {
        #[command(subcommand)]
        cmd: BundleCmd,
    },
    /// Verify a keyring, catalog, model pack or update bundle against a keyring directory
    Verify {
        file: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Sign a rootfs image (and components) into an update bundle
    Create {
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long)]
        version: String,
        /// The device family it is for (system.toml's `compatible`)
        #[arg(long)]
        compatible: String,
        /// NAME=FILE, for example npu-firmware=fw.bin
        #[arg(long, num_args = 1..)]
        component: Vec<String>,
        /// Forward-only; devices refuse bundles below the last one booted good
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// Bytes per verified chunk (a power of two, 4 KiB to 64 MiB)
        #[arg(long, default_value_t = pocket_ota::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        #[arg(long, num_args = 1.., required = true)]
        key: Vec<PathBuf>,
        /// RFC 3339 time or a duration such as 90d
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify a bundle: header, every chunk and every payload
    Verify {
        file: PathBuf,
        #[arg(long)]
        keyring: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeyringCmd {
    /// Create a keyring directory (what daemons take as keyring_dir)
    Create {
        #[arg(long, num_args = 1.., required = true)]
        root: Vec<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        models: Vec<PathBuf>,
        #[arg(long, num_args = 1.., required = true)]
        updates: Vec<PathBuf>,
        /// ROLE=N, for example models=2 (default 1 per role)
        #[arg(long, num_args = 1..)]
        threshold: Vec<String>,
        /// Root secret keys; for a rotation, a threshold of the current
        /// root keys and of the new ones
        #[arg(long, num_args = 1.., required = true)]
        key: Vec<PathBuf>,
        /// Keyring version; must grow on every rotation (keyrings never
        /// expire: keys are revoked by rotation)
        #[arg(long, default_value = "1")]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Build a signed model pack
    Pack {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// A file to carry; `PATH` keeps its base name, `NAME=PATH` renames
        #[arg(long, num_args = 1.., required_unless_present = "dir", conflicts_with = "dir")]
        file: Vec<String>,
        /// An onnxruntime-genai folder (a language model): every file in
        /// it, checked as npud checks it at load; the entry is its decoder
        #[arg(long, conflicts_with = "entry")]
        dir: Option<PathBuf>,
        /// The file a runtime loads (default: the first .onnx file)
        #[arg(long)]
        entry: Option<String>,
        /// Memory the model needs when loaded (default: twice its size)
        #[arg(long)]
        memory_bytes: Option<u64>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, num_args = 1.., required = true)]
        key: Vec<PathBuf>,
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Sign a catalog of every *.pack in DIR, laid out for serving
    Build {
        #[arg(long)]
        packs: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        key: Vec<PathBuf>,
        #[arg(long, default_value = "90d")]
        expires: String,
        /// Catalog version, e.g. 42 or 2026.12.1: it must be higher than the
        /// last published one, since boxes accept only newer catalogs. It is
        /// never taken from the clock, which a wrong clock would push ahead
        /// for good.
        #[arg(long)]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pocket-publish: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let now = std::time::SystemTime::now();
    match cli.cmd {
        Cmd::Keygen { out } => {
            let key = pocket_trust::SecretKey::generate();
            let (secret, public) = key.save(&out)?;
            println!("{}", key.id());
            eprintln!("wrote {} and {}", secret.display(), public.display());
        }
        Cmd::Keyring {
            cmd:
                KeyringCmd::Create {
                    root,
                    models,
                    updates,
                    threshold,
                    key,
                    version,
                    out,
                },
        } => pocket_publish::keyring_create(
            &[
                (pocket_trust::Role::Root, root),
                (pocket_trust::Role::Models, models),
                (pocket_trust::Role::Updates, updates),
            ],
            &threshold,
            &key,
            &version,
            &out,
        )?,
        Cmd::Model {
            cmd:
                ModelCmd::Pack {
                    name,
                    version,
                    file,
                    dir,
                    entry,
                    memory_bytes,
                    description,
                    key,
                    expires,
                    out,
                },
        } => {
            let spec = match dir {
                Some(dir) => {
                    pocket_publish::folder_spec(&name, &version, &description, &dir, memory_bytes)?
                }
                None => file_spec(name, version, description, entry, memory_bytes, &file)?,
            };
            let manifest = pocket_publish::model_pack(&spec, &key, expires.as_deref(), &out, now)?;
            eprintln!(
                "wrote {} ({} {}, {}, {} files, {} bytes)",
                out.display(),
                manifest.name,
                spec.version,
                manifest.kind,
                manifest.files.len(),
                manifest.size_bytes()
            );
        }
        Cmd::Catalog {
            cmd:
                CatalogCmd::Build {
                    packs,
                    key,
                    expires,
                    version,
                    out,
                },
        } => {
            let built = pocket_publish::catalog_build(&packs, &key, &expires, &version, &out, now)?;
            for p in &built.skipped {
                eprintln!("left out {}: not a *.pack file", p.display());
            }
            eprintln!(
                "wrote {} with {} model(s)",
                out.join("catalog.json").display(),
                built.models
            );
        }
        Cmd::Bundle {
            cmd:
                BundleCmd::Create {
                    rootfs,
                    version,
                    compatible,
                    component,
                    security_version,
                    chunk_size,
                    key,
                    expires,
                    out,
                },
        } => {
            let components = component
                .iter()
                .map(|c| {
                    c.split_once('=')
                        .map(|(n, f)| (n.to_string(), PathBuf::from(f)))
                        .with_context(|| format!("component {c:?} is not NAME=FILE"))
                })
                .collect::<Result<Vec<_>>>()?;
            let spec = pocket_publish::BundleArgs {
                rootfs,
                components,
                version,
                compatible,
                security_version,
                chunk_size,
                expires,
            };
            let m = pocket_publish::bundle_create(&spec, &key, &out, now)?;
            eprintln!(
                "wrote {} ({} payload(s), {} bytes)",
                out.display(),
                m.payloads.len(),
                m.total_bytes()
            );
        }
        Cmd::Bundle {
            cmd: BundleCmd::Verify { file, keyring },
        } => {
            let what = pocket_publish::verify(&file, &keyring, now)?;
            println!("{}: OK, {what}", file.display());
        }
        Cmd::Verify { file, keyring } => {
            let what = pocket_publish::verify(&file, &keyring, now)?;
            println!("{}: OK, {what}", file.display());
        }
    }
    Ok(())
}

/// A pack of named files (`PATH`, or `NAME=PATH` to rename).
fn file_spec(
    name: String,
    version: String,
    description: String,
    entry: Option<String>,
    memory_bytes: Option<u64>,
    file: &[String],
) -> Result<pocket_publish::PackSpec> {
    let files = file
        .iter()
        .map(|f| match f.split_once('=') {
            Some((name, path)) => Ok((name.to_string(), PathBuf::from(path))),
            None => {
                let p = PathBuf::from(f);
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("file has no name")?
                    .to_string();
                Ok((name, p))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(pocket_publish::PackSpec {
        name,
        version,
        description,
        entry,
        memory_bytes,
        files,
        llm: None,
    })
}
