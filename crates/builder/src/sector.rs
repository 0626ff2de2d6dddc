//! The logical block size a disk's block device must have for the file
//! system on it to mount.

use std::io;

use scratchd_store::BlockDevice;

/// The block device's logical block size: the disk's preferred 4096 unless
/// the file system on it was made for smaller sectors (an ext2/3/4 with
/// 1 or 2 KiB blocks, an xfs with 512-byte sectors), which will not mount
/// on a device whose sectors are larger than its own.
pub fn logical_block_size(device: &dyn BlockDevice) -> io::Result<u32> {
    let mut head = vec![0u8; 2048.min(device.size() as usize)];
    device.read(0, &mut head)?;
    Ok(filesystem_sector_limit(&head)
        .unwrap_or(4096)
        .clamp(512, 4096))
}

/// The largest sector size the file system whose first bytes are `head`
/// mounts on, if it is one that cares.
fn filesystem_sector_limit(head: &[u8]) -> Option<u32> {
    let be16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let le16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.starts_with(b"XFSB") {
        // sb_sectsize, big-endian, at byte 102 of the superblock.
        return be16(102).map(u32::from);
    }
    // ext2/3/4: magic 0xEF53 at 56 in the superblock at 1024, block size
    // 1024 << s_log_block_size at 24.
    if le16(1024 + 56) == Some(0xEF53) {
        return le32(1024 + 24)
            .filter(|&log| log <= 6)
            .map(|log| 1024 << log);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_limits_come_from_the_superblock() {
        let mut ext = vec![0u8; 2048];
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1024 + 24] = 2; // 4096-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(4096));
        ext[1024 + 24] = 0; // 1024-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(1024));
        let mut xfs = vec![0u8; 2048];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[102..104].copy_from_slice(&512u16.to_be_bytes());
        assert_eq!(filesystem_sector_limit(&xfs), Some(512));
        assert_eq!(filesystem_sector_limit(&[0u8; 2048]), None);
        assert_eq!(filesystem_sector_limit(&[0u8; 10]), None);
    }
}
