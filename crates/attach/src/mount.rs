//! Mounting a disk someone else wrote, onto a directory nobody can swap.
//!
//! A scratch disk's bytes come from a server, or from any client that knows
//! its name: to the builder its file system is untrusted media, and the
//! mount point may sit below a directory that an unprivileged user owns
//! (`--mount "$CI_BUILDS_DIR"`). So every mount made here
//! - carries `nosuid` and `nodev`, whatever the options ask: a setuid-root
//!   program or a device node on the disk must not work on the builder;
//! - names its file-system type: the kernel never probes the image with
//!   every driver it has (each one a parser of hostile input);
//! - goes onto a directory opened once, with no symlink anywhere in its
//!   path, and mounted through that descriptor with the new mount API
//!   (`fsopen`, `fsconfig`, `fsmount`, `move_mount`): replacing the path
//!   with a symlink after it was opened moves nothing.
//!
//! Unmounting by path uses `UMOUNT_NOFOLLOW` ([`crate::ns::unmount`]).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags,
};

/// A directory to mount on, held open from the moment it was checked.
#[derive(Debug)]
pub struct MountPoint {
    dir: OwnedFd,
    path: PathBuf,
}

/// Why a mount was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {}: {reason}", path.display())]
    BadMountPoint { path: PathBuf, reason: &'static str },
    #[error("cannot open mount point {} (a symlink in its path is refused)", path.display())]
    OpenMountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount option {option:?}: {reason}")]
    BadOption {
        option: String,
        reason: &'static str,
    },
    #[error("cannot mount {} ({fs_type}) on {}: {step} failed{}", device.display(), dir.display(), Kernel(.kernel))]
    Failed {
        device: PathBuf,
        dir: PathBuf,
        fs_type: String,
        step: &'static str,
        /// What the file system driver said about it, if anything.
        kernel: String,
        #[source]
        source: io::Error,
    },
}

/// Formats the kernel's own explanation, when it gave one.
struct Kernel<'a>(&'a str);

impl fmt::Display for Kernel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.is_empty() {
            true => Ok(()),
            false => write!(f, " ({})", self.0),
        }
    }
}

impl MountPoint {
    /// Opens the directory at `path`, which must be absolute, resolve
    /// without any symlink (give the canonical path), and be a directory.
    pub fn open(path: &Path) -> Result<MountPoint, MountError> {
        if !path.is_absolute() {
            return Err(MountError::BadMountPoint {
                path: path.to_owned(),
                reason: "not an absolute path",
            });
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let dir = rustix::fs::openat2(CWD, path, flags, Mode::empty(), resolve).map_err(|e| {
            MountError::OpenMountPoint {
                path: path.to_owned(),
                source: e.into(),
            }
        })?;
        Ok(MountPoint {
            dir,
            path: path.to_owned(),
        })
    }

    /// The path it was opened by (which may no longer lead to it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for MountPoint {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// What to mount and how: an explicit file-system type and `mount -o`
/// style options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fs_type: String,
    /// Mount attributes (`nosuid` and `nodev` always among them).
    attributes: MountAttrFlags,
    /// The file system's own options (`discard`, `data=writeback`).
    params: Vec<(String, Option<String>)>,
}

impl MountSpec {
    /// Parses `options` (comma-separated, as `mount -o` takes them) for a
    /// file system of type `fs_type`. `suid`, `dev` and `exec`-style
    /// reversals of the safety attributes are refused.
    pub fn new(fs_type: &str, options: &str, read_only: bool) -> Result<MountSpec, MountError> {
        if fs_type.is_empty()
            || !fs_type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(MountError::BadOption {
                option: fs_type.to_owned(),
                reason: "not a file-system type name",
            });
        }
        let mut spec = MountSpec {
            fs_type: fs_type.to_owned(),
            attributes: MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
            params: Vec::new(),
        };
        if read_only {
            spec.attributes |= MountAttrFlags::MOUNT_ATTR_RDONLY;
        }
        for option in options.split(',').filter(|o| !o.is_empty()) {
            spec.add(option)?;
        }
        Ok(spec)
    }

    fn add(&mut self, option: &str) -> Result<(), MountError> {
        let refuse = |reason| {
            Err(MountError::BadOption {
                option: option.to_owned(),
                reason,
            })
        };
        match option {
            "suid" | "dev" => {
                return refuse("a disk from the network is untrusted media: nosuid,nodev always")
            }
            // Defaults that change nothing here.
            "defaults" | "rw" | "async" | "nosuid" | "nodev" | "exec" => {}
            "ro" => self.attributes |= MountAttrFlags::MOUNT_ATTR_RDONLY,
            "noexec" => self.attributes |= MountAttrFlags::MOUNT_ATTR_NOEXEC,
            "nodiratime" => self.attributes |= MountAttrFlags::MOUNT_ATTR_NODIRATIME,
            "noatime" | "relatime" | "strictatime" => {
                let flag = match option {
                    "noatime" => MountAttrFlags::MOUNT_ATTR_NOATIME,
                    "relatime" => MountAttrFlags::MOUNT_ATTR_RELATIME,
                    _ => MountAttrFlags::MOUNT_ATTR_STRICTATIME,
                };
                // One atime mode: the last one given wins, as with mount(8).
                self.attributes.remove(MountAttrFlags::MOUNT_ATTR__ATIME);
                self.attributes |= flag;
            }
            "sync" | "dirsync" | "remount" | "bind" | "move" => {
                return refuse("not supported for a scratch disk")
            }
            _ => match option.split_once('=') {
                Some(("", _)) => return refuse("no option name"),
                Some((key, value)) => self.params.push((key.to_owned(), Some(value.to_owned()))),
                None => self.params.push((option.to_owned(), None)),
            },
        }
        Ok(())
    }

    /// Whether the mount will be read-only.
    pub fn read_only(&self) -> bool {
        self.attributes.contains(MountAttrFlags::MOUNT_ATTR_RDONLY)
    }
}

/// Mounts the file system on `device` at `at` as `spec` says.
pub fn mount_device(device: &Path, spec: &MountSpec, at: &MountPoint) -> Result<(), MountError> {
    let failed = |step, kernel: String, source: rustix::io::Errno| MountError::Failed {
        device: device.to_owned(),
        dir: at.path.clone(),
        fs_type: spec.fs_type.clone(),
        step,
        kernel,
        source: source.into(),
    };
    let context = fsopen(spec.fs_type.as_str(), FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| failed("fsopen (is the file system type known?)", String::new(), e))?;
    let configured = configure(&context, device, spec);
    if let Err((step, e)) = configured {
        return Err(failed(step, kernel_messages(&context), e));
    }
    let mounted = fsmount(&context, FsMountFlags::FSMOUNT_CLOEXEC, spec.attributes)
        .map_err(|e| failed("fsmount", kernel_messages(&context), e))?;
    let flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
    move_mount(&mounted, "", at, "", flags).map_err(|e| failed("move_mount", String::new(), e))
}

/// Hands the source, the options and the read-only flag to the file
/// system, then creates the superblock (where the driver reads the disk).
fn configure(
    context: &OwnedFd,
    device: &Path,
    spec: &MountSpec,
) -> Result<(), (&'static str, rustix::io::Errno)> {
    fsconfig_set_string(context, "source", device).map_err(|e| ("setting the source", e))?;
    for (key, value) in &spec.params {
        match value {
            Some(value) => fsconfig_set_string(context, key.as_str(), value.as_str()),
            None => fsconfig_set_flag(context, key.as_str()),
        }
        .map_err(|e| ("a file-system option", e))?;
    }
    if spec.read_only() {
        // Read-only at the superblock too: no journal replay writes.
        fsconfig_set_flag(context, "ro").map_err(|e| ("ro", e))?;
    }
    fsconfig_create(context).map_err(|e| ("reading the file system", e))
}

/// What the kernel logged into the mount context (`e ext4: ...` lines),
/// which says why a mount failed far better than the errno.
fn kernel_messages(context: &OwnedFd) -> String {
    let mut lines = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; an empty queue fails with ENODATA.
    while let Ok(n) = rustix::io::read(context, &mut buf) {
        if n == 0 || lines.len() >= 8 {
            break;
        }
        lines.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
    }
    lines.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(options: &str) -> MountAttrFlags {
        MountSpec::new("ext4", options, false).unwrap().attributes
    }

    #[test]
    fn nosuid_and_nodev_are_always_set() {
        let safe = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
        for options in ["", "noatime", "defaults", "rw,discard", "nosuid"] {
            assert!(attributes(options).contains(safe), "{options:?}");
        }
    }

    #[test]
    fn suid_and_dev_are_refused() {
        for options in ["suid", "noatime,dev"] {
            let err = MountSpec::new("ext4", options, false).unwrap_err();
            assert!(err.to_string().contains("untrusted"), "{err}");
        }
    }

    #[test]
    fn attributes_and_file_system_options_are_told_apart() {
        let spec = MountSpec::new("ext4", "noatime,discard,commit=60,ro", false).unwrap();
        assert!(spec.attributes.contains(MountAttrFlags::MOUNT_ATTR_NOATIME));
        assert!(spec.read_only());
        assert_eq!(
            spec.params,
            vec![
                ("discard".to_owned(), None),
                ("commit".to_owned(), Some("60".to_owned()))
            ]
        );
    }

    #[test]
    fn the_last_atime_mode_wins() {
        let a = attributes("noatime,relatime");
        assert_eq!(
            a & MountAttrFlags::MOUNT_ATTR__ATIME,
            MountAttrFlags::MOUNT_ATTR_RELATIME
        );
        let a = attributes("strictatime,noatime");
        assert_eq!(
            a & MountAttrFlags::MOUNT_ATTR__ATIME,
            MountAttrFlags::MOUNT_ATTR_NOATIME
        );
    }

    #[test]
    fn odd_types_and_options_are_refused() {
        assert!(MountSpec::new("", "", false).is_err());
        assert!(MountSpec::new("ext4,dev", "", false).is_err());
        assert!(MountSpec::new("../x", "", false).is_err());
        assert!(MountSpec::new("ext4", "=x", false).is_err());
        assert!(MountSpec::new("ext4", "bind", false).is_err());
    }

    #[test]
    fn a_relative_or_symlinked_mount_point_is_refused() {
        assert!(MountPoint::open(Path::new("relative/dir")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = MountPoint::open(&link).unwrap_err();
        assert!(matches!(err, MountError::OpenMountPoint { .. }), "{err}");
        let through = link.join(".");
        assert!(
            MountPoint::open(&through).is_err(),
            "a symlink inside the path"
        );
        let canonical = real.canonicalize().unwrap();
        MountPoint::open(&canonical).unwrap();
    }

    /// Root, loop devices and mkfs.ext4: what the mounting tests need.
    fn can_mount(test: &str) -> bool {
        let root = rustix::process::geteuid().is_root();
        let loops = Path::new("/dev/loop-control").exists();
        let mkfs = std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_ok();
        if !(root && loops && mkfs) {
            eprintln!("SKIPPED {test}: needs root, loop devices and mkfs.ext4");
        }
        root && loops && mkfs
    }

    /// A 16 MiB ext4 image of `content` in `dir`, on a loop device.
    fn disk_of(dir: &Path, content: &Path) -> crate::loopdev::LoopDevice {
        let image = dir.join("disk.img");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(content)
            .arg(&image)
            .arg("16M")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(made.success(), "mkfs.ext4");
        // Released once mounted; autoclear detaches it with the mount.
        crate::loopdev::LoopDevice::attach(&image, false, 512).unwrap()
    }

    /// Unmounts on drop, so a failed assertion leaves no mount behind.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = crate::ns::unmount_lazily(&self.0);
        }
    }

    fn mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A disk whose writer planted a setuid-root program and a device node
    /// readable by all: neither works once mounted here.
    #[test]
    fn a_disk_cannot_carry_setuid_programs_or_device_nodes() {
        if !can_mount("a_disk_cannot_carry_setuid_programs_or_device_nodes") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        mode(dir.path(), 0o755);
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        std::fs::copy("/usr/bin/id", content.join("id")).unwrap();
        mode(&content.join("id"), 0o4755);
        let null = content.join("null");
        rustix::fs::mknodat(
            CWD,
            &null,
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        mode(&null, 0o666);
        let mut device = disk_of(dir.path(), &content);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let at = MountPoint::open(&mnt.canonicalize().unwrap()).unwrap();
        let spec = MountSpec::new("ext4", "noatime", false).unwrap();
        mount_device(device.path(), &spec, &at).unwrap();
        let _mounted = Mounted(mnt.clone());
        device.release();

        let flags = rustix::fs::statvfs(&mnt).unwrap().f_flag;
        assert!(
            flags.contains(rustix::fs::StatVfsMountFlags::NOSUID),
            "{flags:?}"
        );
        assert!(
            flags.contains(rustix::fs::StatVfsMountFlags::NODEV),
            "{flags:?}"
        );
        // The bit is on the disk; it must do nothing.
        use std::os::unix::fs::PermissionsExt;
        let planted = std::fs::metadata(mnt.join("id"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(planted & 0o4000, 0o4000, "the image lost its setuid bit");
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(mnt.join("id"))
            .arg("-u")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
        let opened = std::fs::File::open(mnt.join("null")).unwrap_err();
        assert_eq!(opened.raw_os_error(), Some(libc::EACCES), "{opened}");
    }

    /// The mount point's path replaced by a symlink (to a directory of
    /// root's) after it was opened: the disk lands where it was opened,
    /// and unmounting by the path does not follow the symlink.
    #[test]
    fn a_swapped_mount_point_moves_nothing() {
        if !can_mount("a_swapped_mount_point_moves_nothing") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        std::fs::write(content.join("from-the-disk"), b"x").unwrap();
        let mut device = disk_of(dir.path(), &content);
        let parent = dir.path().canonicalize().unwrap().join("parent");
        let victim = dir.path().canonicalize().unwrap().join("victim");
        std::fs::create_dir_all(parent.join("mnt")).unwrap();
        std::fs::create_dir(&victim).unwrap();
        let at = MountPoint::open(&parent.join("mnt")).unwrap();

        std::fs::rename(parent.join("mnt"), parent.join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, parent.join("mnt")).unwrap();
        let spec = MountSpec::new("ext4", "", false).unwrap();
        mount_device(device.path(), &spec, &at).unwrap();
        let _mounted = Mounted(parent.join("moved"));
        device.release();

        assert!(parent.join("moved/from-the-disk").exists());
        assert!(
            crate::ns::mount_at(&victim).is_none(),
            "mounted over the symlink's target"
        );
        let err = crate::ns::unmount(&parent.join("mnt")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
        assert!(
            parent.join("moved/from-the-disk").exists(),
            "unmounted through the symlink"
        );
        crate::ns::unmount(&parent.join("moved")).unwrap();
    }

    /// A mount that fails says why, in the file system's words.
    #[test]
    fn a_wrong_type_fails_with_the_kernels_reason() {
        if !can_mount("a_wrong_type_fails_with_the_kernels_reason") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        let device = disk_of(dir.path(), &content);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let at = MountPoint::open(&mnt.canonicalize().unwrap()).unwrap();
        let spec = MountSpec::new("ext4", "no_such_option", false).unwrap();
        let err = mount_device(device.path(), &spec, &at).unwrap_err();
        assert!(crate::ns::mount_at(&mnt).is_none());
        let text = err.to_string();
        // The driver's own words name the option (e.g. "e ext4: Unknown
        // parameter 'no_such_option'").
        assert!(text.contains("'no_such_option'"), "{text}");
        let spec = MountSpec::new("no_such_fs", "", false).unwrap();
        let err = mount_device(device.path(), &spec, &at).unwrap_err();
        assert!(err.to_string().contains("fsopen"), "{err}");
    }
}
