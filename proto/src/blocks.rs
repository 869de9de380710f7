//! The wire forms of the engine's block types (work sharing and the block
//! store), one way and back. Coming from the wire, only the shape is
//! checked here: what the values may be is the receiver's business
//! (`XzConfig::validate_shared`, and the bytes an id names).

use iukfarm_engine::blockcache::BlockId;
use iukfarm_engine::sqfs::XzConfig;

use crate::v1;

impl From<&XzConfig> for v1::XzSettings {
    fn from(c: &XzConfig) -> v1::XzSettings {
        v1::XzSettings {
            level: c.level,
            dict_size: c.dict_size,
            lc: c.lc,
            lp: c.lp,
            pb: c.pb,
            flags: c.flags,
        }
    }
}

impl From<&v1::XzSettings> for XzConfig {
    fn from(x: &v1::XzSettings) -> XzConfig {
        XzConfig {
            level: x.level,
            dict_size: x.dict_size,
            lc: x.lc,
            lp: x.lp,
            pb: x.pb,
            flags: x.flags,
        }
    }
}

impl From<&BlockId> for v1::BlockRef {
    fn from(id: &BlockId) -> v1::BlockRef {
        v1::BlockRef {
            settings: id.settings.to_vec(),
            len: id.len,
            data_sha256: id.data.to_vec(),
        }
    }
}

impl TryFrom<&v1::BlockRef> for BlockId {
    type Error = String;

    /// Fails when a digest is not 32 bytes.
    fn try_from(b: &v1::BlockRef) -> Result<BlockId, String> {
        let digest = |v: &[u8], what: &str| {
            <[u8; 32]>::try_from(v).map_err(|_| format!("{what}: not 32 bytes"))
        };
        Ok(BlockId {
            settings: digest(&b.settings, "settings")?,
            len: b.len,
            data: digest(&b.data_sha256, "data_sha256")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_types_cross_the_wire_unchanged_and_short_digests_do_not() {
        let mut xz = XzConfig::for_block_size(1 << 17);
        xz.flags = 16;
        assert_eq!(XzConfig::from(&v1::XzSettings::from(&xz)), xz);
        let id = BlockId::new(&xz, b"a block");
        let wire = v1::BlockRef::from(&id);
        assert_eq!(BlockId::try_from(&wire), Ok(id));
        let mut short = wire.clone();
        short.data_sha256.pop();
        assert_eq!(
            BlockId::try_from(&short),
            Err("data_sha256: not 32 bytes".to_string())
        );
        let mut long = wire;
        long.settings.push(0);
        assert_eq!(
            BlockId::try_from(&long),
            Err("settings: not 32 bytes".to_string())
        );
    }
}
