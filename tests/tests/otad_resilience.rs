//! otad under pulled power and broken links: killed at 50 points of an
//! install, interrupted downloads that resume instead of starting over,
//! cancel. After each, the box still boots a good slot.

use pocket_proto::job::Phase;
use pocket_proto::update::Update1Proxy;
use pocket_tests::*;
use std::time::{Duration, Instant};
use zbus::proxy::CacheProperties;

struct Rig {
    bus: DevBus,
    _tmp: tempfile::TempDir,
    b: UpdateBox,
    http: HttpServer,
    files: BundleFiles,
    url: String,
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
}

impl Rig {
    fn new() -> Rig {
        let bus = DevBus::start();
        let tmp = tempfile::tempdir().unwrap();
        let p = Publisher::new(&tmp.path().join("publisher"));
        let mut b = UpdateBox::new(
            &tmp.path().join("box"),
            Loader::UBoot,
            &p,
            "checkpoint_bytes = 262144",
        );
        assert_eq!(b.boot(&bus), "A");
        assert_eq!(b.wait_health(&bus), "good");
        let files = p.bundle(&tmp.path().join("site"), "2.0");
        let http = HttpServer::serve(&tmp.path().join("site"));
        let url = format!("{}pocketos-2.0.bundle", http.url());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let conn = rt.block_on(bus.connect());
        Rig {
            bus,
            _tmp: tmp,
            b,
            http,
            files,
            url,
            rt,
            conn,
        }
    }

    fn update(&self) -> Update1Proxy<'static> {
        self.rt.block_on(async {
            Update1Proxy::builder(&self.conn)
                .cache_properties(CacheProperties::No)
                .build()
                .await
                .unwrap()
        })
    }

    fn install(&self) {
        let u = self.update();
        self.rt.block_on(u.install(&self.url)).unwrap();
    }

    /// The running job, if any: (bytes done, bytes total, phase).
    fn job(&self) -> Option<(u64, u64, String)> {
        let u = self.update();
        self.rt.block_on(async {
            let path = u.job().await.ok()?;
            if path.as_str() == "/" {
                return None;
            }
            let j = pocket_proto::job::proxy(&self.conn, "org.pocketos.Update1", &path)
                .await
                .ok()?;
            Some((
                j.bytes_done().await.ok()?,
                j.bytes_total().await.ok()?,
                j.phase().await.ok()?,
            ))
        })
    }

    fn cancel(&self) {
        let u = self.update();
        self.rt.block_on(async {
            let path = u.job().await.unwrap();
            let j = pocket_proto::job::proxy(&self.conn, "org.pocketos.Update1", &path)
                .await
                .unwrap();
            j.cancel().await.unwrap();
        });
    }

    fn wait_done(&self) -> String {
        wait_for("the install to finish", Duration::from_secs(60), || {
            self.job()
                .filter(|j| j.2.parse().is_ok_and(Phase::is_terminal))
                .map(|j| j.2)
        })
    }

    fn served(&self) -> u64 {
        self.http
            .served(".bundle")
            .iter()
            .map(|s| s.bytes_sent)
            .sum()
    }

    fn assert_b_holds_v2(&self) {
        let rootfs = std::fs::read(&self.files.rootfs).unwrap();
        assert!(
            self.b.slot_bytes("B", "rootfs", rootfs.len()) == rootfs,
            "slot B differs from the image"
        );
        assert_eq!(self.b.primary().as_deref(), Some("B"));
    }
}

#[test]
fn killed_at_fifty_points_still_boots_and_finishes() {
    let mut r = Rig::new();
    r.http.throttle(512 << 10);
    let factory = std::fs::read(r.b.slot_file("A", "rootfs")).unwrap();
    r.install();
    let total = wait_for("the job's size", Duration::from_secs(10), || {
        r.job().map(|j| j.1).filter(|t| *t > 0)
    });
    let mut reissued = 0;
    for i in 0..50u64 {
        let threshold = total * i / 50;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match r.job() {
                Some((done, _, ph))
                    if done >= threshold || ph.parse().is_ok_and(Phase::is_terminal) =>
                {
                    break
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "no progress to {threshold} at kill {i}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        r.b.otad().kill9();
        // Power back on: still a good primary, the factory slot intact.
        assert_eq!(r.b.primary().as_deref(), Some("A"), "kill {i}");
        assert!(std::fs::read(r.b.slot_file("A", "rootfs")).unwrap() == factory);
        assert_eq!(r.b.boot(&r.bus), "A", "kill {i}");
        // otad resumes by itself once the install has started writing;
        // before that, the user starts it again.
        let resumed = wait_for("otad", Duration::from_secs(10), || {
            Some(r.job().is_some()).filter(|_| r.bus.has_owner("org.pocketos.Update1"))
        });
        if !resumed {
            reissued += 1;
            r.install();
        }
    }
    assert_eq!(r.wait_done(), Phase::Done.as_str());
    r.assert_b_holds_v2();
    assert!(reissued < 10, "{reissued} of 50 kills lost the install");
}

#[test]
fn interrupted_http_install_fetches_less_than_all_again() {
    let mut r = Rig::new();
    r.http.throttle(2 << 20);
    let bundle_len = std::fs::metadata(&r.files.bundle).unwrap().len();
    r.install();
    wait_for("half the bundle", Duration::from_secs(20), || {
        r.job().filter(|j| j.1 > 0 && j.0 >= j.1 / 2).map(|_| ())
    });
    r.b.otad().kill9();
    let before = r.served();
    let requests_before = r.http.served(".bundle").len();
    r.b.boot(&r.bus);
    assert_eq!(r.wait_done(), Phase::Done.as_str());
    let again = r.served() - before;
    assert!(
        again < bundle_len,
        "fetched {again} bytes again of {bundle_len}"
    );
    let restarted = &r.http.served(".bundle")[requests_before..];
    assert!(
        restarted.iter().any(|s| s.start > bundle_len / 3),
        "no ranged resume: {restarted:?}"
    );
    r.assert_b_holds_v2();
}

#[test]
fn broken_connection_resumes_at_the_last_verified_chunk() {
    let r = Rig::new();
    r.http.drop_next_body_after("pocketos-2.0.bundle", 1 << 20);
    // The first request reads the header only; break the payload's.
    r.install();
    assert_eq!(r.wait_done(), Phase::Done.as_str());
    let log = r.http.served(".bundle");
    assert!(
        log.iter().any(|s| s.start > 0 && s.status == 206),
        "{log:?}"
    );
    r.assert_b_holds_v2();
}

#[test]
fn cancel_leaves_the_box_as_it_was() {
    let mut r = Rig::new();
    r.http.throttle(1 << 20);
    let before = r.b.env();
    r.install();
    wait_for("progress", Duration::from_secs(20), || {
        r.job().filter(|j| j.0 > 0).map(|_| ())
    });
    r.cancel();
    assert_eq!(r.wait_done(), Phase::Failed.as_str());
    assert_eq!(r.b.primary().as_deref(), Some("A"));
    let st = r.b.status(&r.bus);
    assert!(
        st["last_error"].as_str().unwrap().contains("cancelled"),
        "{st}"
    );
    assert_eq!(st["slots"][1]["health"], "incomplete");
    // The environment differs only in nothing: B was already unbootable.
    assert_eq!(r.b.env(), before);
    // Nothing resumes after a restart.
    r.b.boot(&r.bus);
    std::thread::sleep(Duration::from_millis(300));
    assert!(r.job().is_none());
}
