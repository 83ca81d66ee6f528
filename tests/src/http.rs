use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One response the server sent, updated while the body streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    pub status: u16,
    /// First byte of the body within the file (the Range start).
    pub start: u64,
    pub bytes_sent: u64,
}

#[derive(Default)]
struct State {
    /// Body bytes per second per connection; 0 for no limit.
    throttle: AtomicU64,
    /// Drop the next body of a path with this suffix after this many bytes
    /// (once).
    drop_after: Mutex<Option<(String, u64)>>,
    stop: AtomicBool,
    log: Mutex<Vec<Served>>,
}

/// A static file server on 127.0.0.1 with HTTP Range support, a throttle
/// and a way to drop a connection mid-body, logging every response.
pub struct HttpServer {
    root: PathBuf,
    port: u16,
    state: Arc<State>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpServer({}, {})", self.port, self.root.display())
    }
}

impl HttpServer {
    pub fn serve(root: &Path) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State::default());
        let (st, dir) = (state.clone(), root.to_path_buf());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, dir) = (st.clone(), dir.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &dir, &st);
                });
            }
        });
        HttpServer {
            root: root.to_path_buf(),
            port,
            state,
        }
    }

    /// Base URL with a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn throttle(&self, bytes_per_sec: u64) {
        self.state.throttle.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Drops the next response body for a path ending with `suffix` after
    /// `bytes` bytes.
    pub fn drop_next_body_after(&self, suffix: &str, bytes: u64) {
        *self.state.drop_after.lock().expect("lock") = Some((suffix.into(), bytes));
    }

    pub fn log(&self) -> Vec<Served> {
        self.state.log.lock().expect("log").clone()
    }

    /// Responses for paths ending with `suffix`.
    pub fn served(&self, suffix: &str) -> Vec<Served> {
        self.log()
            .into_iter()
            .filter(|s| s.path.ends_with(suffix))
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(conn: TcpStream, root: &Path, st: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse::<u64>().ok();
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut out = conn;
    let rel = path.trim_start_matches('/');
    let file_path = root.join(rel);
    let bad = rel.split('/').any(|p| p == "..");
    let Ok(mut file) = (if bad {
        Err(std::io::ErrorKind::NotFound.into())
    } else {
        std::fs::File::open(&file_path)
    }) else {
        log(st, &path, 404, 0, 0);
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let size = file.metadata()?.len();
    let start = range_start.unwrap_or(0);
    if start > size || (range_start.is_some() && start == size && size > 0) {
        log(st, &path, 416, start, 0);
        return write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let status = if range_start.is_some() { 206 } else { 200 };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
        status,
        if status == 206 { "Partial Content" } else { "OK" },
        size - start
    );
    if status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{size}\r\n",
            size - 1
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    file.seek(SeekFrom::Start(start))?;
    let idx = log(st, &path, status, start, 0);
    let drop_after = {
        let mut d = st.drop_after.lock().expect("lock");
        match d.as_ref() {
            Some((suffix, n)) if path.ends_with(suffix.as_str()) => {
                let n = *n;
                *d = None;
                n
            }
            _ => 0,
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let begun = Instant::now();
    let mut sent = 0u64;
    loop {
        let throttle = st.throttle.load(Ordering::Relaxed);
        let chunk = if throttle > 0 {
            (throttle / 20).clamp(1, buf.len() as u64) as usize
        } else {
            buf.len()
        };
        let mut n = file.read(&mut buf[..chunk])?;
        if n == 0 {
            break;
        }
        if drop_after > 0 && sent + n as u64 >= drop_after {
            n = (drop_after - sent) as usize;
            out.write_all(&buf[..n])?;
            sent += n as u64;
            update(st, idx, sent);
            // Close before the promised Content-Length, as a broken link
            // would.
            return Ok(());
        }
        out.write_all(&buf[..n])?;
        sent += n as u64;
        update(st, idx, sent);
        if throttle > 0 {
            let due = Duration::from_secs_f64(sent as f64 / throttle as f64);
            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if st.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    out.flush()
}

fn log(st: &State, path: &str, status: u16, start: u64, bytes_sent: u64) -> usize {
    let mut l = st.log.lock().expect("log");
    l.push(Served {
        path: path.into(),
        status,
        start,
        bytes_sent,
    });
    l.len() - 1
}

fn update(st: &State, idx: usize, sent: u64) {
    st.log.lock().expect("log")[idx].bytes_sent = sent;
}
