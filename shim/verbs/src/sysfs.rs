//! `ibv_read_sysfs_file`: programs read device attributes from sysfs through it (`ibv_devinfo`
//! reads `board_id`). The virtual device has no sysfs directory, so the files under its paths
//! are served from its identity; any other path is read from the file system, as the real
//! function does.

use crate::device::{self, Identity, DEV_PATH, IBDEV_PATH, PORT};
use crate::error::VerbsError;
use std::io::Read;

/// The contents of `dir/file` (with sysfs's trailing newline), reading at most `limit` bytes of a
/// real file.
pub fn read(dir: &str, file: &str, limit: usize) -> Result<Vec<u8>, VerbsError> {
    let path = format!(
        "{}/{}",
        dir.trim_end_matches('/'),
        file.trim_start_matches('/')
    );
    if let Some(text) = virtual_file(&path) {
        return text.map(String::into_bytes);
    }
    let mut out = Vec::new();
    std::fs::File::open(&path)?
        .take(limit as u64)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// `Some` if `path` lies in the virtual device's directories: its contents, or ENOENT.
fn virtual_file(path: &str) -> Option<Result<String, VerbsError>> {
    let inside = |root: &str| {
        path.strip_prefix(root)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(str::to_owned)
    };
    let (relative, is_ibdev) = match (inside(IBDEV_PATH), inside(DEV_PATH)) {
        (Some(r), _) => (r, true),
        (None, Some(r)) => (r, false),
        (None, None) => return None,
    };
    let not_found = || VerbsError::Io(std::io::Error::from_raw_os_error(libc::ENOENT));
    let Some(device) = crate::registry::latest_device() else {
        return Some(Err(not_found()));
    };
    let text = if is_ibdev {
        ibdev_file(&device.identity, &relative)
    } else {
        (relative == "ibdev").then(|| device::DEVICE_NAME.to_string())
    };
    Some(text.map(|t| t + "\n").ok_or_else(not_found))
}

fn ibdev_file(identity: &Identity, relative: &str) -> Option<String> {
    let port = format!("ports/{PORT}/");
    if let Some(port_file) = relative.strip_prefix(&port) {
        return Some(
            match port_file {
                "state" => "4: ACTIVE",
                "phys_state" => "5: LinkUp",
                "link_layer" => "Ethernet",
                "lid" => "0x0",
                "gids/0" => return Some(identity.gid_text()),
                "gid_attrs/types/0" => "RoCE v2",
                "pkeys/0" => "0xffff",
                _ => return None,
            }
            .to_string(),
        );
    }
    Some(match relative {
        "node_type" => "1: CA".to_string(),
        "node_guid" | "sys_image_guid" => identity.guid_text(),
        "fw_ver" => env!("CARGO_PKG_VERSION").to_string(),
        "board_id" => device::BOARD_ID.to_string(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn device_files() {
        let id = Identity {
            ip: Ipv4Addr::new(10, 32, 0, 5),
            container: "web".into(),
            tenant: "blue".into(),
        };
        assert_eq!(ibdev_file(&id, "board_id").unwrap(), "FREEFLOW_VIRTUAL");
        assert_eq!(
            ibdev_file(&id, "ports/1/gids/0").unwrap(),
            "0000:0000:0000:0000:0000:ffff:0a20:0005"
        );
        assert_eq!(
            ibdev_file(&id, "ports/1/gid_attrs/types/0").unwrap(),
            "RoCE v2"
        );
        assert!(ibdev_file(&id, "ports/2/state").is_none());
        assert!(ibdev_file(&id, "hw_rev").is_none());
    }

    #[test]
    fn other_paths_are_real_files() {
        let dir = std::env::temp_dir().join(format!("ff-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("value"), "42\n").unwrap();
        let d = dir.to_str().unwrap();
        assert_eq!(read(d, "value", 64).unwrap(), b"42\n");
        assert_eq!(read(d, "value", 2).unwrap(), b"42");
        let missing = read(d, "absent", 64).unwrap_err();
        assert_eq!(missing.errno(), libc::ENOENT);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
