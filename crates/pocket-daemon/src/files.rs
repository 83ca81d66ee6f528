//! Reading files that someone less trusted than the daemon could have
//! put in place: a USB stick's contents, a file another daemon's user
//! owns.

/// Opens `rel` under `dir` (a USB stick, say, whose contents anyone may
/// have written) for reading: without following a symbolic link at `dir`
/// or anywhere below it, and only when it is a regular file. A link to
/// `/dev/zero`, a FIFO or a device node is an error, never something
/// a daemon reads forever, waits on or opens (a device's driver never sees
/// an open).
///
/// Each step opens the next name relative to the directory opened before
/// it (through `/proc/self/fd`, as `openat` would), so a directory swapped
/// for a link between two steps is refused too.
pub fn open_regular(dir: &std::path::Path, rel: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let refused = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(refused(format!(
            "{rel:?} is not a file below its directory"
        )));
    }
    let no_link = |path: &std::path::Path, flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => refused(format!("{} is a symbolic link", path.display())),
                Some(nix::libc::ENOTDIR) => {
                    refused(format!("{} is not a directory", path.display()))
                }
                _ => e,
            })
    };
    let mut at = no_link(dir, nix::libc::O_PATH | nix::libc::O_DIRECTORY)?;
    let mut shown = dir.to_path_buf();
    let (last, dirs) = parts.split_last().expect("not empty");
    for part in dirs {
        shown.push(part);
        let next = std::path::PathBuf::from(format!("/proc/self/fd/{}/{part}", at.as_raw_fd()));
        at = no_link(&next, nix::libc::O_PATH | nix::libc::O_DIRECTORY).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                e.to_string()
                    .replace(&next.display().to_string(), &shown.display().to_string()),
            )
        })?;
    }
    shown.push(last);
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}/{last}", at.as_raw_fd()));
    let rename = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            e.to_string()
                .replace(&path.display().to_string(), &shown.display().to_string()),
        )
    };
    // A handle that opens nothing yet: what it names is checked first.
    let handle = no_link(&path, nix::libc::O_PATH).map_err(rename)?;
    let meta = handle.metadata()?;
    if meta.file_type().is_symlink() {
        return Err(refused(format!("{} is a symbolic link", shown.display())));
    }
    if !meta.is_file() {
        return Err(refused(format!(
            "{} is not a regular file",
            shown.display()
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    Ok(file)
}

/// Reads all of `file`, refusing one of more than `limit` bytes
/// (`FileTooLarge`); never more than `limit`, should it grow meanwhile.
pub fn read_capped(file: std::fs::File, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes"),
        )
    };
    let len = file.metadata()?.len();
    if len > limit {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut body)?;
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(body)
}
