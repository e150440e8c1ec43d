//! Where the running kernel keeps `sk_buff::ip_summed`, read from its BTF
//! (`/sys/kernel/btf/vmlinux`). The tc programs read that field to update the L4 checksum
//! in place for CHECKSUM_PARTIAL, NONE and UNNECESSARY packets instead of calling
//! `bpf_l4_csum_replace` twice (92 ns per packet on the node bed); without it (no BTF, or a
//! layout this parser does not recognise) they keep calling the helper for every packet.
use std::path::{Path, PathBuf};

/// The kernel's own description of its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Position of the 2-bit `ip_summed` bitfield in `struct sk_buff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpSummed {
    /// Byte offset from the start of `struct sk_buff`.
    pub byte: u32,
    /// Shift of the field's lowest bit within that byte (little-endian bitfield order).
    pub shift: u32,
}

impl IpSummed {
    /// The value the programs' `SKB_IP_SUMMED` global holds: the field's bit offset plus
    /// one (0 means unknown).
    pub fn global(&self) -> u32 {
        self.byte * 8 + self.shift + 1
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BTF: {0}")]
    Format(&'static str),
    #[error("struct sk_buff has no 2-bit ip_summed inside one byte")]
    NotFound,
}

/// `ip_summed` of the running kernel.
pub fn ip_summed() -> Result<IpSummed, LayoutError> {
    from_file(Path::new(VMLINUX_BTF))
}

fn from_file(path: &Path) -> Result<IpSummed, LayoutError> {
    let data = std::fs::read(path).map_err(|source| LayoutError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_ip_summed(&data)
}

/// Finds `struct sk_buff` in raw BTF and the `ip_summed` member in it (also inside
/// anonymous structs and unions, where `struct_group` puts it).
pub fn parse_ip_summed(data: &[u8]) -> Result<IpSummed, LayoutError> {
    let btf = Types::parse(data)?;
    let id = btf.find_struct("sk_buff").ok_or(LayoutError::NotFound)?;
    let (bit, bits) = btf
        .find_member(id, "ip_summed", 0, 0)?
        .ok_or(LayoutError::NotFound)?;
    if bits != 2 || bit % 8 + 2 > 8 {
        return Err(LayoutError::NotFound);
    }
    Ok(IpSummed {
        byte: bit / 8,
        shift: bit % 8,
    })
}

const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Ty {
    kind: u32,
    name_off: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Offset in `data` of what follows the common header (members, int encoding, ...).
    extra: usize,
}

struct Types<'a> {
    data: &'a [u8],
    strings: &'a [u8],
    /// Index `id - 1` (type id 0 is void).
    types: Vec<Ty>,
}

fn u32_at(data: &[u8], off: usize) -> Result<u32, LayoutError> {
    let b = data
        .get(off..off + 4)
        .ok_or(LayoutError::Format("truncated"))?;
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> Types<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, LayoutError> {
        let magic = data.get(0..2).ok_or(LayoutError::Format("truncated"))?;
        if u16::from_ne_bytes([magic[0], magic[1]]) != 0xeb9f {
            return Err(LayoutError::Format("bad magic (or other byte order)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(LayoutError::Format("strings out of range"))?;
        let (mut pos, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        if end > data.len() {
            return Err(LayoutError::Format("types out of range"));
        }
        let mut types = Vec::new();
        while pos < end {
            let info = u32_at(data, pos + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = match kind {
                // int, var, decl_tag
                1 | 14 | 17 => 4,
                // array
                3 => 12,
                // struct, union, datasec, enum64
                4 | 5 | 15 | 19 => 12 * vlen as usize,
                // enum, func_proto
                6 | 13 => 8 * vlen as usize,
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(LayoutError::Format("unknown type kind")),
            };
            types.push(Ty {
                kind,
                name_off: u32_at(data, pos)?,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type: u32_at(data, pos + 8)?,
                extra: pos + 12,
            });
            pos += 12 + extra;
        }
        Ok(Self {
            data,
            strings,
            types,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn ty(&self, id: u32) -> Option<&Ty> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn find_struct(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())
            .map(|i| i as u32 + 1)
    }

    /// Follows typedefs and qualifiers to the id of the type they name.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            match self.ty(id)?.kind {
                8..=11 | 18 => id = self.ty(id)?.size_or_type,
                _ => return Some(id),
            }
        }
        None
    }

    /// Bit offset and bitfield size (0: not a bitfield) of member `name` of struct or
    /// union `id`, searching anonymous members too; `base` is `id`'s own bit offset.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        base: u32,
        depth: u32,
    ) -> Result<Option<(u32, u32)>, LayoutError> {
        let Some(t) = self.ty(id) else {
            return Ok(None);
        };
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for i in 0..t.vlen as usize {
            let m = t.extra + 12 * i;
            let (m_name, m_type, m_off) = (
                u32_at(self.data, m)?,
                u32_at(self.data, m + 4)?,
                u32_at(self.data, m + 8)?,
            );
            let (bit, mut bits) = if t.kind_flag {
                (m_off & 0xff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            let mut bit = base + bit;
            if self.name(m_name) == name.as_bytes() {
                if bits == 0 {
                    // Old-style bitfield: size and offset in the int's encoding.
                    let int = self.resolve(m_type).and_then(|r| self.ty(r));
                    if let Some(int) = int.filter(|r| r.kind == KIND_INT) {
                        let enc = u32_at(self.data, int.extra)?;
                        bit += (enc >> 16) & 0xff;
                        bits = enc & 0xff;
                    }
                }
                return Ok(Some((bit, bits)));
            }
            if m_name == 0 {
                if let Some(inner) = self.resolve(m_type) {
                    if let Some(found) = self.find_member(inner, name, bit, depth + 1)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's layout: found, inside the struct, a 2-bit field.
    #[test]
    fn finds_ip_summed_in_this_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let f = ip_summed().expect("sk_buff.ip_summed in vmlinux BTF");
        eprintln!("sk_buff.ip_summed: {f:?}");
        let data = std::fs::read(VMLINUX_BTF).unwrap();
        let btf = Types::parse(&data).unwrap();
        let skb = btf.ty(btf.find_struct("sk_buff").unwrap()).unwrap();
        assert!(f.byte < skb.size_or_type, "{f:?} inside sk_buff");
        assert!(f.shift <= 6, "{f:?}");
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_ip_summed(b"not btf at all, clearly").is_err());
        assert!(parse_ip_summed(&[]).is_err());
    }
}
