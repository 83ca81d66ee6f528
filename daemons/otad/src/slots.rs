//! Slot devices: block devices found by partition label (as mdev and udev
//! both leave them in sysfs) or plain paths, which tests use as files.

use crate::config::System;
use crate::error::UpdateError;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Resolves `partlabel:NAME` through `<sysfs>/class/block/*/uevent`
/// (`PARTNAME=`), or returns a path as it is.
pub fn resolve(spec: &str, sysfs_root: &Path) -> Result<PathBuf, UpdateError> {
    let Some(label) = spec.strip_prefix("partlabel:") else {
        return Ok(PathBuf::from(spec));
    };
    let class = sysfs_root.join("class/block");
    let entries = std::fs::read_dir(&class)
        .map_err(|e| UpdateError::io(format!("listing {}", class.display()), e))?;
    for entry in entries.flatten() {
        let uevent = std::fs::read_to_string(entry.path().join("uevent")).unwrap_or_default();
        let name = uevent.lines().find_map(|l| l.strip_prefix("PARTNAME="));
        if name == Some(label) {
            let dev = uevent
                .lines()
                .find_map(|l| l.strip_prefix("DEVNAME="))
                .map(str::to_string)
                .unwrap_or_else(|| entry.file_name().to_string_lossy().into_owned());
            return Ok(Path::new("/dev").join(dev));
        }
    }
    Err(UpdateError::io(
        format!("finding the partition labelled {label:?}"),
        std::io::ErrorKind::NotFound.into(),
    ))
}

/// The device of `component` (`rootfs` or an extra component) in `slot`.
pub fn device(sys: &System, slot: &str, component: &str) -> Result<PathBuf, UpdateError> {
    let cfg = sys
        .slots
        .get(slot)
        .ok_or_else(|| UpdateError::NoSuchSlot(slot.to_string(), sys.slot_names().join(", ")))?;
    let spec = if component == pocket_ota::ROOTFS {
        &cfg.rootfs
    } else {
        cfg.components
            .get(component)
            .ok_or_else(|| UpdateError::UnknownComponent(component.to_string()))?
    };
    resolve(spec, &sys.sysfs_root)
}

/// How many bytes `path` can hold: a block device's size, or unbounded for
/// a regular file (tests, loop images).
pub fn capacity(path: &Path) -> Result<Option<u64>, UpdateError> {
    let io = |e| UpdateError::io(format!("opening slot device {}", path.display()), e);
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = std::fs::File::open(path).map_err(io)?;
        return Ok(Some(f.seek(std::io::SeekFrom::End(0)).map_err(io)?));
    }
    Ok(None)
}

/// The booted slot from a kernel command line.
pub fn booted_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|arg| {
        arg.strip_prefix("pocketos.slot=")
            .or_else(|| arg.strip_prefix("rauc.slot="))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_from_cmdline_and_partlabel() {
        assert_eq!(
            booted_from_cmdline("console=ttyAMA0 root=/dev/vda2 rauc.slot=B ro").as_deref(),
            Some("B")
        );
        assert_eq!(booted_from_cmdline("pocketos.slot=A").as_deref(), Some("A"));
        assert_eq!(booted_from_cmdline("quiet"), None);
        let sys = tempfile::tempdir().unwrap();
        let dir = sys.path().join("class/block/vda3");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("uevent"),
            "MAJOR=254\nDEVNAME=vda3\nDEVTYPE=partition\nPARTNAME=rootfs-b\n",
        )
        .unwrap();
        assert_eq!(
            resolve("partlabel:rootfs-b", sys.path()).unwrap(),
            Path::new("/dev/vda3")
        );
        assert!(resolve("partlabel:nope", sys.path()).is_err());
        assert_eq!(resolve("/tmp/x", sys.path()).unwrap(), Path::new("/tmp/x"));
    }
}
