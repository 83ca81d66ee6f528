//! The Buildroot external tree's image step (`buildroot/board/pocketos/
//! post-image.sh` with genimage and the board configs) run here on the
//! pieces `image/build.sh` made, as a Buildroot build runs it: the QEMU
//! board's disk (the one layout, which `image/build.sh` makes its disk
//! with too) boots, and the ROCK 5B's card keeps the Rockchip loader and
//! U-Boot's environment where U-Boot, otad and fw_printenv look for them.
//! Needs `just image` and genimage, mkimage, grub-editenv, mtools and
//! sfdisk.

use pocket_otad::bootenv::uboot::EnvCopy;
use pocket_otad::config::{Bootloader, System};
use pocket_tests::appliance::{image_dir, image_file, Appliance};
use pocket_tests::{grub_editenv_list, tool, workspace_root};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1024 * 1024;

fn board_dir(board: &str) -> PathBuf {
    workspace_root()
        .join("buildroot/board/pocketos")
        .join(board)
}

/// Buildroot's output directories for one post-image run, with the inputs
/// Buildroot (and post-build.sh) would have made: the rootfs, GRUB's EFI
/// binary and the target's /etc/pocketos-version.
struct Output {
    tmp: tempfile::TempDir,
}

impl Output {
    fn new() -> Output {
        let tmp = tempfile::tempdir().expect("tmp");
        let o = Output { tmp };
        let efi = o.images().join("efi-part/EFI/BOOT");
        std::fs::create_dir_all(&efi).unwrap();
        std::fs::create_dir_all(o.dir("host/bin")).unwrap();
        std::fs::create_dir_all(o.dir("base")).unwrap();
        std::fs::create_dir_all(o.dir("build")).unwrap();
        let etc = o.dir("target/etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::copy(image_file("version"), etc.join("pocketos-version")).unwrap();
        std::fs::copy(image_file("rootfs.ext4"), o.images().join("rootfs.ext2"))
            .expect("copy rootfs");
        std::fs::copy(
            image_dir().join("work/BOOTAA64.EFI"),
            efi.join("bootaa64.efi"),
        )
        .expect("image/'s GRUB EFI binary");
        o
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn images(&self) -> PathBuf {
        self.dir("images")
    }

    /// Runs the shared post-image script for `board`, as Buildroot does.
    fn post_image(&self, board: &str) {
        tool(
            Command::new(workspace_root().join("buildroot/board/pocketos/post-image.sh"))
                .arg(self.images())
                .arg(board_dir(board))
                .env("HOST_DIR", self.dir("host"))
                .env("BUILD_DIR", self.dir("build"))
                .env("TARGET_DIR", self.dir("target"))
                .env("BASE_DIR", self.dir("base")),
        );
    }
}

/// `sfdisk --json`'s partition table of a disk image, without the fields
/// that name the file or depend on the disk's length.
fn partition_table(disk: &Path) -> Value {
    let out = tool(Command::new("sfdisk").arg("--json").arg(disk));
    let mut table: Value = serde_json::from_str(&out).unwrap();
    let table = table["partitiontable"].take();
    let parts = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            serde_json::json!({
                "start": p["start"], "size": p["size"], "type": p["type"],
                "uuid": p["uuid"], "name": p["name"],
            })
        })
        .collect::<Vec<_>>();
    serde_json::json!({ "label": table["label"], "id": table["id"], "partitions": parts })
}

/// The bytes of `len` at `offset` in `file`.
fn bytes_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// A file copied out of a FAT image with mtools.
fn fat_file(image: &Path, path: &str, to: &Path) -> PathBuf {
    let dest = to.join(path.rsplit('/').next().unwrap());
    tool(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(image)
            .arg(format!("::{path}"))
            .arg(&dest),
    );
    dest
}

/// `mkimage -l`'s description of a U-Boot image.
fn mkimage_list(image: &Path) -> String {
    tool(Command::new("mkimage").arg("-l").arg(image))
}

#[test]
fn the_qemu_board_makes_image_s_disk_and_it_boots_to_ready() {
    let out = Output::new();
    out.post_image("qemu-aarch64");
    let disk = out.images().join("pocketos.img");

    // The partitions by name, in order, with their fixed UUIDs.
    let table = partition_table(&disk);
    let names: Vec<&str> = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["esp", "rootfs-a", "rootfs-b", "data"], "{table:#}");
    assert_eq!(
        table["id"].as_str().unwrap_or("").to_ascii_lowercase(),
        "6a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9"
    );

    // The ESP: boot/grub.cfg and a grubenv with A good and B not
    // bootable, as GRUB and otad read it; the U-Boot script beside them.
    let esp = out.images().join("esp.vfat");
    let cfg = fat_file(&esp, "EFI/pocketos/grub.cfg", out.tmp.path());
    assert_eq!(
        std::fs::read_to_string(cfg).unwrap(),
        std::fs::read_to_string(workspace_root().join("buildroot/board/pocketos/boot/grub.cfg"))
            .unwrap()
    );
    let env = grub_editenv_list(&fat_file(&esp, "EFI/pocketos/grubenv", out.tmp.path()));
    assert_eq!(env["ORDER"], "A B");
    assert_eq!(env["LAST_GOOD"], "A");
    assert_eq!(
        (&env["A_OK"], &env["A_TRY"], &env["B_OK"], &env["B_TRY"]),
        (
            &"1".to_string(),
            &"0".to_string(),
            &"0".to_string(),
            &"0".to_string()
        )
    );
    let scr = fat_file(&esp, "boot.scr", out.tmp.path());
    assert!(
        mkimage_list(&scr).contains("Script"),
        "{}",
        mkimage_list(&scr)
    );
    assert_eq!(
        std::fs::read_to_string(out.images().join("version"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(image_file("version"))
            .unwrap()
            .trim()
    );

    // And the firmware boots it: GRUB picks A, every daemon comes up.
    let mut app = Appliance::from_disk(&disk);
    app.power_on();
    let status = app.wait_ready();
    assert_eq!(status["daemons"]["otad"]["booted_slot"], "A", "{status:#}");
    assert_eq!(status["daemons"]["otad"]["health"], "good", "{status:#}");
    let cmdline = app.ok("cat /proc/cmdline");
    assert!(
        cmdline.contains("root=PARTLABEL=rootfs-a") && cmdline.contains("pocketos.slot=A"),
        "{cmdline}"
    );
}

/// `CONFIG_NAME=0x...` from a U-Boot config fragment.
fn fragment_value(fragment: &str, name: &str) -> u64 {
    let value = fragment
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in u-boot.fragment"));
    u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn the_rock5b_card_keeps_u_boot_and_its_environment_where_everyone_looks() {
    let board = board_dir("rock5b");
    let out = Output::new();
    // What Buildroot's U-Boot build leaves: idbloader, padding, u-boot.itb.
    let loader: Vec<u8> = (0..9 * MIB as usize + 4096)
        .map(|i| (i % 251) as u8 | 1)
        .collect();
    std::fs::write(out.images().join("u-boot-rockchip.bin"), &loader).unwrap();
    out.post_image("rock5b");
    let card = out.images().join("sdcard.img");

    // The loader where the RK3588's boot ROM reads it (sector 64).
    assert!(bytes_at(&card, 32 * 1024, loader.len()) == loader);

    // U-Boot's two environment copies, as its config fragment places them.
    let fragment = std::fs::read_to_string(board.join("u-boot.fragment")).unwrap();
    let size = fragment_value(&fragment, "CONFIG_ENV_SIZE");
    let first = fragment_value(&fragment, "CONFIG_ENV_OFFSET");
    let second = fragment_value(&fragment, "CONFIG_ENV_OFFSET_REDUND");
    assert!(fragment.contains("CONFIG_SYS_REDUNDAND_ENVIRONMENT=y"));
    assert!(fragment.contains("CONFIG_ENV_IS_IN_MMC=y"));
    assert!(first >= 32 * 1024 + loader.len() as u64 && second >= first + size);
    // A written card starts with both copies zeroed: no stale try count.
    assert!(bytes_at(&card, first, (second + size - first) as usize)
        .iter()
        .all(|&b| b == 0));

    // otad's system.toml and fw_env.config name the same two copies.
    let system = System::load(&board.join("rootfs-overlay/etc/pocketos/system.toml"))
        .expect("the board's system.toml");
    assert_eq!(system.compatible, "pocketos-rock5b");
    let Bootloader::Uboot { env, .. } = &system.bootloader else {
        panic!("the ROCK 5B boots with U-Boot: {:?}", system.bootloader)
    };
    let copies: Vec<(u64, u64)> = env.iter().map(|c: &EnvCopy| (c.offset, c.size)).collect();
    assert_eq!(copies, [(first, size), (second, size)]);
    let fw_env = std::fs::read_to_string(board.join("rootfs-overlay/etc/fw_env.config")).unwrap();
    let fw: Vec<(String, u64, u64)> = fw_env
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (f[0].to_string(), hex(f[1]), hex(f[2]))
        })
        .collect();
    let dev = env[0].path.display().to_string();
    assert_eq!(fw, [(dev.clone(), first, size), (dev, second, size)]);

    // Then image/'s A/B partitions, with the ESP after the raw areas and
    // slots of the board's size (meta's SLOT_SIZE).
    let table = partition_table(&card);
    let reference = partition_table(&image_file("pocketos.img"));
    let parts = table["partitions"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["esp", "rootfs-a", "rootfs-b", "data"]);
    assert!(parts[0]["start"].as_u64().unwrap() * 512 >= second + size);
    let meta = std::fs::read_to_string(board.join("meta")).unwrap();
    let slot_mib: u64 = meta
        .lines()
        .find_map(|l| l.strip_prefix("SLOT_SIZE="))
        .and_then(|v| v.strip_suffix('M'))
        .expect("SLOT_SIZE=<n>M in meta")
        .parse()
        .unwrap();
    for (p, r) in parts
        .iter()
        .zip(reference["partitions"].as_array().unwrap())
    {
        assert_eq!((&p["type"], &p["uuid"]), (&r["type"], &r["uuid"]));
        match p["name"].as_str().unwrap() {
            "rootfs-a" | "rootfs-b" => {
                assert_eq!(p["size"].as_u64().unwrap() * 512, slot_mib * MIB)
            }
            _ => assert_eq!(p["size"], r["size"]),
        }
    }

    // The ESP's boot.scr: the board's console and the slot selection.
    let scr = fat_file(&out.images().join("esp.vfat"), "boot.scr", out.tmp.path());
    assert!(mkimage_list(&scr).contains("Script"));
    let text = String::from_utf8_lossy(&std::fs::read(&scr).unwrap()).into_owned();
    assert!(text.contains("console=ttyS2,1500000n8") && text.contains("BOOT_ORDER"));
}
