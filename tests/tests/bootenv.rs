//! otad's bootloader environments against the real tools, both ways, and
//! torn at every byte offset of a write: the box must always keep a good
//! primary slot.

use pocket_otad::bootenv::grub::GrubEnv;
use pocket_otad::bootenv::uboot::{EnvCopy, UBootEnv};
use pocket_otad::bootenv::{BootEnv, Vars};
use pocket_tests::{fw_printenv, grub_editenv_list, tool};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: u64 = 0x2000;

fn uboot(dir: &Path) -> (BootEnv, PathBuf) {
    let file = dir.join("uboot.env");
    std::fs::write(&file, vec![0u8; 2 * SIZE as usize]).unwrap();
    let cfg = dir.join("fw_env.config");
    std::fs::write(
        &cfg,
        format!(
            "{f} 0x0 {SIZE:#x}\n{f} {SIZE:#x} {SIZE:#x}\n",
            f = file.display()
        ),
    )
    .unwrap();
    let copy = |offset| EnvCopy {
        path: file.clone(),
        offset,
        size: SIZE,
    };
    let env = BootEnv::UBoot {
        env: UBootEnv::new(&[copy(0), copy(SIZE)]).unwrap(),
        max_tries: 3,
    };
    (env, cfg)
}

fn grub(dir: &Path) -> (BootEnv, PathBuf) {
    let file = dir.join("grubenv");
    tool(Command::new("grub-editenv").arg(&file).arg("create"));
    (
        BootEnv::Grub {
            env: GrubEnv::new(&file),
        },
        file,
    )
}

fn vars(pairs: &[(&str, &str)]) -> Vars {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn uboot_env_reads_and_writes_like_libubootenv() {
    let dir = tempfile::tempdir().unwrap();
    let (env, cfg) = uboot(dir.path());
    let ours = vars(&[
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "0"),
        ("bootargs", "console=ttyAMA0 rw"),
    ]);
    env.plan(&ours).unwrap().apply().unwrap();
    assert_eq!(fw_printenv(&cfg), ours);
    tool(
        Command::new("fw_setenv")
            .arg("-c")
            .arg(&cfg)
            .args(["BOOT_B_LEFT", "2"]),
    );
    let mut expected = ours.clone();
    expected.insert("BOOT_B_LEFT".into(), "2".into());
    assert_eq!(env.read().unwrap(), expected);
    // Alternate writers past the 8-bit copy counter's wrap.
    for i in 0..300u32 {
        let n = i.to_string();
        if i % 2 == 0 {
            let mut v = env.read().unwrap();
            v.insert("n".into(), n.clone());
            env.plan(&v).unwrap().apply().unwrap();
        } else {
            tool(
                Command::new("fw_setenv")
                    .arg("-c")
                    .arg(&cfg)
                    .args(["n", &n]),
            );
        }
        let seen = env.read().unwrap();
        assert_eq!(seen["n"], n, "after write {i}");
        assert_eq!(fw_printenv(&cfg), seen, "after write {i}");
    }
}

#[test]
fn grub_env_reads_and_writes_like_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let (env, file) = grub(dir.path());
    tool(
        Command::new("grub-editenv")
            .arg(&file)
            .args(["set", "ORDER=A B", "A_OK=1", "A_TRY=0"]),
    );
    assert_eq!(
        env.read().unwrap(),
        vars(&[("ORDER", "A B"), ("A_OK", "1"), ("A_TRY", "0")])
    );
    let ours = vars(&[
        ("ORDER", "B A"),
        ("A_OK", "1"),
        ("A_TRY", "0"),
        ("B_OK", "1"),
        ("B_TRY", "0"),
    ]);
    env.plan(&ours).unwrap().apply().unwrap();
    assert_eq!(grub_editenv_list(&file), ours);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 1024);
    tool(
        Command::new("grub-editenv")
            .arg(&file)
            .args(["unset", "B_TRY"]),
    );
    let mut expected = ours.clone();
    expected.remove("B_TRY");
    assert_eq!(env.read().unwrap(), expected);
}

/// Cuts the write that makes B primary at every byte offset and checks,
/// after each, that the environment is the old one or the new one and
/// boots a good slot, by our reader at every offset and by the real tool
/// at every 61st and the last ones.
fn tear_every_byte(env: &BootEnv, files: &[PathBuf], real: impl Fn() -> Vars) {
    let slots = vec!["A".to_string(), "B".to_string()];
    let before = env.with_primary(&env.with_good(&Vars::new(), "B"), &slots, "A");
    let before = env.with_bad(&before, "B");
    // Twice, so that both U-Boot copies hold valid environments.
    env.plan(&before).unwrap().apply().unwrap();
    env.plan(&before).unwrap().apply().unwrap();
    let after = env.with_primary(&before, &slots, "B");
    let plan = env.plan(&after).unwrap();
    let total = plan.bytes();
    // A whole U-Boot copy, or the GRUB block's first sector.
    assert!(total >= 512, "a write of {total} bytes");
    let snapshot: BTreeMap<PathBuf, Option<Vec<u8>>> = files
        .iter()
        .map(|f| (f.clone(), std::fs::read(f).ok()))
        .collect();
    for k in 0..=total {
        for (f, bytes) in &snapshot {
            match bytes {
                Some(b) => std::fs::write(f, b).unwrap(),
                None => {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        plan.apply_until(k).unwrap();
        let seen = env
            .read()
            .unwrap_or_else(|e| panic!("cut at byte {k}: {e}"));
        // A cut after the last byte that differs is a complete write.
        assert!(
            seen == before || seen == after,
            "cut at byte {k} of {total}: {seen:?}"
        );
        if k == 0 {
            assert_eq!(seen, before);
        }
        if k == total {
            assert_eq!(seen, after);
        }
        let primary = env.primary(&seen, &slots).expect("a primary slot");
        assert!(env.slot(&seen, &primary).good);
        if k % 61 == 0 || k + 3 >= total {
            assert_eq!(real(), seen, "the real tool disagrees when cut at byte {k}");
        }
    }
}

#[test]
fn torn_uboot_env_writes_keep_a_good_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (env, cfg) = uboot(dir.path());
    tear_every_byte(&env, &[dir.path().join("uboot.env")], || fw_printenv(&cfg));
}

#[test]
fn torn_grub_env_writes_keep_a_good_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (env, file) = grub(dir.path());
    let tmp = dir.path().join("grubenv.new");
    tear_every_byte(&env, &[file.clone(), tmp], || grub_editenv_list(&file));
}
